"""Quantization-aware training (QAT): fine-tune the model *through* the rounding it will get.

PTQ rounds a trained model once and hopes; at 2-3 bits the errors of thousands of weights
add up and nothing downstream was trained to absorb them. QAT keeps the float weights,
quantizes them on the fly in every forward pass ("fake quantization", in the exact format
`QuantLinear` stores), and lets the loss see the quantized model. Rounding has zero gradient
almost everywhere, so the backward pass pretends it was the identity: the straight-through
estimator (STE; Bengio et al., 2013). The float weights then drift until their *rounded*
values do the job.

    prepare_qat(model, QuantConfig(bits=2, group_size=64))   # nn.Linear -> FakeQuantLinear
    qat_finetune(model, tokenizer, steps=200)                # a short fine-tune on the train split
    convert(model)                                           # FakeQuantLinear -> QuantLinear (real bits)

A Mixture-of-Experts model's experts (lesson 07) train the same way: each expert matrix becomes a
`FakeQuantLinear` inside a `QuantExperts`, called on the tokens routed to that expert.

`learn_scales=True` also trains each group's scale, as LSQ does (Esser et al., 2020): the
scale gets a gradient from every weight of its group, through the rounding (STE) and the
clamp, scaled by 1/sqrt(n * qmax) so it moves at the same pace as the weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import replace
from .linear import QuantConfig, QuantLinear, targets
from .primitives import QTensor, _groups, from_codes, qrange, scale_zero

_MIN_SCALE = 2.0**-24  # the smallest float16 > 0: a scale QuantLinear can store without becoming 0


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, gradient 1 in the backward pass (straight-through).

    `x + (round(x) - x).detach()` has the value round(x) (to the bit: x and round(x) are
    within a factor 2 of each other, or round(x) is 0, so their difference is exact) and,
    since the detached part is a constant, the gradient of x."""
    return x + (torch.round(x) - x).detach()


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` forward, the gradient of `x` backward (used to store scales as float16)."""
    return x + (value - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward, gradient multiplied by `factor` backward (LSQ's gradient scaling)."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())  # the value of x, to the bit


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """(clamp(round(w / s) + z, qmin, qmax) - z) * s, differentiable (symmetric when zero is None).

    `w` is grouped like `primitives._groups` gives it, (rows, n_groups, group), and `scale`
    (and `zero`) broadcast against it, (rows, n_groups, 1). Gradients (LSQ, eq. 3-5):
    to w, 1 inside the range and 0 where the clamp bites; to the scale, round(w/s) - w/s
    inside the range and qmin - z or qmax - z where clamped."""
    qmin, qmax = qrange(bits, zero is None)
    q = ste_round(w / scale)
    q = torch.clamp(q if zero is None else q + zero, qmin, qmax)
    return from_codes(q, scale, zero)


class FakeQuantLinear(nn.Module):
    """An nn.Linear whose float weight is quantized on the fly, in QuantLinear's format.

    Its output equals that of the `QuantLinear` that `convert` makes from it, to the bit:
    scales are rounded to float16 (as QuantLinear stores them) before use."""
    quantized = True  # quantize() must not quantize a QAT model: convert() it instead

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False,
                 device=None, learn_scales: bool = False):
        super().__init__()
        if not isinstance(cfg, QuantConfig) or cfg.method != "rtn":
            raise ValueError("cfg must be a QuantConfig with method='rtn' (QAT picks the codes by training; "
                             f"bits, group_size and symmetric set the format), got {cfg!r}")
        if cfg.group_size is not None and in_features % cfg.group_size:
            raise ValueError(f"group_size {cfg.group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        self.learn_scales = learn_scales
        n_groups = 1 if cfg.group_size is None else in_features // cfg.group_size
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # learned scales (LSQ) are parameters; the zero point stays where absmax put it
        self.scale = nn.Parameter(torch.ones(out_features, n_groups, device=device)) if learn_scales else None
        self.register_buffer("zero", torch.zeros(out_features, n_groups, device=device)
                             if learn_scales and not cfg.symmetric else None)
        _, qmax = qrange(cfg.bits, cfg.symmetric)
        self.grad_factor = 1.0 / math.sqrt(in_features // n_groups * qmax)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig, learn_scales: bool = False) -> FakeQuantLinear:
        """Start from the float layer; learned scales start at the absmax (min/max) ones."""
        m = cls(linear.in_features, linear.out_features, cfg, linear.bias is not None,
                device=linear.weight.device, learn_scales=learn_scales)
        m.weight.copy_(linear.weight.float())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.float())
        if learn_scales:
            s, z = scale_zero(_groups(m.weight, cfg.granularity), cfg.bits, cfg.symmetric)
            m.scale.copy_(s.squeeze(-1))
            if z is not None:
                m.zero.copy_(z.squeeze(-1))
        return m

    def scale_zero(self, groups: torch.Tensor):
        """(scale, zero) as used: learned, or absmax of the current weights (no gradient),
        rounded to float16 the way QuantLinear will store them. Shapes (rows, n_groups, 1)."""
        if self.learn_scales:
            s = grad_scale(self.scale, self.grad_factor)[..., None]
            z = None if self.zero is None else self.zero[..., None]
        else:
            with torch.no_grad():
                s, z = scale_zero(groups.detach().float(), self.cfg.bits, self.cfg.symmetric)
        s = s.float().clamp(min=_MIN_SCALE)  # a learned scale may try to cross zero
        return _ste(s, s.half().float()), z

    def fake_weight(self) -> torch.Tensor:
        """The weight the quantized layer will compute with (float32, differentiable)."""
        g = _groups(self.weight.float(), self.cfg.granularity)
        s, z = self.scale_zero(g)
        return fake_quant(g, s, z, self.cfg.bits).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.fake_weight().to(x.dtype), bias)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The real thing: codes of the current weights under the current scales."""
        g = _groups(self.weight.float(), self.cfg.granularity)
        s, z = self.scale_zero(g)
        qmin, qmax = qrange(self.cfg.bits, z is None)
        q = torch.round(g / s)
        q = torch.clamp(q if z is None else q + z, qmin, qmax)
        qt = QTensor(q.to(torch.int8 if z is None else torch.uint8).reshape(self.weight.shape), s, z,
                     self.cfg.bits, self.cfg.granularity, tuple(self.weight.shape), torch.float32)
        return QuantLinear.from_qtensor(qt, self.cfg, self.bias)

    def extra_repr(self) -> str:
        g = "channel" if self.cfg.group_size is None else f"group {self.cfg.group_size}"
        kind = "symmetric" if self.cfg.symmetric else "zero-point"
        scales = "learned (LSQ)" if self.learn_scales else "absmax" if self.cfg.symmetric else "min/max"
        return (f"in={self.in_features}, out={self.out_features}, fake int{self.cfg.bits} {kind}, "
                f"per {g}, scales {scales}")


def prepare_qat(model: nn.Module, cfg: QuantConfig, learn_scales: bool = False) -> nn.Module:
    """Swap every targeted `nn.Linear` (all but `cfg.skip`) for a `FakeQuantLinear`, in place, and a
    Mixture-of-Experts layer's experts for a `QuantExperts` holding one per expert matrix."""
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    if cfg.method != "rtn":
        raise ValueError(f"QAT needs cfg.method='rtn' (the uniform format QAT trains for), got {cfg.method!r}")
    if not isinstance(learn_scales, bool):
        raise ValueError(f"learn_scales must be True or False, got {learn_scales!r}")
    if any(getattr(m, "quantized", False) for m in model.modules()):
        raise ValueError("this model is already quantized or prepared for QAT; start from the float model")
    from .experts import QuantExperts, as_linear, expert_targets

    linears, experts = targets(model, cfg), expert_targets(model, cfg)
    for name, linear in linears:
        replace(model, name, FakeQuantLinear.from_linear(linear, cfg, learn_scales))
    for name, module in experts:   # each expert matrix its own FakeQuantLinear, called on its tokens
        replace(model, name, QuantExperts.from_experts(
            module, cfg, make=lambda w: FakeQuantLinear.from_linear(as_linear(w), cfg, learn_scales)))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Swap every `FakeQuantLinear` (an expert's too) for the `QuantLinear` holding its codes, in
    place. The result computes what the fake-quant model computed, from packed integers."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not found:
        raise ValueError("the model has no FakeQuantLinear to convert: call prepare_qat(model, cfg) first")
    for name, m in found:
        replace(model, name, m.to_quant_linear())
    return model


def distillation_loss(teacher: nn.Module, temperature: float = 1.0, kd_weight: float = 1.0):
    """A `train()` loss: kd_weight * T^2 KL(teacher || student) + (1 - kd_weight) * cross-entropy
    (`llmopt.distill.distill_loss_fn`, lesson 05, with alpha named kd_weight).

    The float model as teacher hands the student its whole next-token distribution, not
    just the one true token: more signal per token for the short fine-tune QAT can afford."""
    from ..distill import distill_loss_fn

    if not 0 <= kd_weight <= 1:  # checked here too, to name this function's argument
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight!r}")
    return distill_loss_fn(teacher, temperature, kd_weight)


def qat_finetune(model: nn.Module, tokenizer, steps: int = 200, lr: float = 2e-4, batch_size: int = 8,
                 seq_len: int = 512, warmup: int | None = None, teacher: nn.Module | None = None,
                 temperature: float = 1.0, kd_weight: float = 1.0, seed: int = 0, progress: bool = True,
                 **train_overrides):
    """Fine-tune a `prepare_qat` model on the TRAIN split with `llmopt.train.finetune`; returns
    its `TrainLog`. With `teacher` (the float model) the loss is distillation, else plain
    cross-entropy. Other `TrainConfig` fields (autocast, log_every, threads, ...) pass through."""
    from ..train import finetune, lm_loss

    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("the model has no FakeQuantLinear: call prepare_qat(model, cfg) first")
    loss_fn = lm_loss if teacher is None else distillation_loss(teacher, temperature, kd_weight)
    return finetune(model, tokenizer, steps, lr, batch_size, seq_len, warmup, loss_fn, seed, progress,
                    **train_overrides)
