"""The two W4A16 decode GEMVs built to spend few instructions per weight byte (`w4a16.py` holds the
format, the spec, the plain GEMV a learner reads first, the GEMM and the wrappers that pick among them).

At batch 1 a GEMV does 2 flops per 4-bit weight, so it should be bound by memory; on an H200 an early
version was bound by instructions instead (Nsight Compute: SM throughput 58%, DRAM 20%; BENCHMARKS.md).
At 60% of the bandwidth a 4096 x 11008 layer leaves about 13 instructions per packed byte for the whole
chip, so every instruction per code counts:
- `_w4a16_gemv_grouped_kernel`: tiles of whole quantization-group runs (the scale applied once per
  run's sum), codes made floats by OR-ing them into the mantissa of 2^23, x read as contiguous pairs;
  about 12 instructions per packed byte in its loop (`scripts/sass_count.py grouped`);
- `_w4a16_gemv_words_kernel`: 32-bit words of 8 codes, each code OR-ed into the mantissa of 1.0 (no
  float add per code), one multiply-add chain per thread; 6-8 per byte (`scripts/sass_count.py words`).
Both are tested against `w4a16_reference` under the interpreter (tests/test_kernels_quant.py).
"""
from __future__ import annotations

from .common import tl, triton


@triton.jit
def _byte_columns(j0, GROUPS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """(GROUPS, LANES, VEC) columns of qweight from j0 on: GROUPS runs of LANES * VEC elements (bytes, or
    32-bit words for the words GEMV)."""
    g = tl.arange(0, GROUPS)[:, None, None] * (LANES * VEC)
    return j0 + g + tl.arange(0, LANES)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]


@triton.jit
def _packed_runs(qw_ptr, cols, col_ok, j0, j_end, stride_qn, GROUPS: tl.constexpr, LANES: tl.constexpr,
                 VEC: tl.constexpr):
    """The (BLOCK_N, GROUPS, LANES, VEC) elements of qweight from column j0 on; zeros from j_end on."""
    j = _byte_columns(j0, GROUPS, LANES, VEC)
    return tl.load(qw_ptr + cols[:, None, None, None] * stride_qn + j[None, :, :, :],
                   mask=col_ok[:, None, None, None] & (j < j_end)[None, :, :, :], other=0)


@triton.jit
def _run_scales(s_ptr, z_ptr, cols, col_ok, j0, j_end, stride_sn, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUPS: tl.constexpr, SUB: tl.constexpr, PER_GROUP: tl.constexpr):
    """float32 scales and zeros (BLOCK_N, GROUPS) of the GROUPS runs of SUB elements from column j0 on,
    PER_GROUP elements (bytes or words) to a quantization group; zero scales for runs from j_end on."""
    start = j0 + tl.arange(0, GROUPS) * SUB   # first element of each run
    g = start // PER_GROUP                    # each run's group (a constant divisor: a shift, not a division)
    g_mask = col_ok[:, None] & (start < j_end)[None, :]
    s = tl.load(s_ptr + cols[:, None] * stride_sn + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + cols[:, None] * stride_sn + g[None, :], mask=g_mask, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N, GROUPS), 8.0, tl.float32)
    return s, z


@triton.jit
def _w4a16_gemv_grouped_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G,
                               stride_xm, stride_xk, stride_qn, stride_sn, stride_om, stride_on, stride_os, K_SPLIT,
                               HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, LATE_SUM: tl.constexpr,
                               PREFETCH: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
                               GROUP_BYTES: tl.constexpr):
    # The decode GEMV built for a GPU's instruction budget. At 60% of an H200's bandwidth a 4096 x 11008
    # layer's 22.5 MB pass in 9 us, a few instructions per weight byte for the whole chip, so:
    # - the tile is (BLOCK_N, GROUPS, LANES, VEC) bytes: GROUPS runs, each inside one quantization
    #   group, of LANES pieces of VEC (16) contiguous bytes, one 16-byte load per thread. A thread sums
    #   its own piece first (no cross-thread traffic), then scales that sum by its group's scale;
    # - codes become floats without conversion instructions (a quarter of the rate of an add): OR-ing a
    #   nibble into the low mantissa bits of 2^23 gives the float 2^23 + code exactly, and subtracting
    #   2^23 + zero leaves code - zero. The high nibble is masked in place, 16 * code, saving a shift;
    #   the odd x's are divided by 16 to match;
    # - x is loaded as contiguous pairs (k = 2j, 2j + 1 for byte j), split into the even and odd k that
    #   meet the low and high nibbles.
    # Options: PREFETCH loads the next tile before working on this one (two tiles in flight per
    # program); LATE_SUM (one row only) keeps each piece's scaled sum and adds across threads once at the end.
    pid, split = tl.program_id(0), tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row = tl.arange(0, BLOCK_M)
    half = tl.arange(0, 2)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc3 = tl.full((BLOCK_N, GROUPS, LANES), 0.0, tl.float32)   # LATE_SUM's
    j_begin = split * K_SPLIT // 2
    j_end = tl.minimum(split * K_SPLIT + K_SPLIT, K) // 2   # this split's bytes: [j_begin, j_end)
    if ALIGNED:   # K is a multiple of 32: tell the compiler, or it cannot load 16 bytes at a time
        j_begin = tl.multiple_of(j_begin, 16)
        j_end = tl.multiple_of(j_end, 16)
    SUB: tl.constexpr = LANES * VEC
    STEP: tl.constexpr = GROUPS * SUB
    if PREFETCH:   # the first tile, loaded before the loop
        nxt = _packed_runs(qw_ptr, cols, col_ok, j_begin, j_end, stride_qn, GROUPS, LANES, VEC)
    for j0 in range(j_begin, j_end, STEP):
        if ALIGNED:
            j0 = tl.multiple_of(j0, 16)
        if PREFETCH:
            packed = nxt
            nxt = _packed_runs(qw_ptr, cols, col_ok, j0 + STEP, j_end, stride_qn, GROUPS, LANES, VEC)
        else:
            packed = _packed_runs(qw_ptr, cols, col_ok, j0, j_end, stride_qn, GROUPS, LANES, VEC)
        packed = packed.to(tl.int32)
        low = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)     # 2^23 + code
        high = ((packed & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True)   # 2^23 + 16 * code
        s, z = _run_scales(s_ptr, z_ptr, cols, col_ok, j0, j_end, stride_sn, HAS_ZEROS, BLOCK_N, GROUPS, SUB,
                           GROUP_BYTES)
        low = low - (8388608.0 + z)[:, :, None, None]           # code - zero, exactly
        high = high - (8388608.0 + 16.0 * z)[:, :, None, None]  # 16 * (code - zero), exactly
        j = _byte_columns(j0, GROUPS, LANES, VEC)
        for m in tl.static_range(BLOCK_M):
            # rows past M are masked (BLOCK_M is M rounded up to a power of 2)
            x_ok = (j < j_end) & (tl.full((GROUPS, LANES, VEC), m, tl.int32) < M)
            xm = tl.load(x_ptr + m * stride_xm + (2 * j[:, :, :, None] + half) * stride_xk,
                         mask=x_ok[:, :, :, None], other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(xm)
            piece = tl.sum(low * x_even[None] + high * (x_odd * 0.0625)[None], axis=3)   # (BLOCK_N, GROUPS, LANES)
            if LATE_SUM:   # BLOCK_M == 1
                acc3 += piece * s[:, :, None]
            else:
                y = tl.sum(tl.sum(piece, axis=2) * s, axis=1)   # (BLOCK_N,)
                acc += tl.where(row[:, None] == m, y[None, :], 0.0)
    if LATE_SUM:
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_os + row[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(row < M)[:, None] & col_ok[None, :])


@triton.jit
def _mantissa_floats(v, mask_lo, mask_hi, EXACT: tl.constexpr):
    """Two float32 tensors from uint32 words: 1 + c / 2048 for the nibble c at bits 12-15 and 1 + c / 128
    for the one at bits 16-19; where EXACT, with the 1 subtracted (c / 2048 and c / 128, exactly)."""
    lo = ((v & mask_lo) | 0x3F800000).to(tl.float32, bitcast=True)
    hi = ((v & mask_hi) | 0x3F800000).to(tl.float32, bitcast=True)
    if EXACT:
        lo = lo - 1.0
        hi = hi - 1.0
    return lo, hi


@triton.jit
def _w4a16_gemv_words_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G,
                             stride_xm, stride_xk, stride_qn, stride_sn, stride_om, stride_on, stride_os, K_SPLIT,
                             mask_lo, mask_hi,
                             HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT: tl.constexpr,
                             PREFETCH: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
                             GROUP_WORDS: tl.constexpr):
    # The grouped GEMV with fewer instructions per code, reading qweight as 32-bit words (8 codes each,
    # code p of the word at bits 4p..4p+3). Its tiles are the grouped kernel's, counted in words; VEC
    # must be 4 (one 16-byte load of 4 words per thread).
    # - No subtraction per code. A nibble OR-ed into the mantissa of 1.0 at bits 16-19 is the float
    #   1 + c / 128 (at bits 12-15, 1 + c / 2048): one LOP3, and x * (1 + c / 128) sums to
    #   sum(x) + sum(x * c) / 128. The sums of x are the same for every column, so each tile takes them
    #   once and subtracts them (with the zero's share, z * sum(x)) from each column's sum.
    # - Two codes per word sit at bits 12-15 and 16-19 as loaded; three shifts bring the other six
    #   there (w >> 8, w << 8, and w rotated by 16): 3 instructions per 8 codes, where the grouped
    #   kernel's byte unpacking (PRMT) takes 4.
    # - Precision: the code lands 7 or 11 bits below the leading 1, so the sums keep about 17 and 13 of
    #   float32's 24 bits: ~3e-5 relative error measured (tests/test_kernels_quant.py), under a 16-bit
    #   output's rounding (5e-4 to 4e-3).
    #   For float32 x (EXACT) each float has 1 subtracted first: exact, one FADD per code more.
    # - The masks come in as arguments: as literals the compiler re-creates them before every use
    #   (one more instruction per code, seen in the SASS).
    # - Each thread's 4 words are taken one at a time (_four), so the products make one chain of
    #   multiply-adds per parity, with no separate products to add up afterwards.
    # - The sums of x come from the same per-thread slices as the products: each thread adds its own,
    #   where sums over the tile as loaded would reach the threads through shared memory and barriers.
    # Compiled for sm_90 (scripts/sass_count.py words): 6.7 instructions per packed byte and thread in
    # the loop at BLOCK_N 64 x 4 runs of 16 words, against 11.8 for the grouped kernel: 2 per byte turn
    # codes into floats, 2 multiply-add, 0.75 shift, the rest is x, addresses and masks.
    pid, split = tl.program_id(0), tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row = tl.arange(0, BLOCK_M)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc3 = tl.full((BLOCK_N, GROUPS, LANES), 0.0, tl.float32)   # one row: the pieces' sums, added up at the end
    w_begin = split * K_SPLIT // 8
    w_end = tl.minimum(split * K_SPLIT + K_SPLIT, K) // 8   # this split's words: [w_begin, w_end)
    if ALIGNED:   # K a multiple of 32: 16-byte loads
        w_begin = tl.multiple_of(w_begin, 4)
        w_end = tl.multiple_of(w_end, 4)
    SUB: tl.constexpr = LANES * VEC
    STEP: tl.constexpr = GROUPS * SUB
    if PREFETCH:
        nxt = _packed_runs(qw_ptr, cols, col_ok, w_begin, w_end, stride_qn, GROUPS, LANES, VEC)
    for w0 in range(w_begin, w_end, STEP):
        if ALIGNED:
            w0 = tl.multiple_of(w0, 4)
        if PREFETCH:
            words = nxt
            nxt = _packed_runs(qw_ptr, cols, col_ok, w0 + STEP, w_end, stride_qn, GROUPS, LANES, VEC)
        else:
            words = _packed_runs(qw_ptr, cols, col_ok, w0, w_end, stride_qn, GROUPS, LANES, VEC)
        words = words.to(tl.uint32, bitcast=True)   # logical shifts
        s, z = _run_scales(s_ptr, z_ptr, cols, col_ok, w0, w_end, stride_sn, HAS_ZEROS, BLOCK_N, GROUPS, SUB,
                           GROUP_WORDS)
        w = _byte_columns(w0, GROUPS, LANES, VEC)   # the words' indices
        wa, wb, wc, wd = _four(words, BLOCK_N, GROUPS, LANES)   # each thread's 4 words, one tensor each
        for m in tl.static_range(BLOCK_M):
            x_ok = (w < w_end) & (tl.full((GROUPS, LANES, VEC), m, tl.int32) < M)
            xm = tl.load(x_ptr + m * stride_xm + (8 * w[:, :, :, None] + tl.arange(0, 8)) * stride_xk,
                         mask=x_ok[:, :, :, None], other=0.0).to(tl.float32)   # k = 8w + p
            xa, xb, xc, xd = _four(tl.permute(xm, (0, 1, 3, 2)), GROUPS, LANES, 8)   # (GROUPS, LANES, 8) each
            # one chain of multiply-adds per parity over the thread's 4 words (no separate products to add up)
            # and the sums of x over each piece's even and odd k, the same for every column
            s_even = tl.zeros((BLOCK_N, GROUPS, LANES), tl.float32)
            s_odd = tl.zeros((BLOCK_N, GROUPS, LANES), tl.float32)
            x_even = tl.zeros((GROUPS, LANES), tl.float32)
            x_odd = tl.zeros((GROUPS, LANES), tl.float32)
            s_even, s_odd, x_even, x_odd = _word_dot(wa, xa, s_even, s_odd, x_even, x_odd, mask_lo, mask_hi, GROUPS,
                                                     LANES, EXACT)
            s_even, s_odd, x_even, x_odd = _word_dot(wb, xb, s_even, s_odd, x_even, x_odd, mask_lo, mask_hi, GROUPS,
                                                     LANES, EXACT)
            s_even, s_odd, x_even, x_odd = _word_dot(wc, xc, s_even, s_odd, x_even, x_odd, mask_lo, mask_hi, GROUPS,
                                                     LANES, EXACT)
            s_even, s_odd, x_even, x_odd = _word_dot(wd, xd, s_even, s_odd, x_even, x_odd, mask_lo, mask_hi, GROUPS,
                                                     LANES, EXACT)
            # per column and piece: 128 * (s_even + 16 s_odd - corr) = sum x * (c - z)
            corr = z[:, :, None] * ((x_even + x_odd) * 0.0078125)[None]
            if not EXACT:
                corr += (x_even + 16.0 * x_odd)[None]
            piece = (s_even + 16.0 * s_odd - corr) * s[:, :, None]   # (BLOCK_N, GROUPS, LANES)
            if BLOCK_M == 1:
                acc3 += piece
            else:
                y = tl.sum(tl.sum(piece, axis=2), axis=1)
                acc += tl.where(row[:, None] == m, y[None, :], 0.0)
    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
    acc = acc * 128.0
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_os + row[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(row < M)[:, None] & col_ok[None, :])


@triton.jit
def _four(t, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    """The 4 slices of t (A, B, C, 4) along its last axis."""
    t02, t13 = tl.split(tl.reshape(t, (A, B, C, 2, 2)))
    t0, t2 = tl.split(t02)
    t1, t3 = tl.split(t13)
    return t0, t1, t2, t3


@triton.jit
def _word_dot(v, x8, s_even, s_odd, x_even, x_odd, mask_lo, mask_hi, GROUPS: tl.constexpr, LANES: tl.constexpr,
              EXACT: tl.constexpr):
    """s_even, s_odd plus one word's 8 codes times x8 (GROUPS, LANES, 8): even codes as 1 + c / 128,
    odd ones as 1 + c / 2048 (see _mantissa_floats); x_even, x_odd plus the sums of x8's even and odd k."""
    f3, f4 = _mantissa_floats(v, mask_lo, mask_hi, EXACT)
    f5, f6 = _mantissa_floats(v >> 8, mask_lo, mask_hi, EXACT)
    f1, f2 = _mantissa_floats(v << 8, mask_lo, mask_hi, EXACT)
    f7, f0 = _mantissa_floats((v >> 16) | (v << 16), mask_lo, mask_hi, EXACT)
    x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x8, GROUPS, LANES)
    s_even = s_even + f0 * x0[None] + f2 * x2[None] + f4 * x4[None] + f6 * x6[None]
    s_odd = s_odd + f1 * x1[None] + f3 * x3[None] + f5 * x5[None] + f7 * x7[None]
    return s_even, s_odd, x_even + x0 + x2 + x4 + x6, x_odd + x1 + x3 + x5 + x7


@triton.jit
def _eight(x8, GROUPS: tl.constexpr, LANES: tl.constexpr):
    """The 8 slices of x8 (GROUPS, LANES, 8) along its last axis: x[..., p] for p = 0..7."""
    e, o = tl.split(tl.reshape(x8, (GROUPS, LANES, 4, 2)))   # p = 2a, 2a + 1
    e04, e26 = tl.split(tl.reshape(e, (GROUPS, LANES, 2, 2)))
    o15, o37 = tl.split(tl.reshape(o, (GROUPS, LANES, 2, 2)))
    x0, x4 = tl.split(e04)
    x2, x6 = tl.split(e26)
    x1, x5 = tl.split(o15)
    x3, x7 = tl.split(o37)
    return x0, x1, x2, x3, x4, x5, x6, x7
