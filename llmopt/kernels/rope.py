"""Rotary position embedding (RoPE) on q and k in one Triton launch: kernel, reference, wrapper.

Every attention layer rotates its queries and keys by their position. Eager PyTorch
(transformers' apply_rotary_pos_emb) runs, for each of q and k: `x * cos`, `-x2`, `cat`, `* sin`
and `+`: five kernels that read about 5.5 and write about 4.5 copies of the tensor (~20 bytes per
bf16 element), ten launches for the pair. The kernel reads q and k once and writes them once
(4 bytes per element) in one launch: one program per token (b, t) loads that token's cos and sin
once and rotates all its query heads and key heads as (heads, D/2) tiles, in float32.

q and k usually arrive as views: (B, T, H, D) projections transposed to (B, H, T, D). The kernel
takes any strides with a contiguous last dim, so the transpose never becomes a copy.

Llama's cos and sin repeat their frequencies (cat(freqs, freqs)), so their two halves are equal;
the kernel still loads both halves, which keeps it equal to the reference for any cos and sin at
the cost of D extra values per token, next to the (Hq + Hk) * D it rotates.
"""
from __future__ import annotations

import torch

from .common import compiler_opaque, next_power_of_2, tl, triton, use_triton


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1): q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@triton.jit
def _rotate(x_ptr, o_ptr, stride_h, stride_oh, H, HALF, cos1, cos2, sin1, sin2,
            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (cols < HALF)
    x_at = x_ptr + heads * stride_h + cols
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1), one half at a time
    o1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    o2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    o_at = o_ptr + heads * stride_oh + cols
    tl.store(o_at, _saturate(o1.to(x_ptr.dtype.element_ty), o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_at + HALF, _saturate(o2.to(x_ptr.dtype.element_ty), o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _saturate(x, dtype: tl.constexpr):
    """x (already rounded to the input's dtype) in `dtype`. Into FP8 e4m3 (a serving KV cache,
    `serving.kv_cache`): clamped to +-448 as `kv_cache.to_cache` does, and rounded to FP8's grid in
    float32 first (to nearest, ties to even: 3 mantissa bits, or steps of 2**-9 below 2**-6), so that
    the cast itself is exact. Triton's interpreter loses the carry when a value rounds up into the
    next power of two (31.46 became 16, not 32); a GPU's cast would round the same way as this."""
    if dtype == tl.float8e4nv:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # -1048576: 0xFFF00000
        tiny = ((tl.abs(x) * 512.0 + 12582912.0) - 12582912.0) / 512.0   # 1.5 * 2**23: rounds to an integer
        tiny = (tiny.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)   # x's sign
        x = tl.where(tl.abs(x) < 0.015625, tiny, normal)
    return x.to(dtype)


@triton.jit
def _angles(cos_at, sin_at, HALF, BLOCK_D: tl.constexpr):
    """One token's cos and sin (pointers to its rows), each as two halves in float32."""
    cols = tl.arange(0, BLOCK_D)
    mask = cols < HALF
    cos1 = tl.load(cos_at + cols, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_at + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_at + cols, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_at + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, HQ, HK, HALF,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_t, ss_b, ss_t,
                 sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    # this token's angles, loaded once and shared by every head of q and k
    cos1, cos2, sin1, sin2 = _angles(cos_ptr + b * sc_b + t * sc_t, sin_ptr + b * ss_b + t * ss_t, HALF, BLOCK_D)
    _rotate(q_ptr + b * sq_b + t * sq_t, qo_ptr + b * sqo_b + t * sqo_t, sq_h, sqo_h, HQ, HALF,
            cos1, cos2, sin1, sin2, BLOCK_HQ, BLOCK_D)
    _rotate(k_ptr + b * sk_b + t * sk_t, ko_ptr + b * sko_b + t * sko_t, sk_h, sko_h, HK, HALF,
            cos1, cos2, sin1, sin2, BLOCK_HK, BLOCK_D)


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, T, D), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, _, T, D = q.shape
    if D % 2:
        raise ValueError(f"q's head dim D must be even, got {D}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"k must be (B={B}, Hk, T={T}, D={D}) like q, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, D):
            raise ValueError(f"{name} must be (B={B} or 1, T={T}, D={D}), got {tuple(t.shape)}")


def _output(buf, name: str, like):
    if buf is None:
        return torch.empty_like(like)  # keeps a transposed view's layout when it is dense
    if buf.shape != like.shape or buf.dtype != like.dtype or buf.stride(-1) != 1:
        raise ValueError(f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} with a contiguous "
                         f"last dim, got {buf.dtype} {tuple(buf.shape)} strides {buf.stride()}")
    return buf


@compiler_opaque
def rope_triton(q, k, cos, sin, q_out=None, k_out=None):
    """The kernel; returns (q_out, k_out) in q's dtype, same contract as `rope_reference`.

    cos/sin may have batch 1 (one set of positions for the whole batch, as transformers often has)."""
    _check(q, k, cos, sin)
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    q_out, k_out = _output(q_out, "q_out", q), _output(k_out, "k_out", k)
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    if B * T:
        sc_b = cos.stride(0) if cos.shape[0] > 1 else 0  # batch 1: every sequence reads the same angles
        ss_b = sin.stride(0) if sin.shape[0] > 1 else 0
        _rope_kernel[(B * T,)](
            q, k, cos, sin, q_out, k_out, T, HQ, HK, D // 2,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            sc_b, cos.stride(1), ss_b, sin.stride(1),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            BLOCK_HQ=next_power_of_2(HQ), BLOCK_HK=next_power_of_2(HK), BLOCK_D=next_power_of_2(D // 2))
    return q_out, k_out


def rope(q, k, cos, sin, backend: str = "auto"):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) by cos/sin (B, T, D); returns (q_embed, k_embed).

    backend: "triton" (the kernel), "torch" (the reference), "auto" (the kernel on a GPU)."""
    _check(q, k, cos, sin)   # on every backend, so a call fails alike on a CPU and a GPU
    if use_triton(q, backend):
        return rope_triton(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)
