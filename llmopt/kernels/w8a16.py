"""W8A16: INT8 weight-only linear layers, with a Triton GEMV for decode.

Decode (a few rows of activations) is memory bound: the time is the weight's bytes over the memory
bandwidth. INT8 codes are half of bf16's bytes, and the kernel dequantizes each tile in registers
after loading it, so the only traffic is the codes (plus one scale per channel or group): up to 2x
faster than a bf16 matmul, where `QuantLinear`'s forward (dequantize to memory, then matmul) is slower
than bf16. Prefill is compute bound: there the weight is read once for many rows, so `w8a16_linear`
dequantizes once and calls the tuned matmul (the reference) rather than a hand-written GEMM.

The storage format is `llmopt.quant.QuantLinear`'s at 8 bits: qweight (N, K) int8 codes (symmetric,
zero 0) or uint8 codes with uint8 zeros (N, n_groups); scales (N, n_groups), n_groups = 1 per channel
or K // group_size; w[n, k] = (code[n, k] - zero[n, g]) * scale[n, g] with g = k // group_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import compiler_opaque, next_power_of_2, pick_config, tl, triton, use_triton
from .w4a16 import GEMV_MAX_M, _check_2d, _check_args, _dequantize, _launch, _output, dequantize_codes

# One byte per code: a step of BLOCK_K codes reads as many bytes as W4's 2 * BLOCK_K; the first runs on CPU.
GEMV_CONFIGS = [
    dict(BLOCK_N=32, BLOCK_K=32, num_warps=4),
    dict(BLOCK_N=32, BLOCK_K=64, num_warps=4),
    dict(BLOCK_N=64, BLOCK_K=64, num_warps=4),
    dict(BLOCK_N=16, BLOCK_K=128, num_warps=4),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=8),
]


def dequantize_int8(qweight, scales, zeros, group_size, dtype=torch.float32) -> torch.Tensor:
    """The (N, K) weight in `dtype`, computed in float32 exactly as `QuantLinear.dequantized_weight`."""
    return dequantize_codes(qweight, scales, zeros, group_size, 0.0, dtype)


def w8a16_reference(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    """Dequantize, then an ordinary matmul in x's dtype."""
    w = dequantize_int8(qweight, scales, zeros, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@triton.jit
def _w8a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G,
                       stride_xm, stride_xk, stride_qn, stride_sn, stride_om, stride_on,
                       HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The W4 GEMV without the nibbles: one program per BLOCK_N columns, all rows, the whole K (no
    # split-K: N / BLOCK_N programs already fill a GPU at a decoder's sizes).
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_mask = col_ok[:, None] & k_ok[None, :]
        codes = tl.load(qw_ptr + cols[:, None] * stride_qn + ks[None, :], mask=w_mask, other=0)  # int8 or uint8
        w = _dequantize(codes, cols[:, None], ks[None, :], w_mask, s_ptr, z_ptr, G, stride_sn, HAS_ZEROS, 0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        # a few rows are too few for tl.dot (16 at least): multiply with broadcasting and sum over k
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:  # in float32 before the one rounding to x's dtype: no second pass over the output
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _gemv(x, qweight, scales, zeros, group_size, bias, out, BLOCK_N, BLOCK_K, num_warps=4):
    grid = (triton.cdiv(out.shape[1], BLOCK_N),)
    return _launch(_w8a16_gemv_kernel, grid, x, qweight, scales, zeros, group_size, bias, out,
                   BLOCK_M=next_power_of_2(x.shape[0]), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps)


def w8a16_gemv(x, qweight, scales, zeros, group_size, bias=None, out=None, **config) -> torch.Tensor:
    """Decode path: x (M, K) with M <= 8 -> (M, N) in x's dtype. `config`: BLOCK_N, BLOCK_K, num_warps
    (default: the first of GEMV_CONFIGS); `out`: an (M, N) tensor to write into."""
    N, _ = _check_args(x, qweight, scales, zeros, group_size, bias, bits=8)
    _check_2d(x, GEMV_MAX_M)
    out = _output(out, x, N)
    if x.shape[0] == 0:
        return out
    return _gemv(x, qweight, scales, zeros, group_size, bias, out, **{**GEMV_CONFIGS[0], **config})


def w8a16_linear(x, qweight, scales, zeros, group_size, bias=None, backend: str = "auto") -> torch.Tensor:
    """y = x @ dequant(W).T + bias for x (..., K): the GEMV kernel for up to 8 rows; for more rows
    (prefill, compute bound) and wherever `use_triton(x, backend)` says no, the reference."""
    kernel = use_triton(x, backend)  # validates backend first
    N, K = _check_args(x, qweight, scales, zeros, group_size, bias, bits=8)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if not kernel or M > GEMV_MAX_M or M == 0:
        return w8a16_reference(x, qweight, scales, zeros, group_size, bias)
    return _w8a16_kernel(x2, qweight, scales, zeros, group_size, bias, N, K).reshape(*lead, N)


@compiler_opaque
def _w8a16_kernel(x2, qweight, scales, zeros, group_size, bias, N: int, K: int) -> torch.Tensor:
    M = x2.shape[0]
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    args = (x2, qweight, scales, zeros, group_size, bias, out)
    key = ("w8a16_gemv", M, N, K, group_size, zeros is None, bias is None, x2.dtype)
    config = pick_config(key, GEMV_CONFIGS, lambda **c: _gemv(*args, **c), cold=True)
    return _gemv(*args, **config)
