"""SmoothQuant (Xiao et al., 2022): W8A8, int8 weights *and* int8 activations.

Weights are easy to quantize to int8; activations are not, because a few input channels
carry values far larger than the rest (outliers), and a per-token int8 scale set by those
channels leaves the others only a few levels. The same product can be written with the
difficulty moved from the activations to the weights, one input channel j at a time:

    X W^T = (X / s) (W * s)^T,        s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

alpha is the migration strength: alpha=1 flattens every activation channel to absmax 1 and
hands the whole range to the weights, alpha=0 flattens the weights' columns instead (it is
*not* "no smoothing": that is s = 1, which `w8a8_model` gives). The paper finds 0.5 a good
balance for most models. In a Llama block the input of q/k/v (and of gate/up) is an RMSNorm's output, so 1/s
folds into that norm's weight and s into the linears' columns: nothing is added at run time.
o_proj and down_proj have no norm in front and are quantized without smoothing, as in the
paper's Llama recipe. In a Mixture-of-Experts block (lesson 07) the second norm feeds the
router and every expert's gate/up: one s for all of them (the router stays in float, so its
logits do not move), and each expert's matrices become W8A8 (`QuantExperts`).

`W8A8Linear` quantizes each token's activations on the fly (dynamic, symmetric, one scale
per token), multiplies int8 by int8 into int32 (`torch._int_mm` where it runs fast, an exact
emulation in float32 slices elsewhere), and rescales by the outer product of token and channel scales.

`activation_outliers` measures how outlier-heavy a model's activations are; a small model
may have none to speak of, and `plant_outliers` gives it some without changing its function,
to show what smoothing is for.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from torch import nn

from . import calibrate
from .linear import QuantConfig, targets

QMAX = 127  # symmetric int8, restricted range: -127..127, so +-absmax both fit

# The norms a Llama block applies before the linears that read them (SmoothQuant's groups).
LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
# ... and a Mixtral-style MoE block's: its router and its stacked experts read the second norm.
MOE_GROUPS = (LLAMA_GROUPS[0], ("post_attention_layernorm", ("mlp.gate", "mlp.experts")))


# --------------------------------------------------------------------------- int8 matmul

# Float32 holds every integer up to 2^24 exactly, and 1024 products of two int8 values sum to at
# most 1024 * 128^2 = 2^24: a float32 matmul over 1024 columns of int8 codes is an exact integer.
FP32_EXACT_K = 1024


@functools.cache
def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI, AMX), which `torch._int_mm` uses.
    Without them (AVX2 only) it ran 27x slower than a float32 matmul of the same shape on a 2-core
    AMD EPYC (Zen 3, BENCHMARKS.md), so `int8_matmul` takes the exact float32 path instead. Read from Linux's
    /proc/cpuinfo; elsewhere assumed absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._int_mm(a, b)` runs, and runs fast, for int8 a (m, k), b (k, n). On CPU
    (torch 2.13) any 2-D shape works, fast with VNNI or AMX; the CUDA kernel (cuBLAS) asks for
    m > 16 and k, n multiples of 8."""
    if not hasattr(torch, "_int_mm") or a.device != b.device:
        return False
    if a.device.type == "cpu":
        return cpu_has_int8_dot()
    if a.device.type == "cuda":
        (m, k), n = a.shape, b.shape[1]
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return False


def int8_matmul_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T for int8 a (m, k), w (n, k), exact, in int32. On CPU: float32 matmuls over slices
    of `FP32_EXACT_K` columns, each exact, summed in int32 (fast BLAS, any k). Elsewhere in
    float64 (CUDA has no integer matmul but `_int_mm`), exact while |sum| < 2^53."""
    if a.device.type == "cpu":
        out = None
        for k0 in range(0, max(a.shape[1], 1), FP32_EXACT_K):
            part = (a[:, k0:k0 + FP32_EXACT_K].float() @ w[:, k0:k0 + FP32_EXACT_K].float().T).to(torch.int32)
            out = part if out is None else out.add_(part)
        return out
    return (a.double() @ w.double().T).to(torch.int32)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T for int8 activations a (m, k) and int8 weights w (n, k), accumulated in int32:
    `torch._int_mm` where it is fast, else `int8_matmul_reference` (the same exact result)."""
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise ValueError(f"int8_matmul takes int8 tensors, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"expected a (m, k) and w (n, k), got {tuple(a.shape)} and {tuple(w.shape)}")
    wt = w.T
    if not int_mm_supported(a, wt):
        return int8_matmul_reference(a, w)
    if a.device.type == "cuda":  # cuBLAS has been reported to give wrong results for a transposed mat2
        wt = wt.contiguous()
    return torch._int_mm(a.contiguous(), wt)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 codes for each row of x (tokens, features) and the row scales
    (tokens, 1) in float32: x ~= codes * scale."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp(min=1e-12)  # an all-zero token: 0/0
    return (x / scale).round_().clamp_(-QMAX, QMAX).to(torch.int8), scale


# --------------------------------------------------------------------------- the module

def _check_cfg(cfg) -> None:
    if cfg.bits != 8 or cfg.group_size is not None or not cfg.symmetric:
        raise ValueError("W8A8Linear stores symmetric int8 weights per output channel: cfg needs bits=8, "
                         f"group_size=None, symmetric=True, got bits={cfg.bits!r}, "
                         f"group_size={cfg.group_size!r}, symmetric={cfg.symmetric!r}")


class W8A8Linear(nn.Module):
    """y = (q_x q_w^T) * s_x s_w^T + b: int8 weights with one float32 scale per output channel,
    int8 activations with one scale per token computed at run time."""
    quantized = True  # every llmopt quantized module says so: quantize() refuses to run twice

    def __init__(self, in_features: int, out_features: int, cfg, bias: bool = False, device=None):
        super().__init__()
        _check_cfg(cfg)
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg) -> W8A8Linear:
        """Round-to-nearest int8 of the weight, one absmax scale per output channel."""
        w = linear.weight.detach().float()
        m = cls(linear.in_features, linear.out_features, cfg, bias=linear.bias is not None, device=w.device)
        scale = (w.abs().amax(dim=1) / QMAX).clamp(min=1e-12)
        m.qweight.copy_(torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8))
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The weight the integer codes stand for (after smoothing: W * s, not W)."""
        return (self.qweight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        qx, sx = quantize_per_token(x.reshape(-1, self.in_features))
        acc = int8_matmul(qx, self.qweight)
        y = acc.float() * sx * self.weight_scale.float()[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                "W int8 per channel, A int8 per token (dynamic)")


# --------------------------------------------------------------------------- smoothing

@torch.no_grad()
def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), the weight max taken over every linear that
    reads the same input (their columns j all get multiplied by the same s_j)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    w_absmax = torch.stack([w.detach().float().abs().reshape(-1, w.shape[-1]).amax(dim=0) for w in weights]).amax(0)
    # a channel that never fired (or has all-zero weights) would give 0 or inf: floor both
    a = act_absmax.float().to(w_absmax.device).clamp(min=1e-5)
    return (a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def _check_group(norm: nn.Module, linears: list, what: str, shape) -> None:
    """The norm has a 1-D weight of n channels; every reader (a linear, a router, stacked experts)
    reads n inputs; `what` has shape (n,)."""
    weight = getattr(norm, "weight", None)
    if not linears:
        raise ValueError("need at least one linear that reads the norm's output")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"norm must have a 1-D .weight (an RMSNorm/LayerNorm), got {type(norm).__name__}")
    n = weight.numel()
    reads = [calibrate.input_weight(lin).shape[-1] for lin in linears]
    if any(r != n for r in reads) or tuple(shape) != (n,):
        raise ValueError(f"the norm has {n} channels: every linear needs in_features={n} and {what} "
                         f"shape ({n},), got {reads} and {tuple(shape)}")


@torch.no_grad()
def migrate(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm.weight /= s and column j of each linear *= s_j, in place. The linears (or routers, or
    stacked experts) must all read the norm's output; then the block computes the same function
    (RMSNorm multiplies by its weight last, so dividing the weight divides its output channel by s_j)."""
    linears = list(linears)
    _check_group(norm, linears, "s", s.shape)
    norm.weight.div_(s.to(norm.weight))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):  # LayerNorm: (x_hat * g + b) / s
        bias.div_(s.to(bias))
    for lin in linears:
        w = calibrate.input_weight(lin)
        w.mul_(s.to(w))


@torch.no_grad()
def smooth(norm: nn.Module, linears: list[nn.Linear], act_absmax: torch.Tensor, alpha: float = 0.5):
    """SmoothQuant one norm and the linears that read its output, in place, from the per-channel
    absmax of that output on calibration data: s = `smoothing_scales`, then `migrate`. Returns s."""
    linears = list(linears)
    _check_group(norm, linears, "act_absmax", act_absmax.shape)
    s = smoothing_scales(act_absmax, [calibrate.input_weight(lin) for lin in linears], alpha)
    migrate(norm, linears, s)
    return s


@torch.no_grad()
def plant_outliers(model: nn.Module, n_channels: int = 4, factor: float = 100.0, seed: int = 0):
    """Give a model the activation outliers large LLMs have, without changing what it computes:
    in every decoder layer, `n_channels` random channels of each norm's output grow `factor`
    times and the linears reading them shrink to match (`migrate` with s_j = 1/factor).
    For demonstrations on small models, which have no such outliers. In place; returns the
    channels chosen: {layer index: [input_layernorm's, post_attention_layernorm's]}."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    g, chosen = torch.Generator().manual_seed(seed), {}
    for i, layer in enumerate(calibrate.decoder_layers(model)):
        for _, norm, lins in _groups(layer):
            n = norm.weight.numel()
            if not 0 < n_channels <= n:
                raise ValueError(f"n_channels must be in 1..{n}, got {n_channels!r}")
            idx = torch.randperm(n, generator=g)[:n_channels]
            s = torch.ones(n)
            s[idx] = 1 / factor
            migrate(norm, list(lins.values()), s)
            chosen.setdefault(i, []).append(idx)
    return chosen


def _layout(layer: nn.Module) -> tuple:
    mlp = getattr(layer, "mlp", None)
    return MOE_GROUPS if hasattr(mlp, "gate") and hasattr(mlp, "experts") else LLAMA_GROUPS


def _groups(layer: nn.Module):
    """[(norm name, norm, {name: reader})] for a Llama-family decoder layer, dense or MoE."""
    from .experts import is_stacked_experts

    layout = _layout(layer)
    try:
        groups = [(norm, layer.get_submodule(norm), {n: layer.get_submodule(n) for n in names})
                  for norm, names in layout]
    except AttributeError as e:
        raise ValueError(f"SmoothQuant knows the Llama block layout {LLAMA_GROUPS} (or {MOE_GROUPS[1]} in a "
                         f"Mixture-of-Experts block); {type(layer).__name__} does not match it ({e})") from None
    calibrate.require_linears(layer, [n for _, names in layout for n in names if n.endswith("_proj")], "SmoothQuant")
    if layout is MOE_GROUPS and not is_stacked_experts(layer.get_submodule("mlp.experts")):
        raise ValueError(f"SmoothQuant knows Mixtral-style experts (stacked float gate_up_proj / down_proj); "
                         f"{type(layer.get_submodule('mlp.experts')).__name__} is not one")
    return groups


def _smooth_layer(layer: nn.Module, inputs: list, alpha: float) -> dict[str, torch.Tensor]:
    """Smooth both groups of one decoder layer from the maxima of its inputs; {norm name: s}."""
    groups = _groups(layer)
    readers = dict(next(iter(lins.items())) for _, _, lins in groups)  # one reader per norm: same input
    stats = calibrate.ChannelStats()
    calibrate.collect(layer, inputs, readers, stats)
    return {name: smooth(norm, list(lins.values()), stats.absmax[next(iter(lins))], alpha)
            for name, norm, lins in groups}


@torch.no_grad()
def smooth_model(model: nn.Module, calibration: torch.Tensor, alpha: float = 0.5, batch_size: int = 8):
    """Smoothing alone (no quantization), in place: the model computes the same function, with
    its activation outliers moved into the q/k/v and gate/up weights. Returns {layer: {norm: s}}."""
    calibration = calibrate.check_calibration(calibration)
    return {i: _smooth_layer(layer, inputs, alpha)
            for i, layer, inputs in calibrate.layerwise(model, calibration, batch_size)}


# --------------------------------------------------------------------------- whole models

def _refuse_quantized(model: nn.Module) -> None:
    if any(getattr(m, "quantized", False) for m in model.modules()):
        raise ValueError("this model is already quantized; quantize a fresh copy of the float model")


@torch.no_grad()
def w8a8_model(model: nn.Module, cfg=None) -> nn.Module:
    """W8A8 *without* smoothing (the baseline SmoothQuant improves on), in place: every linear
    `cfg.skip` lets through becomes a W8A8Linear (and an MoE layer's experts, W8A8 matrices in a
    `QuantExperts`). Needs no calibration (activations are quantized per token at run time)."""
    from .experts import QuantExperts, expert_targets

    cfg = QuantConfig(bits=8) if cfg is None else cfg
    _check_cfg(cfg)
    _refuse_quantized(model)
    linears, experts = targets(model, cfg), expert_targets(model, cfg)
    for name, linear in linears:
        calibrate.replace(model, name, W8A8Linear.from_linear(linear, cfg))
    w8a8 = dataclasses.replace(cfg, method="smoothquant")   # the name of the W8A8 format for the experts
    for name, module in experts:
        calibrate.replace(model, name, QuantExperts.from_experts(module, w8a8))
    return model


@torch.no_grad()
def smoothquant_model(model: nn.Module, calibration: torch.Tensor, cfg) -> nn.Module:
    """SmoothQuant W8A8 of a whole model, one decoder layer at a time, in place: smooth the
    layer with activation maxima seen on the calibration batches (alpha = cfg.alpha), swap its
    linears for W8A8Linear, and only then compute the next layer's inputs, so each layer is
    calibrated on what the quantized layers before it really produce. Linears outside the
    decoder layers (lm_head, unless cfg.skip keeps it in float) get W8A8 without smoothing.
    Called by `quantize(model, QuantConfig(method="smoothquant"), calibration)`. An MoE layer's
    experts become W8A8 too (`QuantExperts`), smoothed with the router (which stays in float)."""
    from .experts import QuantExperts, expert_targets

    _check_cfg(cfg)
    _refuse_quantized(model)
    calibration = calibrate.check_calibration(calibration)
    todo, expert_todo = targets(model, cfg), expert_targets(model, cfg)
    wanted = {id(m) for _, m in todo + expert_todo}
    for layer in calibrate.decoder_layers(model):
        _groups(layer)  # fail on a layout it cannot smooth before changing anything
    done = set()
    for _, layer, inputs in calibrate.layerwise(model, calibration, cfg.calib_batch_size):
        _smooth_layer(layer, inputs, cfg.alpha)  # skipped linears are smoothed too: exact in float
        for name, linear in calibrate.linears(layer).items():
            if id(linear) in wanted:
                calibrate.replace(layer, name, W8A8Linear.from_linear(linear, cfg))
                done.add(id(linear))
        for name, module in [(n, m) for n, m in layer.named_modules() if id(m) in wanted and id(m) not in done]:
            calibrate.replace(layer, name, QuantExperts.from_experts(module, cfg))
            done.add(id(module))
    for name, linear in todo:
        if id(linear) not in done:
            calibrate.replace(model, name, W8A8Linear.from_linear(linear, cfg))
    for name, module in expert_todo:
        if id(module) not in done:
            calibrate.replace(model, name, QuantExperts.from_experts(module, cfg))
    return model


# --------------------------------------------------------------------------- looking at outliers

@torch.no_grad()
def activation_outliers(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """How outlier-heavy each linear's input is, per decoder layer: max_j max|X_j| divided by
    the median over channels j of max|X_j| (1 = every channel alike; large LLMs have a few
    channels far above the rest). One dict {linear name: ratio} per layer. Read-only."""
    calibration = calibrate.check_calibration(calibration)
    out = []
    for _, layer, inputs in calibrate.layerwise(model, calibration, batch_size):
        stats = calibrate.ChannelStats()
        calibrate.collect(layer, inputs, calibrate.linears(layer), stats)
        out.append({name: (m.max() / m.median().clamp(min=1e-12)).item() for name, m in stats.absmax.items()})
    return out
