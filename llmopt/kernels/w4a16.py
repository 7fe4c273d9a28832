"""W4A16: a linear layer whose weight is stored as packed 4-bit codes, read directly by Triton kernels.

Why this is faster at decode: generating one token multiplies a handful of activation rows by every
weight matrix of the model, about 2 FLOPs per weight byte read, so batch-1 decode is bound by memory
bandwidth, not arithmetic. The packed weight is 4x fewer bytes than bf16 (two codes per byte, plus a
float16 scale per group), and the kernels dequantize each tile in registers right after loading it:
the full-precision weight never exists in memory, so the only traffic is the packed bytes. With
`QuantLinear`'s forward (dequantize the whole weight, then a matmul) the saving is lost: it writes and
reads a bf16 copy of the weight on every call.

The storage format is `llmopt.quant.QuantLinear`'s, read as it is (no repacking):
- qweight: uint8 (N, K // 2), code k = 2i in the low nibble of byte i, k = 2i + 1 in the high one;
- scales: (N, n_groups) with n_groups = 1 (per channel) or K // group_size;
- zeros: uint8 (N, n_groups) for zero-point schemes, None for symmetric ones, whose codes were shifted
  by +8 when packed, so their zero is 8;
- w[n, k] = (code[n, k] - zero[n, g]) * scale[n, g] with g = k // group_size.

Two kernels:
- `w4a16_gemv` (decode, M <= 8 rows): tl.dot needs at least 16 rows, so it multiplies and sums with
  broadcasting, float32 throughout. Three versions: the plain one, which a learner can follow line by
  line; the grouped one, which spends fewer instructions per weight byte (see its comments); and the
  words one, which reads 8 codes per 32-bit word and spends fewer again (these two in `w4a16_lean.py`);
  `pick_config` times them all;
- `w4a16_gemm` (prefill): tiles with tl.dot on the tensor cores, weights dequantized to x's dtype.
`w4a16_linear` picks one (for 2-8 rows it times both on a GPU); `w4a16_reference` is the spec both are
tested against.

Under the interpreter (no CUDA), triton.language's own jit helpers (tl.sum, tl.zeros, tl.sigmoid)
work only if TRITON_INTERPRET=1 was set before `triton` was first imported: `triton.jit` picks the
interpreted or compiled version as it decorates. `common` sets it; import llmopt.kernels first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import packing
from .common import compiler_opaque, next_power_of_2, pick_config, precision, tl, triton, use_triton
from .w4a16_lean import _w4a16_gemv_grouped_kernel, _w4a16_gemv_words_kernel

GEMV_MAX_M = 8  # decode batches; above this the tensor-core GEMM wins

# Candidate block sizes, fastest picked per shape on a GPU by `pick_config`; the first runs on CPU.
# GEMV: BLOCK_M * BLOCK_N * BLOCK_K / 2 products live in registers per step, so tiles stay modest.
# A BLOCK_K that divides the group size (128 by default) takes the kernel's one-group path.
GEMV_CONFIGS = [
    dict(BLOCK_N=32, BLOCK_K=64, num_warps=4),
    # the plain GEMV's fastest on an H200 (2026-11-27): at 8 rows (these), and at 1 before the grouped one
    dict(BLOCK_N=32, BLOCK_K=64, num_warps=2, LATE_SUM=True),
    dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, LATE_SUM=True),
    dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, LATE_SUM=True, SPLIT_K=4),
    # the grouped GEMV (see its kernel): tiles of 1-8 KB of packed weights
    dict(BLOCK_N=8, BLOCK_K=256, num_warps=4, GROUPED=True),
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, GROUPED=True),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, GROUPED=True),
    dict(BLOCK_N=4, BLOCK_K=512, num_warps=2, GROUPED=True),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, GROUPED=True),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, GROUPED=True),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, GROUPED=True),
    dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, GROUPED=True),
    dict(BLOCK_N=8, BLOCK_K=1024, num_warps=8, GROUPED=True),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, GROUPED=True),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, GROUPED=True, PREFETCH=True),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, GROUPED=True, PREFETCH=True),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, GROUPED=True, PREFETCH=True),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, GROUPED=True, LATE_SUM=True),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, GROUPED=True, LATE_SUM=True),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, GROUPED=True, LATE_SUM=True),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, GROUPED=True, LATE_SUM=True, PREFETCH=True),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, GROUPED=True, LATE_SUM=True, PREFETCH=True),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, GROUPED=True, SPLIT_K=2),
    # the words GEMV (2026-11-27; tested under the interpreter, not yet timed on a GPU): configs whose
    # loops compile for sm_90 to 6.2-7.5 instructions per packed byte (`scripts/sass_count.py words`),
    # 80-168 registers, no spills; small tiles and split K for layers with few columns (11008 -> 4096)
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=2, WORDS=True),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=2, WORDS=True),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=4, WORDS=True),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=4, WORDS=True),
    dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, WORDS=True),
    dict(BLOCK_N=64, BLOCK_K=512, num_warps=8, WORDS=True),
    dict(BLOCK_N=128, BLOCK_K=256, num_warps=8, WORDS=True),
    dict(BLOCK_N=32, BLOCK_K=1024, num_warps=8, WORDS=True),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=2, WORDS=True),
    dict(BLOCK_N=64, BLOCK_K=512, num_warps=4, WORDS=True),
    dict(BLOCK_N=8, BLOCK_K=1024, num_warps=2, WORDS=True),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=2, WORDS=True, PREFETCH=True),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=2, WORDS=True, PREFETCH=True),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=2, WORDS=True, SPLIT_K=2),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=2, WORDS=True, SPLIT_K=4),
]
# GEMM: BLOCK_M >= 16 and BLOCK_K // 2 >= 16 (tl.dot's smallest tile).
GEMM_CONFIGS = [
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8),
    # the grouped GEMM (see the kernel; 2026-11-27, tested under the interpreter, not yet timed on a GPU)
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, GROUPED=True),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, GROUPED=True),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, GROUPED=True),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, GROUPED=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, GROUPED=True),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, GROUPED=True),
    # one tile of 16 rows: decode batches of 2-8 (see SMALL_BATCH_CONFIGS)
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, GROUPED=True),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, GROUPED=True),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4),
]

# Decode batches of 2-8 rows: the GEMV does 2-8 multiply-adds per weight on the CUDA cores, the GEMM
# pads the rows to one tile of 16 and hands them to the tensor cores. Which is faster depends on the
# GPU and the layer (on an H200, 2026-11-27, the GEMV took 78 us at 8 rows where bf16 took 25), so on
# a GPU `pick_config` times both kinds; on CPU the first (a GEMV) runs.
SMALL_BATCH_CONFIGS = ([dict(c, KERNEL="gemv") for c in GEMV_CONFIGS]
                       + [dict(c, KERNEL="gemm") for c in GEMM_CONFIGS if c["BLOCK_M"] == 16])


# --------------------------------------------------------------------------- reference (the spec)

def dequantize_codes(codes, scales, zeros, group_size, symmetric_zero: float, dtype=torch.float32) -> torch.Tensor:
    """(codes - zero) * scale per group, in float32 exactly as `QuantLinear.dequantized_weight`, then `dtype`;
    `symmetric_zero` is the zero of codes stored without zero points (8 for INT4's shifted codes, 0 for INT8)."""
    codes = codes.float()
    group = codes.shape[1] if group_size is None else group_size
    scale = scales.float().repeat_interleave(group, dim=1)
    zero = symmetric_zero if zeros is None else zeros.float().repeat_interleave(group, dim=1)
    return ((codes - zero) * scale).to(dtype)


def dequantize_int4(qweight, scales, zeros, group_size, dtype=torch.float32) -> torch.Tensor:
    """The (N, K) weight in `dtype` from the packed nibbles."""
    return dequantize_codes(packing.unpack(qweight, 4), scales, zeros, group_size, 8.0, dtype)


def w4a16_reference(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    """Dequantize, then an ordinary matmul in x's dtype."""
    w = dequantize_int4(qweight, scales, zeros, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------- kernels

@triton.jit
def _dequantize(codes, n, k, mask, s_ptr, z_ptr, G, stride_sn, HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr):
    """float32 weights for integer `codes` at rows n, columns k (broadcastable index tensors).

    Neighbouring k share a group, so the scale loads repeat addresses and are served from cache."""
    g = n * stride_sn + k // G
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)  # 0 outside: masked weights vanish
    if HAS_ZEROS:
        z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
    else:
        z = SYM_ZERO
    return (codes.to(tl.float32) - z) * s


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G,
                       stride_xm, stride_xk, stride_qn, stride_sn, stride_om, stride_on, stride_os, K_SPLIT,
                       HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
                       LATE_SUM: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per BLOCK_N output columns and K_SPLIT of K (all of it without split-K), all M rows.
    # Split-K: with N / BLOCK_N programs alone a 4096 x 11008 layer has a few hundred programs, two or
    # three per SM of a big GPU, too few warps in flight to hide the memory latency; splitting K over
    # grid axis 1 multiplies them, and each split writes its float32 partial sums to its own slice
    # of `out` (stride_os) for the wrapper to add up. `pick_config` times both ways.
    # LATE_SUM: keep the products of every k lane in registers and sum over k once, after the loop,
    # instead of a sum across threads in every iteration (more registers, fewer shuffles; which one
    # wins depends on the GPU and the shape: `pick_config` times both).
    pid, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # M padded to a power of two; the extra rows are masked
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc3 = tl.full((BLOCK_M, BLOCK_N, BLOCK_K // 2), 0.0, tl.float32)
    # K_SPLIT is a multiple of BLOCK_K; the last split stops at K: a tile wholly past K would read
    # the scales of a group that does not exist
    for k0 in range(split * K_SPLIT, tl.minimum(split * K_SPLIT + K_SPLIT, K), BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns of qweight: k = 2j and 2j + 1
        j_ok = j < K // 2
        w_mask = col_ok[:, None] & j_ok[None, :]
        packed = tl.load(qw_ptr + cols[:, None] * stride_qn + j[None, :], mask=w_mask, other=0)  # each byte once
        # x's even and odd columns, loaded separately, line up with the low and high nibbles: no
        # interleaving of the unpacked weights is needed
        x_mask = row_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * j[None, :]) * stride_xk, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * j[None, :] + 1) * stride_xk, mask=x_mask, other=0.0)
        x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        if LATE_SUM:
            if ONE_GROUP:   # one scale (and zero) per column for the whole tile
                g = k0 // G
                s = tl.load(s_ptr + cols * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)[:, None]
                if HAS_ZEROS:
                    z = tl.load(z_ptr + cols * stride_sn + g, mask=col_ok, other=0).to(tl.float32)[:, None]
                else:
                    z = 8.0
                w_even = ((packed & 0xF).to(tl.float32) - z) * s
                w_odd = ((packed >> 4).to(tl.float32) - z) * s
            else:
                w_even = _dequantize(packed & 0xF, cols[:, None], 2 * j[None, :], w_mask, s_ptr, z_ptr, G,
                                     stride_sn, HAS_ZEROS, 8)
                w_odd = _dequantize(packed >> 4, cols[:, None], 2 * j[None, :] + 1, w_mask, s_ptr, z_ptr, G,
                                    stride_sn, HAS_ZEROS, 8)
            acc3 += x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :]
        elif ONE_GROUP:
            # the tile lies inside one quantization group (BLOCK_K divides the group size): one scale
            # and zero per column, so take them out of the sum over k,
            #   sum_k x_k (c_k - z) s = s * (sum_k x_k c_k - z * sum_k x_k),
            # which leaves one convert and one multiply-add per weight
            g = k0 // G
            s = tl.load(s_ptr + cols * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
            xc = tl.sum(x_even[:, None, :] * (packed & 0xF).to(tl.float32)[None, :, :]
                        + x_odd[:, None, :] * (packed >> 4).to(tl.float32)[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N)
            x_sum = tl.sum(x_even + x_odd, axis=1)  # (BLOCK_M,)
            if HAS_ZEROS:
                z = tl.load(z_ptr + cols * stride_sn + g, mask=col_ok, other=0).to(tl.float32)
                acc += (xc - x_sum[:, None] * z[None, :]) * s[None, :]
            else:
                acc += (xc - x_sum[:, None] * 8.0) * s[None, :]
        else:  # groups smaller than the tile: dequantize every weight with its own group's scale
            w_even = _dequantize(packed & 0xF, cols[:, None], 2 * j[None, :], w_mask, s_ptr, z_ptr, G, stride_sn,
                                 HAS_ZEROS, 8)
            w_odd = _dequantize(packed >> 4, cols[:, None], 2 * j[None, :] + 1, w_mask, s_ptr, z_ptr, G, stride_sn,
                                HAS_ZEROS, 8)
            # (BLOCK_M, 1, BLOCK_K/2) * (1, BLOCK_N, BLOCK_K/2), summed over k: a few rows are too few for tl.dot
            acc += tl.sum(x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2)
    if LATE_SUM:
        acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:  # in the kernel, in float32, before the one rounding: no second pass over the output
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G,
                       stride_xm, stride_xk, stride_qn, stride_sn, stride_om, stride_on,
                       HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                       GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GROUPED (BLOCK_K divides the group size) takes the grouped GEMV's ideas: a K tile has one scale
    # (and zero) per column, loaded once per tile instead of gathered per weight; code - zero is a small
    # integer, exact in fp16/bf16, so the tensor cores multiply x by it and the scale multiplies the
    # tile's float32 sums afterwards (once per output and tile, not per weight).
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        j_ok = j < K // 2
        x_mask = row_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * j[None, :]) * stride_xk, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * j[None, :] + 1) * stride_xk, mask=x_mask, other=0.0)
        # the weight tile is loaded (K, N)-major, as tl.dot wants its right operand
        w_mask = j_ok[:, None] & col_ok[None, :]
        packed = tl.load(qw_ptr + cols[None, :] * stride_qn + j[:, None], mask=w_mask, other=0)
        if GROUPED:
            g = k0 // G
            s = tl.load(s_ptr + cols * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + cols * stride_sn + g, mask=col_ok, other=0).to(tl.float32)
            else:
                z = tl.full((BLOCK_N,), 8.0, tl.float32)
            # codes to floats with the 2^23 trick (see the grouped GEMV), then to x's dtype: exact
            packed = packed.to(tl.int32)
            low = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)[None, :]
            high = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)[None, :]
            part = tl.dot(x_even, low.to(x_ptr.dtype.element_ty), input_precision=PRECISION)
            part += tl.dot(x_odd, high.to(x_ptr.dtype.element_ty), input_precision=PRECISION)
            acc += part * s[None, :]
        else:
            # dequantized in float32, then rounded to x's dtype so tl.dot runs on the tensor cores
            w_even = _dequantize(packed & 0xF, cols[None, :], 2 * j[:, None], w_mask, s_ptr, z_ptr, G, stride_sn,
                                 HAS_ZEROS, 8).to(x_ptr.dtype.element_ty)
            w_odd = _dequantize(packed >> 4, cols[None, :], 2 * j[:, None] + 1, w_mask, s_ptr, z_ptr, G, stride_sn,
                                HAS_ZEROS, 8).to(x_ptr.dtype.element_ty)
            # sum over k split in two: x[:, even k] @ w[even k, :] + x[:, odd k] @ w[odd k, :]
            acc += tl.dot(x_even, w_even, input_precision=PRECISION)
            acc += tl.dot(x_odd, w_odd, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- wrappers

def _check_args(x, qweight, scales, zeros, group_size, bias, bits: int) -> tuple[int, int]:
    """Validate a quantized linear's arguments (shared with w8a16); returns (N, K)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor (..., in_features), got {getattr(x, 'shape', x)!r}")
    K = x.shape[-1]
    if bits == 4 and K % 2:
        raise ValueError(f"x: in_features ({K}) must be even, INT4 packs two codes per byte")
    if qweight.dim() != 2 or qweight.shape[1] * 8 // bits != K:
        raise ValueError(f"qweight must have shape (out_features, {K * bits // 8}) for in_features {K} at "
                         f"{bits} bits, got {tuple(qweight.shape)}")
    allowed = (torch.uint8,) if bits == 4 else (torch.int8, torch.uint8)
    if qweight.dtype not in allowed:
        raise ValueError(f"qweight must be one of {allowed} for {bits}-bit codes, got {qweight.dtype}")
    N = qweight.shape[0]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0 or K % group_size):
        raise ValueError(f"group_size must be None (per channel) or a positive int dividing in_features {K}, "
                         f"got {group_size!r}")
    n_groups = 1 if group_size is None else K // group_size
    if tuple(scales.shape) != (N, n_groups) or not scales.is_floating_point():
        raise ValueError(f"scales must be a float tensor of shape {(N, n_groups)}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (N, n_groups):
        raise ValueError(f"zeros must be None (symmetric) or of shape {(N, n_groups)}, got {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be None or of shape {(N,)}, got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: they must share a device")
    return N, K


def _check_2d(x, max_m=None):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, in_features) here (w4a16_linear takes any leading dims), "
                         f"got shape {tuple(x.shape)}")
    if max_m is not None and x.shape[0] > max_m:
        raise ValueError(f"x has {x.shape[0]} rows; the GEMV is for decode, M <= {max_m}: use the GEMM")


def _output(out, x, N):
    """`out` if given (checked), else a new (M, N) tensor in x's dtype."""
    if out is None:
        return torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    if tuple(out.shape) != (x.shape[0], N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {x.dtype} tensor of shape {(x.shape[0], N)} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _launch(kernel, grid, x, qweight, scales, zeros, group_size, bias, out, **meta):
    """`out`: (M, N), or (splits, M, N) for a split-K GEMV (its split stride comes in `meta`)."""
    M, K = x.shape
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    kernel[grid](x, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias, out,
                 M, out.shape[-1], K, K if group_size is None else group_size,
                 x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), out.stride(-2), out.stride(-1),
                 HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, **meta)  # unused pointers: any tensor
    return out


def _grouped_runs(group_size, K, BLOCK_K):
    """(GROUPS, SUB) for the grouped GEMV: runs of SUB bytes inside one group, GROUPS of them per
    BLOCK_K; None where the group size does not split into power-of-two runs (use the plain GEMV)."""
    group = K if group_size is None else group_size
    sub = min(BLOCK_K, group) // 2
    if sub < 1 or sub != next_power_of_2(sub) or (group // 2) % sub or group % 2 or BLOCK_K % (2 * sub):
        return None
    return BLOCK_K // (2 * sub), sub


def _word_runs(group_size, K, BLOCK_K):
    """(GROUPS, SUB) for the words GEMV: runs of SUB 32-bit words (8 codes each, at least 4 words: one
    16-byte load per thread) inside one group, GROUPS of them per BLOCK_K; None where K or the group
    size do not split so (use the grouped GEMV)."""
    group = K if group_size is None else group_size
    run = min(BLOCK_K, group)
    if K % 8 or run % 32 or run // 8 != next_power_of_2(run // 8) or group % run or BLOCK_K % run:
        return None
    return BLOCK_K // run, run // 8


def _gemv(x, qweight, scales, zeros, group_size, bias, out, BLOCK_N, BLOCK_K, num_warps=4, LATE_SUM=False,
          SPLIT_K=1, GROUPED=False, PREFETCH=False, WORDS=False, num_stages=None):
    K = x.shape[1]
    k_split = triton.cdiv(triton.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K   # whole tiles per split
    splits = triton.cdiv(K, k_split)
    grid = (triton.cdiv(out.shape[1], BLOCK_N), splits)
    meta = dict(BLOCK_M=next_power_of_2(x.shape[0]), BLOCK_N=BLOCK_N, num_warps=num_warps, K_SPLIT=k_split)
    if num_stages is not None:
        meta["num_stages"] = num_stages
    words = _word_runs(group_size, K, BLOCK_K) if WORDS else None
    runs = _grouped_runs(group_size, K, BLOCK_K) if GROUPED or (WORDS and words is None) else None
    if words is not None:
        kernel = _w4a16_gemv_words_kernel
        qweight = qweight.contiguous().view(torch.int32)   # 4 bytes, 8 codes, per element
        meta.update(GROUPS=words[0], LANES=words[1] // 4, VEC=4, PREFETCH=PREFETCH,   # 4 words per thread and load
                    GROUP_WORDS=(group_size or K) // 8, EXACT=x.dtype == torch.float32,
                    ALIGNED=K % 32 == 0 and k_split % 32 == 0,
                    mask_lo=0xF000, mask_hi=0xF0000)
    elif runs is not None:
        kernel = _w4a16_gemv_grouped_kernel
        vec = min(16, runs[1])   # bytes per thread and load
        meta.update(GROUPS=runs[0], LANES=runs[1] // vec, VEC=vec, PREFETCH=PREFETCH,
                    GROUP_BYTES=(group_size or K) // 2, LATE_SUM=LATE_SUM and x.shape[0] == 1,
                    ALIGNED=K % 32 == 0 and k_split % 32 == 0 and vec == 16)
    else:   # the plain GEMV, also for group sizes the grouped one cannot tile
        kernel = _w4a16_gemv_kernel
        one_group = group_size is None or group_size % BLOCK_K == 0   # every K tile inside one group
        meta.update(ONE_GROUP=one_group, LATE_SUM=LATE_SUM, BLOCK_K=BLOCK_K)
    if splits == 1:
        return _launch(kernel, grid, x, qweight, scales, zeros, group_size, bias, out, stride_os=0, **meta)
    # each split's float32 partial sums in its own slice, added up here (a second, small reduction)
    partial = torch.empty(splits, *out.shape, device=x.device, dtype=torch.float32)
    _launch(kernel, grid, x, qweight, scales, zeros, group_size, None, partial, stride_os=partial.stride(0), **meta)
    total = partial.sum(0)
    if bias is not None:
        total += bias.float()
    return out.copy_(total)


def _gemm(x, qweight, scales, zeros, group_size, bias, out, BLOCK_M, BLOCK_N, BLOCK_K, num_warps=4, GROUPED=False):
    grid = (triton.cdiv(x.shape[0], BLOCK_M), triton.cdiv(out.shape[1], BLOCK_N))
    group = x.shape[1] if group_size is None else group_size
    # the grouped path needs K tiles inside one group; other group sizes take the plain one
    return _launch(_w4a16_gemm_kernel, grid, x, qweight, scales, zeros, group_size, bias, out,
                   PRECISION=precision(x.dtype), GROUPED=GROUPED and group % BLOCK_K == 0,
                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                   num_warps=num_warps)


def _small_batch(*args, KERNEL: str, **config):
    return (_gemv if KERNEL == "gemv" else _gemm)(*args, **config)


def w4a16_gemv(x, qweight, scales, zeros, group_size, bias=None, out=None, **config) -> torch.Tensor:
    """Decode path: x (M, K) with M <= 8 -> (M, N) in x's dtype. `config`: BLOCK_N, BLOCK_K, num_warps
    (default: the first of GEMV_CONFIGS); `out`: an (M, N) tensor to write into."""
    N, _ = _check_args(x, qweight, scales, zeros, group_size, bias, bits=4)
    _check_2d(x, GEMV_MAX_M)
    out = _output(out, x, N)
    if x.shape[0] == 0:
        return out
    return _gemv(x, qweight, scales, zeros, group_size, bias, out, **{**GEMV_CONFIGS[0], **config})


def w4a16_gemm(x, qweight, scales, zeros, group_size, bias=None, out=None, **config) -> torch.Tensor:
    """Prefill path: x (M, K), any M -> (M, N) in x's dtype. `config`: BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps (default: the first of GEMM_CONFIGS); `out`: an (M, N) tensor to write into."""
    N, _ = _check_args(x, qweight, scales, zeros, group_size, bias, bits=4)
    _check_2d(x)
    out = _output(out, x, N)
    if x.shape[0] == 0:
        return out
    return _gemm(x, qweight, scales, zeros, group_size, bias, out, **{**GEMM_CONFIGS[0], **config})


def w4a16_linear(x, qweight, scales, zeros, group_size, bias=None, backend: str = "auto") -> torch.Tensor:
    """y = x @ dequant(W).T + bias for x (..., K): the GEMV for one row, the faster of the GEMV and a
    16-row GEMM tile for 2-8 rows, the GEMM above; the reference where `use_triton(x, backend)` says
    no (backend "torch", or "auto" off a GPU)."""
    kernel = use_triton(x, backend)  # validates backend first
    N, K = _check_args(x, qweight, scales, zeros, group_size, bias, bits=4)
    if not kernel:
        return w4a16_reference(x, qweight, scales, zeros, group_size, bias)
    return _w4a16_kernels(x, qweight, scales, zeros, group_size, bias, N, K)


@compiler_opaque
def _w4a16_kernels(x, qweight, scales, zeros, group_size, bias, N: int, K: int) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*lead, N)
    args = (x2, qweight, scales, zeros, group_size, bias, out)
    if M == 1:
        run, candidates, m_key = _gemv, GEMV_CONFIGS, M
    elif M <= GEMV_MAX_M:
        run, candidates, m_key = _small_batch, SMALL_BATCH_CONFIGS, M
    else:  # prompt lengths vary: one tuning per power of two of M
        run, candidates, m_key = _gemm, GEMM_CONFIGS, next_power_of_2(M)
    key = (run.__name__, "w4a16", m_key, N, K, group_size, zeros is None, bias is None, x.dtype)
    config = pick_config(key, candidates, lambda **c: run(*args, **c), cold=True)
    return run(*args, **config).reshape(*lead, N)
