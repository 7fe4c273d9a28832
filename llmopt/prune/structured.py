"""Structured pruning: remove whole FFN channels, so the matrices really shrink and the
result is a smaller, ordinary Hugging Face model (it saves, reloads and generates as one).

A Llama MLP computes down(act(gate(x)) * up(x)); intermediate channel j is row j of gate and
up and column j of down. Removing it removes 3 * hidden weights. Every layer keeps the same
number of channels, so one `config.intermediate_size` still describes the model.

    prune_ffn(model, 0.25, calibration=calib)   # drop the 25% least important channels per layer
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import calibrate
from .masks import check_sparsity


class _ChannelActivity:
    """Mean |act(gate(x)) * up(x)| per intermediate channel: what reaches down_proj."""

    def __init__(self):
        self.total, self.n = None, 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        a = x.float().abs().sum(0)
        self.total = a if self.total is None else self.total + a
        self.n += x.shape[0]


def ffn_importance(mlp: nn.Module, activity: torch.Tensor | None = None) -> torch.Tensor:
    """Score per intermediate channel: how much it can add to the MLP's output. With
    calibration, mean |h_j| (h = act(gate(x)) * up(x)) times ||down[:, j]||; without, the
    weights alone: ||gate[j]|| * ||up[j]|| * ||down[:, j]||."""
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    if activity is not None:
        return activity.float().to(down.device) * down
    return mlp.gate_proj.weight.detach().float().norm(dim=1) * mlp.up_proj.weight.detach().float().norm(dim=1) * down


def _shrink(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    w = linear.weight.detach().index_select(dim, keep)
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[keep])
    return out


@torch.no_grad()
def prune_ffn(model: nn.Module, ratio: float, calibration=None, batch_size: int = 8) -> nn.Module:
    """Remove round(ratio * intermediate_size) channels from every MLP, the least important
    by `ffn_importance` (on calibration data if given, layer by layer); in place, returns the model."""
    ratio = check_sparsity(ratio, "ratio")
    layers = calibrate.decoder_layers(model)
    size = layers[0].mlp.down_proj.in_features
    keep_n = size - round(ratio * size)
    if keep_n < 1:
        raise ValueError(f"ratio {ratio} would remove every one of the {size} FFN channels")
    if calibration is not None:
        stages = calibrate.layerwise(model, calibrate.check_calibration(calibration), batch_size)
    else:
        stages = ((i, layer, None) for i, layer in enumerate(layers))
    for _, layer, inputs in stages:
        mlp = layer.mlp
        activity = None
        if inputs is not None:
            stats = _ChannelActivity()
            calibrate.collect(layer, inputs, {"mlp.down_proj": mlp.down_proj}, stats)
            activity = stats.total / stats.n
        keep = torch.topk(ffn_importance(mlp, activity), keep_n).indices.sort().values
        mlp.gate_proj = _shrink(mlp.gate_proj, keep, 0)
        mlp.up_proj = _shrink(mlp.up_proj, keep, 0)
        mlp.down_proj = _shrink(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n
    model.config.intermediate_size = keep_n
    return model
