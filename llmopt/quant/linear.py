"""Weight-only quantized linear layers, and `quantize(model, config)` that swaps them in.

`QuantLinear` holds integer codes (packed two to a byte for INT4, four for INT2), one float16
scale per output channel or per group, and (zero-point schemes) one uint8 zero per scale.
Its forward dequantizes the weight and runs an ordinary matmul in the activations' dtype:
W8A16 / W4A16. That saves memory everywhere; it saves time only where a kernel reads the
packed bytes directly (lesson 08) — on a CPU, dequantizing every call costs time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from . import packing
from .primitives import UNIFORM_BITS, from_codes
from .primitives import quantize as quantize_tensor


@dataclass
class QuantConfig:
    bits: int = 8
    group_size: int | None = None   # None: one scale per output channel
    symmetric: bool = True
    skip: tuple = ("lm_head",)      # regexes of module names left in float (embeddings are not Linear)
    method: str = "rtn"             # round-to-nearest; GPTQ/AWQ arrive with lesson 02

    def __post_init__(self):
        if self.bits not in UNIFORM_BITS:
            raise ValueError(f"bits must be one of {UNIFORM_BITS}, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be None (per channel) or a positive int, got {self.group_size!r}")
        if self.method != "rtn":
            raise ValueError(f"method must be 'rtn' (so far), got {self.method!r}")

    @property
    def granularity(self):
        return "channel" if self.group_size is None else self.group_size


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W stored as `bits`-bit codes and per-group scales."""

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


def quantize(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Swap every `nn.Linear` not matched by `cfg.skip` for a `QuantLinear`, in place."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized; quantize a fresh copy of the float model")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(re.search(p, name) for p in cfg.skip)]
    if not targets:
        raise ValueError(f"no nn.Linear left to quantize (skip={cfg.skip})")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, cfg))
    return model
