"""Structured pruning: remove whole FFN channels or attention-head groups, so the matrices
really shrink and the result is a smaller, ordinary Hugging Face model (it saves, reloads
and generates as one).

A Llama MLP computes down(act(gate(x)) * up(x)); intermediate channel j is row j of gate and
up and column j of down. Removing it removes 3 * hidden weights. Every layer keeps the same
number of channels, so one `config.intermediate_size` still describes the model.

    prune_ffn(model, 0.25, calibration=calib)   # drop the 25% least important channels per layer
    prune_heads(model, 1, calibration=calib)    # drop the least important key/value group per layer
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import calibrate
from .masks import check_sparsity


class _MeanActivity:
    """Running mean over tokens of `measure(x)` (one value per channel or head) for one input."""

    def __init__(self, measure):
        self.measure, self.total, self.n = measure, None, 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        a = self.measure(x.float()).sum(0)
        self.total = a if self.total is None else self.total + a
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.n


def _stages(model: nn.Module, calibration, batch_size: int):
    """(index, layer, inputs) per decoder layer: `calibrate.layerwise` with calibration data
    (each layer sees the already pruned layers' outputs), inputs None without."""
    if calibration is None:
        return ((i, layer, None) for i, layer in enumerate(calibrate.decoder_layers(model)))
    return calibrate.layerwise(model, calibrate.check_calibration(calibration), batch_size)


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


def _check_float(model: nn.Module, part: str, names: tuple, who: str) -> None:
    """ValueError unless every decoder layer's `part` holds `names` as plain nn.Linear: rows and columns
    are cut out of float weights, so prune before quantizing or factorising. Checked for every layer
    before the first one is cut."""
    for i, layer in enumerate(calibrate.decoder_layers(model)):
        module = getattr(layer, part, None)
        found = [getattr(module, n, None) for n in names]
        if not all(type(m) is nn.Linear for m in found):
            what = type(module).__name__ if None in found else ", ".join(type(m).__name__ for m in found)
            raise ValueError(f"{who} cuts rows and columns out of float weights ({part}.{{{', '.join(names)}}} as "
                             f"nn.Linear); layer {i} has {what}. Prune the float model before quantizing or "
                             "factorising it (a Mixture-of-Experts MLP has no FFN channels to cut this way)")


@torch.no_grad()
def prune_ffn(model: nn.Module, ratio: float, calibration=None, batch_size: int = 8) -> nn.Module:
    """Remove round(ratio * intermediate_size) channels from every MLP, the least important
    by `ffn_importance` (on calibration data if given, layer by layer); in place, returns the model."""
    ratio = check_sparsity(ratio, "ratio")
    _check_float(model, "mlp", ("gate_proj", "up_proj", "down_proj"), "prune_ffn")
    size = calibrate.decoder_layers(model)[0].mlp.down_proj.in_features
    keep_n = size - round(ratio * size)
    if keep_n < 1:
        raise ValueError(f"ratio {ratio} would remove every one of the {size} FFN channels")
    for _, layer, inputs in _stages(model, calibration, batch_size):
        mlp, activity = layer.mlp, None
        if inputs is not None:
            stats = _MeanActivity(torch.abs)
            calibrate.collect(layer, inputs, {"mlp.down_proj": mlp.down_proj}, stats)
            activity = stats.mean()
        keep = torch.topk(ffn_importance(mlp, activity), keep_n).indices.sort().values
        mlp.gate_proj = _shrink(mlp.gate_proj, keep, 0)
        mlp.up_proj = _shrink(mlp.up_proj, keep, 0)
        mlp.down_proj = _shrink(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n
    model.config.intermediate_size = keep_n
    return model


def group_importance(attn: nn.Module, head_dim: int, activity: torch.Tensor | None = None) -> torch.Tensor:
    """Score per key/value group (a KV head and the query heads that share it): the summed
    ||o_proj[:, head]|| of its query heads, times each head's mean output norm when calibrated."""
    o = attn.o_proj.weight.detach().float()
    per_head = o.reshape(o.shape[0], -1, head_dim).norm(dim=(0, 2))
    if activity is not None:
        per_head = per_head * activity.float().to(per_head.device)
    n_kv = attn.k_proj.out_features // head_dim
    return per_head.reshape(n_kv, -1).sum(1)


def _rows(head_ids: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (head_ids[:, None] * head_dim + torch.arange(head_dim, device=head_ids.device)).flatten()


@torch.no_grad()
def prune_heads(model: nn.Module, n_groups: int, calibration=None, batch_size: int = 8) -> nn.Module:
    """Remove `n_groups` key/value groups (each a KV head with its query heads) from every
    attention layer, the least important by `group_importance`; in place, returns the model.
    With grouped-query attention a query head cannot go alone without breaking the sharing,
    so whole groups go; every layer loses the same number, so the config stays uniform."""
    _check_float(model, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), "prune_heads")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv, n_rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    if not isinstance(n_groups, int) or isinstance(n_groups, bool) or not 0 <= n_groups < n_kv:
        raise ValueError(f"can remove 0 to {n_kv - 1} of the {n_kv} key/value groups "
                         f"({n_rep} query heads each), got {n_groups!r}: pruning more heads than exist")
    if cfg.hidden_size % ((n_kv - n_groups) * n_rep):
        raise ValueError(f"{(n_kv - n_groups) * n_rep} query heads would not divide hidden_size {cfg.hidden_size}, "
                         "which transformers' Llama config requires: remove another number of groups")
    for _, layer, inputs in _stages(model, calibration, batch_size):
        attn, activity = layer.self_attn, None
        if inputs is not None:  # mean ||z_h|| per query head, z = o_proj's input split into heads
            stats = _MeanActivity(lambda x: x.reshape(x.shape[0], -1, head_dim).norm(dim=-1))
            calibrate.collect(layer, inputs, {"self_attn.o_proj": attn.o_proj}, stats)
            activity = stats.mean()
        groups = torch.topk(group_importance(attn, head_dim, activity), n_kv - n_groups).indices.sort().values
        q_heads = (groups[:, None] * n_rep + torch.arange(n_rep, device=groups.device)).flatten()
        q_rows, kv_rows = _rows(q_heads, head_dim), _rows(groups, head_dim)
        attn.q_proj = _shrink(attn.q_proj, q_rows, 0)
        attn.k_proj = _shrink(attn.k_proj, kv_rows, 0)
        attn.v_proj = _shrink(attn.v_proj, kv_rows, 0)
        attn.o_proj = _shrink(attn.o_proj, q_rows, 1)
    cfg.head_dim = head_dim  # hidden_size / heads no longer gives it
    cfg.num_key_value_heads = n_kv - n_groups
    cfg.num_attention_heads = (n_kv - n_groups) * n_rep
    return model
