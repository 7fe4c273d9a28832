"""Weight-only quantized linear layers, and `quantize(model, config)` that swaps them in.

`QuantLinear` holds integer codes (packed two to a byte for INT4, four for INT2), one float16
scale per output channel or per group, and (zero-point schemes) one uint8 zero per scale.
Its forward dequantizes the weight and runs an ordinary matmul in the activations' dtype:
W8A16 / W4A16. That saves memory everywhere; it saves time only where a kernel reads the
packed bytes directly (lesson 08) — on a CPU, dequantizing every call costs time.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import packing
from .primitives import UNIFORM_BITS, from_codes
from .primitives import quantize as quantize_tensor

METHODS = ("rtn", "gptq", "awq", "nf4", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")  # these need calibration batches


@dataclass
class QuantConfig:
    """How to quantize: the storage format (bits, group_size, symmetric) and the algorithm
    that picks the codes (method). One config describes every method of lessons 01-02."""
    bits: int = 8
    group_size: int | None = None   # None: one scale per output channel (nf4: the block size, default 64)
    symmetric: bool = True
    skip: tuple = ("lm_head",)      # regexes of module names left in float (embeddings are not Linear)
    method: str = "rtn"             # one of METHODS
    damp: float = 0.01              # gptq: dampening, a fraction of the mean Hessian diagonal
    act_order: bool = False         # gptq: visit columns by decreasing activation energy
    double_quant: bool = False      # nf4: quantize the block scales too (8-bit, blocks of 256)
    alpha: float = 0.5              # smoothquant: migration strength
    calib_batch_size: int = 8       # calibrated methods: samples per forward pass

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "nf4" and self.bits != 4:
            raise ValueError(f"method 'nf4' stores 4 bits, got bits={self.bits!r}")
        if self.method == "smoothquant" and (self.bits, self.group_size, self.symmetric) != (8, None, True):
            raise ValueError("method 'smoothquant' is W8A8 with symmetric per-channel weights: bits=8, "
                             f"group_size=None, symmetric=True; got {self.bits!r}, {self.group_size!r}, "
                             f"{self.symmetric!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral) or self.bits not in UNIFORM_BITS:
            raise ValueError(f"bits must be one of {UNIFORM_BITS}, got {self.bits!r}")
        self.bits = int(self.bits)   # a numpy integer from a sweep: a plain int, as quant_config.json stores it
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"group_size must be None (per channel) or a positive int, got {self.group_size!r}")
        self.skip = _check_skip(self.skip)
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.calib_batch_size < 1:
            raise ValueError(f"calib_batch_size must be >= 1, got {self.calib_batch_size!r}")

    @property
    def granularity(self):
        return "channel" if self.group_size is None else self.group_size


def _check_skip(skip) -> tuple:
    """`skip` as a tuple of regexes; a bare string would be read one character at a time."""
    if isinstance(skip, str) or not isinstance(skip, (tuple, list)) or not all(isinstance(p, str) for p in skip):
        raise ValueError(f"skip must be a tuple of regular expressions of module names (e.g. ('lm_head',)), "
                         f"got {skip!r}")
    for p in skip:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"skip holds {p!r}, which is not a regular expression: {e}") from None
    return tuple(skip)


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W stored as `bits`-bit codes and per-group scales."""
    quantized = True  # every llmopt quantized module says so: quantize() refuses to run twice

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        n_groups = 1 if cfg.group_size is None else in_features // cfg.group_size
        code_cols = in_features * cfg.bits // 8 if cfg.bits in (2, 4) else in_features
        code_dtype = torch.uint8 if cfg.bits in (2, 4) or not cfg.symmetric else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, code_cols, dtype=code_dtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", None if cfg.symmetric else
                             torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> QuantLinear:
        """Round-to-nearest quantization of an `nn.Linear`."""
        qt = quantize_tensor(linear.weight, cfg.bits, cfg.granularity, cfg.symmetric)
        return cls.from_qtensor(qt, cfg, linear.bias)

    @classmethod
    @torch.no_grad()
    def from_qtensor(cls, qt, cfg: QuantConfig, bias: torch.Tensor | None = None) -> QuantLinear:
        """Hold codes made by any algorithm (RTN, GPTQ, ...) in the packed layout."""
        out_f, in_f = qt.shape
        if (qt.bits, qt.granularity, qt.zero is None) != (cfg.bits, cfg.granularity, cfg.symmetric):
            raise ValueError(f"codes ({qt.bits} bits, {qt.granularity}) do not match the config {cfg}")
        if cfg.bits in (2, 4) and in_f % (8 // cfg.bits):
            raise ValueError(f"in_features {in_f} cannot be packed {8 // cfg.bits} codes to a byte")
        m = cls(in_f, out_f, cfg, bias=bias is not None, device=qt.q.device)
        codes = qt.q
        if cfg.bits in (2, 4):
            codes = packing.pack(packing.to_unsigned(codes, cfg.bits) if cfg.symmetric else codes, cfg.bits)
        m.qweight.copy_(codes)
        m.scales.copy_(qt.scale.reshape(m.scales.shape))
        if qt.zero is not None:
            m.zeros.copy_(qt.zero.reshape(m.zeros.shape))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    def codes(self) -> torch.Tensor:
        """The integer codes, unpacked: int16, shape (out_features, in_features)."""
        c = self.qweight
        if self.cfg.bits in (2, 4):
            c = packing.unpack(c, self.cfg.bits).to(torch.int16)
            return c - 2 ** (self.cfg.bits - 1) if self.cfg.symmetric else c
        return c.to(torch.int16)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        c = self.codes().float().reshape(self.out_features, self.scales.shape[1], -1)
        zero = None if self.zeros is None else self.zeros.float()[..., None]
        w = from_codes(c, self.scales.float()[..., None], zero)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        g = "channel" if self.cfg.group_size is None else f"group {self.cfg.group_size}"
        kind = "symmetric" if self.cfg.symmetric else "zero-point"
        return f"in={self.in_features}, out={self.out_features}, int{self.cfg.bits} {kind}, per {g}"


def targets(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs that `quantize` replaces: all but those `cfg.skip` matches."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not any(re.search(p, name) for p in cfg.skip)]
    if not found:
        from .experts import expert_targets

        if not expert_targets(model, cfg):   # an MoE model's experts alone are enough
            raise ValueError(f"no nn.Linear (or Mixture-of-Experts experts) left to quantize (skip={cfg.skip})")
    for name, m in found:   # every shape is checked before any module is swapped
        why = shape_problem(m.out_features, m.in_features, cfg)
        if why:
            raise ValueError(f"cannot quantize {name} ({m.out_features}x{m.in_features}) with {cfg.method} "
                             f"{cfg.bits}-bit: {why}. Nothing was changed; pick a size that fits, or leave "
                             "such layers in float (cfg.skip takes regexes of module names)")
    return found


def shape_problem(out_features: int, in_features: int, cfg: QuantConfig) -> str | None:
    """Why a (out x in) weight cannot be stored in `cfg`'s format, or None. Low-rank factors
    (lesson 06) and structurally pruned layers (lesson 04) are where odd sizes come from."""
    if cfg.method == "nf4":
        block, n = cfg.group_size or 64, out_features * in_features
        if n % block or block % 2:
            return f"the NF4 block size {block} must be even and divide its {n} weights"
        return None
    if cfg.group_size is not None and in_features % cfg.group_size:
        return f"group_size {cfg.group_size} does not divide in_features {in_features}"
    if cfg.bits in (2, 4) and in_features % (8 // cfg.bits):
        return f"{cfg.bits}-bit codes are packed {8 // cfg.bits} to a byte along in_features ({in_features})"
    return None


def _warn_left_in_float(model: nn.Module, cfg: QuantConfig) -> None:
    """Warn when much of the decoder's weight is in matrices this call leaves in float without being
    asked to (cfg.skip): held by modules it does not know, so "W4" would quietly keep much of the
    model in float. Every method quantizes nn.Linear modules and Mixture-of-Experts experts."""
    import warnings

    from .calibrate import decoder_layers
    from .experts import is_stacked_experts

    try:
        layers = decoder_layers(model)
    except ValueError:
        return
    seen = {id(p) for m in layers.modules() if isinstance(m, nn.Linear) or is_stacked_experts(m)
            for p in m.parameters()}
    matrices = [p for p in layers.parameters() if p.dim() >= 2]
    outside = sum(p.numel() for p in matrices if id(p) not in seen)
    total = sum(p.numel() for p in matrices)
    if total and outside > 0.1 * total:
        warnings.warn(f"{outside / total:.0%} of the decoder layers' weights ({outside / 1e6:.2f}M) stay in float: "
                      f"{cfg.method} quantizes nn.Linear modules and Mixture-of-Experts experts (gate_up_proj / "
                      "down_proj stacks) only", stacklevel=3)


def quantize(model: nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None) -> nn.Module:
    """Swap every `nn.Linear` not matched by `cfg.skip` for a quantized module, in place, and a
    Mixture-of-Experts layer's experts too (`QuantExperts`).

    rtn and nf4 look at the weights only; gptq, awq and smoothquant also need `calibration`,
    token ids (n_samples, seq_len) from the train split: `llmopt.data.calibration_batches(tok)`.
    """
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    if any(getattr(m, "quantized", False) for m in model.modules()):
        raise ValueError("this model is already quantized; quantize a fresh copy of the float model")
    _warn_left_in_float(model, cfg)
    if cfg.method in CALIBRATED:
        from .calibrate import check_calibration

        calibration = check_calibration(calibration, model)
    if cfg.method == "gptq":
        from .gptq import gptq_model

        return gptq_model(model, calibration, cfg)
    if cfg.method == "awq":
        from .awq import awq_model

        return awq_model(model, calibration, cfg)
    if cfg.method == "smoothquant":
        from .smoothquant import smoothquant_model

        return smoothquant_model(model, calibration, cfg)
    from .calibrate import replace
    from .experts import QuantExperts, expert_targets

    make = QuantLinear.from_linear
    if cfg.method == "nf4":
        from .nf4 import NF4Linear

        make = NF4Linear.from_linear
    linears, experts = targets(model, cfg), expert_targets(model, cfg)   # every shape checked first
    for name, linear in linears:
        replace(model, name, make(linear, cfg))
    for name, module in experts:
        replace(model, name, QuantExperts.from_experts(module, cfg))
    return model
