"""Calibration: feed a few batches of training text through the model and look at what
each linear layer receives. GPTQ wants the inputs' Hessian X^T X, AWQ and SmoothQuant the
per-channel size of the activations.

PTQ methods work one decoder layer at a time (`layerwise`): the inputs of layer i are the
outputs of layers 0..i-1 *as already quantized*, so each layer corrects for the error the
earlier ones made, and only one layer's activations are held at once.

    for i, layer, inputs in layerwise(model, calibration):
        stats = collect(layer, inputs, linears(layer), observe)   # hooks see each linear's input
        ... replace the layer's linears ...                        # then the loop moves on
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn


def check_calibration(calibration, model: nn.Module | None = None) -> torch.Tensor:
    """Token ids (n_samples, seq_len) as a LongTensor; a clear error for anything else (given the
    model, also for ids outside its vocabulary)."""
    if calibration is None:
        raise ValueError("this method needs calibration data: pass "
                         "calibration=llmopt.data.calibration_batches(tokenizer)")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        raise ValueError("calibration must be a 2-D tensor of token ids (n_samples, seq_len), "
                         f"got {type(calibration).__name__} {getattr(calibration, 'shape', '')}")
    if calibration.numel() == 0:
        raise ValueError("the calibration set is empty: it needs at least one sample of at least one token")
    from ..data import check_token_ids

    return check_token_ids(calibration, "calibration", model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (Llama family: model.model.layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return m
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def linears(layer: nn.Module, skip: tuple = ()) -> dict[str, nn.Linear]:
    """The layer's `nn.Linear` modules by name (q_proj, ..., down_proj), minus `skip` regexes."""
    return {name: m for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and not any(re.search(p, name) for p in skip)}


def require_linears(layer: nn.Module, names, method: str) -> None:
    """ValueError unless every named module of `layer` is a plain nn.Linear: AWQ and SmoothQuant
    fold their scales into those weights' columns, which a low-rank or fused module does not have."""
    for name in names:
        m = layer.get_submodule(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{method} folds its scales into the weights of the projections that read a "
                             f"norm's output, so they must be plain nn.Linear; {type(layer).__name__}.{name} "
                             f"is a {type(m).__name__}. Use {method} on the float model, or rtn / gptq / nf4, "
                             "which also quantize the factors of a low-rank layer")


def input_weight(module: nn.Module) -> torch.Tensor:
    """The weight whose last dim is what `module` reads: a linear's or an MoE router's `weight`, or a
    float experts module's stacked `gate_up_proj` (E, 2I, H). AWQ and SmoothQuant scale its columns."""
    from .experts import is_stacked_experts

    return module.gate_up_proj if is_stacked_experts(module) else module.weight


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> list:
    """Run the embeddings (and nothing after) on each batch: [(hidden_states, kwargs), ...],
    where kwargs are what the model passes its layers (position embeddings, causal mask)."""
    calibration = check_calibration(calibration, model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layer0, dev = decoder_layers(model)[0], next(model.parameters()).device
    seen = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}))
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in calibration.split(batch_size):
            try:
                model(ids.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def run_layer(layer: nn.Module, inputs: list) -> list:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outs


@torch.no_grad()
def layerwise(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8):
    """Yield (index, layer, inputs) for each decoder layer in order. The caller may change
    the layer (quantize it) before asking for the next one; the next layer's inputs are
    computed from the layer as the caller left it."""
    was_training = model.training
    model.eval()
    inputs = first_layer_inputs(model, calibration, batch_size)
    try:
        for i, layer in enumerate(decoder_layers(model)):
            yield i, layer, inputs
            inputs = run_layer(layer, inputs)
    finally:
        model.train(was_training)


@torch.no_grad()
def collect(layer: nn.Module, inputs: list, targets: dict[str, nn.Module],
            observe: Callable[[str, torch.Tensor], None]) -> None:
    """Run the layer on its inputs and call observe(name, x) with the input x of each target
    module (flattened to (tokens, in_features)) every time it is called."""
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: observe(name, args[0].reshape(
        -1, args[0].shape[-1]))) for name, m in targets.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()


class HessianAccumulator:
    """Running H = 2 X^T X / n over every batch a linear sees (GPTQ's statistic)."""

    def __init__(self):
        self.H, self.n = {}, {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        if name not in self.H:
            self.H[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.n[name] = 0
        n0, n1 = self.n[name], self.n[name] + x.shape[0]
        self.H[name] *= n0 / n1
        self.H[name] += (2 / n1) * x.T @ x
        self.n[name] = n1


class ChannelStats:
    """Per input channel: the largest |x| and the mean |x| seen (SmoothQuant's and AWQ's statistics)."""

    def __init__(self):
        self.absmax, self.absmean, self.n = {}, {}, {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        a = x.detach().float().abs()
        if name not in self.absmax:
            self.absmax[name] = a.amax(dim=0)
            self.absmean[name] = a.mean(dim=0)
            self.n[name] = a.shape[0]
            return
        n0, n1 = self.n[name], self.n[name] + a.shape[0]
        self.absmax[name] = torch.maximum(self.absmax[name], a.amax(dim=0))
        self.absmean[name] = self.absmean[name] * (n0 / n1) + a.sum(dim=0) / n1
        self.n[name] = n1


def replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `root` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
