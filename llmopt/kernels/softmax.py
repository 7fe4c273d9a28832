"""Row softmax with the online normaliser (Milakov & Gimelshein, 2018): kernel, reference, wrapper.

The safe softmax, exp(x - max) / sum(exp(x - max)), is three passes over a row: one for the max,
one for the sum of exponentials, one to write the result. Eager PyTorch on a bf16 row with the
float32 round trip (`x.float()`, softmax, `.to(bf16)`) is three kernels and moves ~20 bytes per
element. The online softmax merges the first two passes: a running max m and a running sum d,
with d rescaled by exp(m_old - m_new) whenever a block raises the max, so the row is read twice
(2 + 2 bytes in bf16) and written once (2 bytes): 6 bytes per element, with no float32 copy in
memory. A row that fits in one block could be read once (Triton's tutorial 02 does that); the
looped form takes any row length: attention scores over a long context do not fit in registers.
FlashAttention is this same trick, carried one step further into the product with V.

-inf entries (masked attention scores) give exactly 0. A row that is entirely -inf gives nan, as
torch.softmax does (0 / 0): mask at least one score per row.
"""
from __future__ import annotations

import torch

from .common import check_block, compiler_opaque, next_power_of_2, output_buffer, tl, triton, use_triton


def softmax_reference(x):
    """Softmax over the last dim, computed in float32, rounded to x's dtype."""
    return torch.softmax(x.float(), -1).to(x.dtype)


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, N, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    # pass 1: running max m and running sum d = sum(exp(x - m)) over the blocks seen so far
    m = float("-inf")
    d = 0.0
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < N, other=float("-inf")).to(tl.float32)  # tail: exp(-inf) = 0
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while every score so far is -inf, shift by 0 instead: exp(-inf - -inf) would be nan, and a
        # leading run of masked scores (a causal mask's) must not poison the blocks after it
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    # pass 2: normalise. An all -inf row has d = 0 here and gives 0 / 0 = nan, as torch does.
    shift = tl.where(m == float("-inf"), 0.0, m)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.exp(x - shift) / d
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_args(x) -> None:
    """What every backend takes, checked before one is picked: the softmax of integers would round
    every probability to 0 (or 1)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor (..., N), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


@compiler_opaque
def softmax_triton(x, out=None, block=None):
    """The kernel; same contract as `softmax_reference`. `block`: columns per loop step (a power of 2)."""
    _check_args(x)
    N = x.shape[-1]
    out = output_buffer(out, x)
    block = check_block(block or min(next_power_of_2(N), 4096))
    if x.numel():
        if x.stride(-1) != 1:
            x = x.contiguous()
        try:
            x2 = x.view(-1, N)  # rows may be strided
        except RuntimeError:
            x2 = x.reshape(-1, N)
        o2 = out.view(-1, N)
        _softmax_kernel[(x2.shape[0],)](x2, o2, N, x2.stride(0), o2.stride(0), BLOCK=block,
                                        num_warps=min(max(block // 256, 1), 8))
    return out


def softmax(x, backend: str = "auto"):
    """Softmax over the last dim.

    backend: "triton" (the kernel), "torch" (the reference), "auto" (the kernel on a GPU)."""
    _check_args(x)
    if use_triton(x, backend):
        return softmax_triton(x)
    return softmax_reference(x)
