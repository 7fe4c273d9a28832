"""Quantization primitives: map floats to a few bits and back.

Uniform schemes (the integers are evenly spaced):
- symmetric / absmax: q = round(w / s), s = max|w| / qmax; zero maps to zero by construction.
- asymmetric / zero-point: q = round(w / s) + z, s = (max - min) / (qmax - qmin), z an integer,
  so the range can sit off-centre (e.g. after a ReLU) and zero is still exact.

Granularity (for a 2-D weight of shape (out_features, in_features)): one scale for the whole
tensor ("tensor"), one per output row ("channel"), or one per `group_size` consecutive inputs
of a row (an int: 32, 64, 128, ...). Finer groups follow outliers more closely at the cost of
more scales to store.

Non-uniform: FP8 (e4m3) where torch has the dtype, and NF4 (QLoRA's 16 normal quantiles)
with per-block absmax scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UNIFORM_BITS = (2, 3, 4, 8)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric uses [-(2^(b-1) - 1), 2^(b-1) - 1] (a restricted range,
    so +-max|w| both fit); asymmetric uses [0, 2^b - 1]."""
    if bits not in UNIFORM_BITS:
        raise ValueError(f"bits must be one of {UNIFORM_BITS}, got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _groups(w: torch.Tensor, granularity) -> torch.Tensor:
    """View `w` as (rows, n_groups, group): each scale covers one last-dim slice."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, -1)
    if granularity == "channel":
        return w.reshape(out_f, 1, in_f)
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0:
        if in_f % granularity:
            raise ValueError(f"group_size {granularity} does not divide in_features {in_f}")
        return w.reshape(out_f, in_f // granularity, granularity)
    raise ValueError(f"granularity must be 'tensor', 'channel' or a positive group size, got {granularity!r}")


@dataclass
class QTensor:
    """A quantized 2-D tensor: integer codes plus what it takes to map them back."""
    q: torch.Tensor            # int8 codes, shape of the original (unpacked)
    scale: torch.Tensor        # float32, (rows, n_groups, 1)
    zero: torch.Tensor | None  # int codes of the zero point (asymmetric), same shape as scale
    bits: int
    granularity: object
    shape: tuple
    dtype: torch.dtype         # the original float dtype, restored by dequantize

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def scale_zero(g: torch.Tensor, bits: int, symmetric: bool):
    """Scale (and integer zero point, or None) for each last-dim slice of `g` (float32)."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        return (g.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-12), None
    lo = g.amin(dim=-1, keepdim=True).clamp(max=0)  # the range always holds 0: zero stays exact
    hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)  # an all-zero group: avoid 0/0
    return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


def to_codes(x: torch.Tensor, scale: torch.Tensor, zero, bits: int) -> torch.Tensor:
    """Round to the nearest code: clamp(round(x / s) + z) (float tensor of integers)."""
    qmin, qmax = qrange(bits, zero is None)
    q = torch.round(x / scale)
    return torch.clamp(q if zero is None else q + zero, qmin, qmax)


def from_codes(q: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
    return (q if zero is None else q - zero) * scale


def quantize(w: torch.Tensor, bits: int = 8, granularity="channel", symmetric: bool = True) -> QTensor:
    """Round-to-nearest uniform quantization of a 2-D tensor (computed in float32)."""
    qrange(bits, symmetric)  # validates bits
    g = _groups(w.detach().float(), granularity)
    scale, zero = scale_zero(g, bits, symmetric)
    q = to_codes(g, scale, zero, bits)
    return QTensor(q.to(torch.int8 if symmetric else torch.uint8).reshape(w.shape), scale, zero, bits,
                   granularity, tuple(w.shape), w.dtype)


def dequantize(qt: QTensor) -> torch.Tensor:
    g = _groups(qt.q.float(), qt.granularity)
    return from_codes(g, qt.scale, qt.zero).reshape(qt.shape).to(qt.dtype)


def fake_quantize(w: torch.Tensor, bits: int = 8, granularity="channel", symmetric: bool = True) -> torch.Tensor:
    """quantize then dequantize: the float tensor a quantized layer would really compute with."""
    return dequantize(quantize(w, bits, granularity, symmetric))


# --------------------------------------------------------------------------- FP8

def has_fp8() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def quantize_fp8(w: torch.Tensor, granularity="channel") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with a scale that maps max|w| to e4m3's largest value (448)."""
    if not has_fp8():
        raise ValueError(f"this torch ({torch.__version__}) has no float8_e4m3fn dtype")
    fmax = torch.finfo(torch.float8_e4m3fn).max
    g = _groups(w.detach().float(), granularity)
    scale = (g.abs().amax(dim=-1, keepdim=True) / fmax).clamp(min=1e-12)
    return (g / scale).to(torch.float8_e4m3fn).reshape(w.shape), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity="channel", dtype=torch.float32):
    return (_groups(q.float(), granularity) * scale).reshape(q.shape).to(dtype)


# --------------------------------------------------------------------------- NF4

def nf4_codebook() -> torch.Tensor:
    """QLoRA's NormalFloat-4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact
    zero, 8 positive and 7 negative levels (Dettmers et al., 2023, eq. 4 and appendix)."""
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2: keeps the extreme quantiles finite
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: per block of `block_size` consecutive values (flattened), scale by absmax and
    store the index of the nearest codebook value. Returns (codes uint8 in [0, 16), absmax)."""
    if w.numel() % block_size:
        raise ValueError(f"block_size {block_size} does not divide the tensor's {w.numel()} elements")
    blocks = w.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    code = nf4_codebook().to(w.device)
    idx = ((blocks / absmax)[..., None] - code).abs().argmin(dim=-1)
    return idx.to(torch.uint8).reshape(w.shape), absmax.squeeze(1)


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64, dtype=torch.float32):
    values = nf4_codebook().to(codes.device)[codes.long()].reshape(-1, block_size)
    return (values * absmax[:, None]).reshape(codes.shape).to(dtype)
