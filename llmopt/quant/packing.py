"""Bit packing: several low-bit codes per byte, with an exact round trip.

INT4 puts two codes in a byte (element 2i in the low nibble, 2i+1 in the high one);
INT2 puts four (element 4i in the lowest two bits). Codes are unsigned: shift signed codes
by 2^(bits-1) first (`to_unsigned`). The packed dimension is the last one.
"""
from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def _check(bits: int):
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS} to pack into bytes, got {bits!r}")


def to_unsigned(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-2^(b-1), 2^(b-1)) -> unsigned [0, 2^b) as uint8."""
    return (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)


def to_signed(u: torch.Tensor, bits: int) -> torch.Tensor:
    return (u.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2^bits) along the last dim into uint8 bytes."""
    _check(bits)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {per_byte} "
                         f"to pack {bits}-bit codes")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing (see to_unsigned)")
    c = codes.to(torch.uint8)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per_byte, per_byte)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=c.device)
    for i in range(per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 bytes -> unsigned codes, last dim times 8 // bits."""
    _check(bits)
    per_byte = 8 // bits
    mask = 2**bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
