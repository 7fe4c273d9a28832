"""Quantized Mixture-of-Experts weights: lesson 07's experts stored like lessons 01-02's linears.

A Mixtral-style MoE layer keeps its E experts as two stacked 3-D tensors, `gate_up_proj` (E, 2I, H)
and `down_proj` (E, H, I), not as `nn.Linear` modules, and in an MoE model they are most of the
weight (94% of the decoder of lesson 07's upcycled model). `QuantExperts` holds each expert's two
matrices as a `QuantLinear` (or an `NF4Linear`): the same codes, scales and file format as a dense
layer's, so a 4-bit expert costs what a 4-bit linear costs. Its forward touches only the experts the
batch routes tokens to: it dequantizes them and runs the same dispatch paths as the float `Experts`,
or, when the matrices compute in their own way (the W4A16 kernels `kernels.fuse` puts here, or
SmoothQuant's W8A8, which also rounds the activations), calls each hit expert's modules on its tokens.

Every method of `quantize` covers the experts. Round-to-nearest and NF4 look at the weights only.
The calibrated methods look at the tokens the router sent to each expert (`ExpertInputs`): GPTQ
builds each expert's Hessian from them, AWQ scales and clips each expert against them, and an
expert that calibration never reached is rounded to nearest. AWQ and SmoothQuant fold one scale
into the norm that feeds the router and every expert; the router's columns take the same scale
and it stays in float, so the routing does not change.

    quantize(moe_model, QuantConfig(bits=4, group_size=32))   # linears and experts alike
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.dispatch import DispatchChoice, hit_experts, loop_dispatch


def is_stacked_experts(module: nn.Module) -> bool:
    """A float experts module in Mixtral's layout: `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)
    as 3-D tensors (transformers' Mixtral and Qwen3-MoE experts, and lesson 07's `Experts`)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and gate_up.shape[0] == down.shape[0] and gate_up.shape[2] == down.shape[1]
            and gate_up.shape[1] == 2 * down.shape[2])


def stacked_expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every float experts module's stacked weights in the decoder layers (`...mlp.experts.gate_up_proj`,
    `...down_proj`, 3-D) by full name: what `prune` and `lowrank.factorize` leave dense and report."""
    from .calibrate import decoder_layers

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{i}.{n}.{w}": getattr(m, w) for i, layer in enumerate(layers)
            for n, m in layer.named_modules() if is_stacked_experts(m) for w in ("gate_up_proj", "down_proj")}


def activation(module: nn.Module):
    """The experts' activation: transformers' `act_fn`, lesson 07's `act`, else SiLU."""
    return getattr(module, "act_fn", None) or getattr(module, "act", None) or F.silu


def _linear_class(cfg):
    """The module one expert matrix becomes: NF4Linear for nf4, W8A8Linear for smoothquant (its
    activations are rounded to int8 too), else QuantLinear."""
    from .linear import QuantLinear
    from .nf4 import NF4Linear
    from .smoothquant import W8A8Linear

    return {"nf4": NF4Linear, "smoothquant": W8A8Linear}.get(cfg.method, QuantLinear)


def _dequantizes(module: nn.Module) -> bool:
    """True for a module whose forward is just "dequantize the weight, then F.linear": the experts
    can then be dequantized up front and run through any dispatch path with the same result."""
    from .linear import QuantLinear
    from .nf4 import NF4Linear

    return type(module) in (QuantLinear, NF4Linear)


def as_linear(w: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` (no bias) holding the (out, in) matrix `w`, not a copy: what the `from_linear`
    constructors of the quantized modules take."""
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(w.detach(), requires_grad=False)
    return linear


@torch.no_grad()
def quantize_matrix(w: torch.Tensor, cfg, H: torch.Tensor | None = None) -> nn.Module:
    """One (out, in) weight as a quantized module of `cfg`'s format: GPTQ with the input Hessian H
    when given, else round-to-nearest (NF4's codebook for method "nf4", int8 per output channel for
    "smoothquant")."""
    from .gptq import gptq_quantize
    from .linear import QuantLinear
    from .primitives import quantize as quantize_tensor

    if cfg.method in ("nf4", "smoothquant"):
        return _linear_class(cfg).from_linear(as_linear(w), cfg)
    if H is not None:
        qt = gptq_quantize(w, H, cfg.bits, cfg.group_size, cfg.symmetric, cfg.damp, act_order=cfg.act_order)
    else:
        qt = quantize_tensor(w, cfg.bits, cfg.granularity, cfg.symmetric)
    return QuantLinear.from_qtensor(qt, cfg)


class QuantExperts(DispatchChoice, nn.Module):
    """E SwiGLU experts whose weights are quantized: `gate_up_proj[e]` (H -> 2I) and `down_proj[e]`
    (I -> H) are `QuantLinear` / `NF4Linear` modules. Called like `Experts`: (x, experts, weights)."""
    quantized = True  # quantize() refuses a model that holds one; save_quantized records it

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, cfg, dispatch: str = "sorted",
                 device=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size, self.cfg = (num_experts, hidden_size,
                                                                                 intermediate_size, cfg)
        make = _linear_class(cfg)
        self.gate_up_proj = nn.ModuleList(make(hidden_size, 2 * intermediate_size, cfg, device=device)
                                          for _ in range(num_experts))
        self.down_proj = nn.ModuleList(make(intermediate_size, hidden_size, cfg, device=device)
                                       for _ in range(num_experts))
        self.act = F.silu
        self.dispatch = dispatch

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module, cfg, hessians: dict | None = None, make=None) -> QuantExperts:
        """Quantize a float experts module (`is_stacked_experts`). `hessians`: {("gate_up_proj", e) or
        ("down_proj", e): H} for GPTQ; an expert without one is rounded to nearest. `make(w)`, if given,
        builds each matrix's module instead (QAT's `FakeQuantLinear`)."""
        if not is_stacked_experts(experts):
            raise ValueError(f"{type(experts).__name__} does not hold stacked gate_up_proj / down_proj experts")
        E, two_i, H = experts.gate_up_proj.shape
        dispatch = getattr(experts, "dispatch", "sorted")
        with torch.device("meta"):   # the empty modules are replaced at once by the quantized ones
            q = cls(E, H, two_i // 2, cfg, dispatch)
        hessians = hessians or {}
        for e in range(E):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(experts, name)[e]
                getattr(q, name)[e] = quantize_matrix(w, cfg, hessians.get((name, e))) if make is None else make(w)
        q.act = activation(experts)
        return q

    def stacked(self, dtype=torch.float32, only=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The float weights, (E, 2I, H) and (E, H, I); with `only` (expert ids), the others are zeros
        and are not dequantized."""
        ids = range(self.num_experts) if only is None else only
        dev = self.down_proj[0].qweight.device
        gate_up = torch.zeros(self.num_experts, 2 * self.intermediate_size, self.hidden_size, dtype=dtype, device=dev)
        down = torch.zeros(self.num_experts, self.hidden_size, self.intermediate_size, dtype=dtype, device=dev)
        for e in ids:
            gate_up[e] = self.gate_up_proj[e].dequantized_weight(dtype)
            down[e] = self.down_proj[e].dequantized_weight(dtype)
        return gate_up, down

    @property
    def calls_modules(self) -> bool:
        """Whether the forward calls each hit expert's modules instead of dequantizing the weights up
        front: so for modules that compute in their own way, such as the W4A16 / W8A16 kernels that
        `kernels.fuse` puts here (they read the packed codes) or W8A8 (it rounds the activations too)."""
        return not all(_dequantizes(m) for m in (self.gate_up_proj[0], self.down_proj[0]))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Only the experts this batch uses are touched: at decode that is k of E.
        hit = hit_experts(experts, self.num_experts)
        if self.calls_modules:   # each of them runs its own modules on its tokens
            return loop_dispatch(x, experts, weights, self.gate_up_proj, self.down_proj, self.act, only=hit)
        gate_up, down = self.stacked(x.dtype, hit)
        return self._fn(x, experts, weights, gate_up, down, self.act)

    def to_float(self, dtype=torch.float32) -> nn.Module:
        """lesson 07's float `Experts` holding the dequantized weights (ONNX export traces those)."""
        from ..moe.layer import Experts

        with torch.device("meta"):
            out = Experts(self.num_experts, self.hidden_size, self.intermediate_size, self.dispatch)
        gate_up, down = self.stacked(dtype)
        out.gate_up_proj, out.down_proj = nn.Parameter(gate_up), nn.Parameter(down)
        out.act = self.act
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"{self.gate_up_proj[0].extra_repr().split(', ', 2)[-1]}, dispatch={self.dispatch!r}")


def expert_targets(model: nn.Module, cfg) -> list[tuple[str, nn.Module]]:
    """The (name, float experts module) pairs `quantize` replaces: every stacked-experts module that
    `cfg.skip` does not match, each shape checked first (as `targets` does for linears)."""
    from .linear import shape_problem

    found = [(name, m) for name, m in model.named_modules()
             if is_stacked_experts(m) and not any(re.search(p, name) for p in cfg.skip)]
    for name, m in found:
        E, two_i, H = m.gate_up_proj.shape
        for what, (out_f, in_f) in (("gate_up_proj", (two_i, H)), ("down_proj", (H, two_i // 2))):
            why = shape_problem(out_f, in_f, cfg)
            if why:
                raise ValueError(f"cannot quantize {name}.{what} ({E} experts of {out_f}x{in_f}) with "
                                 f"{cfg.method} {cfg.bits}-bit: {why}. Nothing was changed; leave the experts in "
                                 "float with cfg.skip (a regex such as 'experts')")
    return found


class ExpertInputs:
    """What each expert's two matrices read, for calibration: a forward hook on a float experts module
    (called with (x, experts, weights)) that calls observe(("gate_up_proj", e), rows) with the hidden
    states the router sent to expert e, and observe(("down_proj", e), act(gate) * up) with that expert's
    down-projection inputs. Experts no token reached are not observed."""

    def __init__(self, observe):
        self.observe = observe

    def __call__(self, module: nn.Module, args, output) -> None:
        x, chosen = args[0], args[1]
        x = x.reshape(-1, x.shape[-1])
        act = activation(module)
        for e in range(module.gate_up_proj.shape[0]):
            rows = (chosen == e).any(dim=-1)
            if not rows.any():
                continue
            xe = x[rows].float()
            gate, up = F.linear(xe, module.gate_up_proj[e].float()).chunk(2, dim=-1)
            self.observe(("gate_up_proj", e), xe)
            self.observe(("down_proj", e), act(gate) * up)


class ExpertHessians(ExpertInputs):
    """GPTQ's statistic per expert: H = 2 X^T X / n over the rows the router sent to expert e, for its
    gate_up projection (the hidden states) and its down projection (act(gate) * up of those rows)."""

    def __init__(self):
        from .calibrate import HessianAccumulator

        super().__init__(HessianAccumulator())

    @property
    def H(self) -> dict:
        return self.observe.H
