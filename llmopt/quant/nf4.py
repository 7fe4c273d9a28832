"""NF4 weight-only linear layers, with QLoRA's double quantization of the block scales.

NF4 (Dettmers et al., 2023) cuts a weight, flattened, into blocks of 64 values, divides each
block by its absmax and stores, per value, the index of the nearest of 16 normal quantiles
(`nf4_codebook`). Codes cost 4 bits; one float32 absmax per 64 values costs 32 / 64 = 0.5
more, so 4.5 bits per weight.

Double quantization shrinks that 0.5: the absmax values are themselves quantized to 8 bits.
As in bitsandbytes (`quantize_4bit(..., compress_statistics=True)`), their mean is subtracted
first (absmax is all positive, so centring it puts the values on both sides of zero where a
signed code spends its levels), then the rest is quantized in blocks of 256 with the 8-bit
"dynamic" map (a sign, a decimal exponent and a linear fraction: fine steps near zero,
coarse ones near one) and one float32 scale per block. Cost: 8/64 + 32/(64*256) = 0.127 bits
per weight, about 4.127 in all. Layouts are llmopt's own (two codes per byte, low nibble
first, via `packing.pack`); the values they decode to match bitsandbytes' within rounding.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import packing
from .primitives import dequantize_nf4, quantize_nf4

DQ_BLOCK = 256  # bitsandbytes' block size for the nested (absmax) quantization


def dynamic_map(device=None) -> torch.Tensor:
    """The 256 values of the signed 8-bit dynamic type (Dettmers, 2015), sorted, float32.

    For each decade 10^-6 ... 10^0 (the exponent e = 0..6), 2^e values: the midpoints of
    2^e equal steps over [0.1, 1], times 10^(e-6), with both signs; plus 0 and 1. Small
    magnitudes still get a level (down to ~1e-6), while most of the 256 levels go to the
    top decades, where the largest values of a block live."""
    return _dynamic_map().to(device, copy=True)


@functools.cache
def _dynamic_map() -> torch.Tensor:
    parts = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        parts += [mids, -mids]
    values = torch.cat(parts).sort().values
    assert values.numel() == 256
    return values


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each x (ties go to the lower
    index). Binary search, so memory stays O(len(x)) whatever the codebook size."""
    lo = (torch.searchsorted(code, x.contiguous(), right=True) - 1).clamp(0, code.numel() - 2)
    up = (x - code[lo + 1]).abs() < (x - code[lo]).abs()
    return (lo + up.long()).to(torch.uint8)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x (1-D) as rows of `block_size`, the last one zero-padded: (n_blocks, block_size)."""
    pad = -x.numel() % block_size
    return nn.functional.pad(x, (0, pad)).reshape(-1, block_size)


def double_quantize(absmax: torch.Tensor, block_size: int = DQ_BLOCK):
    """8-bit quantize the NF4 block scales: (codes uint8, scales float32, offset float32 0-d).

    offset is the mean of all of `absmax`; `absmax - offset` is cut into blocks of
    `block_size` (the last may be shorter), each scaled by its absmax into [-1, 1] and
    rounded to the nearest `dynamic_map` value."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    a = absmax.detach().float().reshape(-1)
    offset = a.mean()
    centred = a - offset
    blocks = _blocks(centred, block_size)
    scales = blocks.abs().amax(dim=1)
    normed = (blocks / scales.clamp(min=1e-30)[:, None]).reshape(-1)[: a.numel()]
    codes = _nearest(normed, _dynamic_map().to(a.device))
    return codes.reshape(absmax.shape), scales, offset


def double_dequantize(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor,
                      block_size: int = DQ_BLOCK) -> torch.Tensor:
    """Inverse of `double_quantize`: the float32 absmax values, shape of `codes`."""
    values = _dynamic_map().to(codes.device)[codes.reshape(-1).long()]
    blocks = _blocks(values, block_size) * scales.float()[:, None]
    return (blocks.reshape(-1)[: codes.numel()] + offset.float()).reshape(codes.shape)


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T + b with W stored as packed NF4 codes and per-block absmax
    (float32, or with `cfg.double_quant` 8-bit codes + per-256 float32 scales + an offset)."""
    quantized = True  # every llmopt quantized module says so: quantize() refuses to run twice

    def __init__(self, in_features: int, out_features: int, cfg, bias: bool = False, device=None):
        super().__init__()
        block = cfg.group_size or 64
        if cfg.bits != 4:
            raise ValueError(f"NF4Linear stores 4-bit codes: cfg.bits must be 4, got {cfg.bits!r}")
        n = in_features * out_features
        if n % block or block % 2:
            raise ValueError(f"the NF4 block size (cfg.group_size={cfg.group_size!r}, used: {block}) must be "
                             f"even and divide the weight's {out_features}x{in_features}={n} elements")
        self.in_features, self.out_features, self.cfg, self.block_size = in_features, out_features, cfg, block
        n_blocks = n // block
        self.register_buffer("qweight", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        if cfg.double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scales", torch.ones(-(n_blocks // -DQ_BLOCK), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.ones(n_blocks, device=device))
            self.register_buffer("absmax_scales", None)
            self.register_buffer("absmax_offset", None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg) -> NF4Linear:
        """NF4-quantize an `nn.Linear` (nearest codebook value per weight, ties to the lower)."""
        m = cls(linear.in_features, linear.out_features, cfg, bias=linear.bias is not None,
                device=linear.weight.device)
        codes, absmax = quantize_nf4(linear.weight, m.block_size)
        m.qweight.copy_(packing.pack(codes.reshape(-1), 4))
        if cfg.double_quant:
            acodes, scales, offset = double_quantize(absmax)
            m.absmax.copy_(acodes)
            m.absmax_scales.copy_(scales)
            m.absmax_offset.copy_(offset)
        else:
            m.absmax.copy_(absmax)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of each NF4 block (decoded first when double-quantized)."""
        if self.cfg.double_quant:
            return double_dequantize(self.absmax, self.absmax_scales, self.absmax_offset)
        return self.absmax

    def codes(self) -> torch.Tensor:
        """The NF4 indices, unpacked: uint8 in [0, 16), shape (out_features, in_features)."""
        return packing.unpack(self.qweight, 4).reshape(self.out_features, self.in_features)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.codes(), self.block_absmax(), self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        dq = ", double-quantized absmax (8-bit, blocks of 256)" if self.cfg.double_quant else ""
        return f"in={self.in_features}, out={self.out_features}, nf4, block {self.block_size}{dq}"
