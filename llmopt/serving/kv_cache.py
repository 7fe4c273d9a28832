"""The paged KV cache's storage: where a token's keys and values go and how they come back.

Per layer the cache is two tensors, `k_cache` and `v_cache`, each of shape (num_blocks, block_size,
num_kv_heads, head_dim); slot s = block_id * block_size + offset (`attention.py` explains the blocks).

- `write_kv` stores the new tokens' K/V at their slots (the runner computes `slot_mapping`).
- `gather_kv` copies one sequence's K/V back into contiguous tensors: the reference path's building block.
- `rope_write_kv`: what a layer does between its projections and attention, rotary embedding on q
  and k and both cache writes, in one launch on a GPU (`rope_write_kv_reference` is the spec).

FP8 cache (vLLM's `kv_cache_dtype="fp8"`): the cache tensors may be float8_e4m3fn, one byte per value
where bf16 takes two (fp32 four), so the same memory holds twice (four times) the tokens. Keys and
values are rounded to FP8 as they are written (`to_cache`: saturating at +-448, FP8's largest finite
value, with no scale: vLLM's default without calibrated scales) and widened back to float32 (or q's
dtype) as attention reads them; everything else is unchanged. Every writer here, PyTorch or kernel,
rounds first to the dtype the model computes in and then to FP8, so all paths store the same bytes.
"""
from __future__ import annotations

import torch

from ..kernels.common import compiler_opaque, next_power_of_2, tl, triton, use_triton
from ..kernels.rope import _angles, _rotate, _saturate, rope_reference

# ---------------------------------------------------------------- cache access

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0        # float8_e4m3fn's largest finite value (it has no infinity)


def to_cache(x, dtype: torch.dtype):
    """x rounded to the cache's dtype; into FP8 saturating at +-FP8_MAX instead of overflowing."""
    if dtype == FP8:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def _store(cache, slots, x):
    """cache slots[i] <- x[i] (rounded by `to_cache`), the cache viewed as (slots, Hk, D)."""
    flat, x = cache.view(-1, *cache.shape[2:]), to_cache(x, cache.dtype)
    if cache.dtype == FP8:   # index_copy_ has no FP8 kernel on the CPU: copy the bytes
        flat, x = flat.view(torch.uint8), x.view(torch.uint8)
    flat.index_copy_(0, slots, x)


def _check_cache(k_cache, v_cache):
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have shape (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(f"v_cache must match k_cache ({k_cache.dtype} {tuple(k_cache.shape)} on {k_cache.device}), "
                         f"got {v_cache.dtype} {tuple(v_cache.shape)} on {v_cache.device}")


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Store the keys/values k, v (T, Hk, D) of T new tokens at their cache slots (slot_mapping, (T,)).

    A negative slot (-1: a padding token) is skipped. The cache is written in place."""
    _check_cache(k_cache, v_cache)
    _, _, Hk, D = k_cache.shape
    if k.dim() != 3 or tuple(k.shape[1:]) != (Hk, D):
        raise ValueError(f"k must have shape (T, {Hk}, {D}) to match the cache, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype.is_floating_point:
        raise ValueError(f"slot_mapping must be an integer tensor of shape ({k.shape[0]},), "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    keep = slots >= 0
    # (num_blocks, block_size, ...) is row-major, so flattening the first two dims numbers the slots
    _store(k_cache, slots[keep], k[keep])
    _store(v_cache, slots[keep], v[keep])


def gather_kv(k_cache, v_cache, block_table, length: int, check: bool = True):
    """The first `length` keys and values of one sequence, as contiguous (length, Hk, D) tensors.

    block_table: the sequence's block ids (a list or a 1-D tensor), at least ceil(length / block_size).
    `check=False` skips the block-id range check (a host sync on a GPU): for callers that built the table."""
    _check_cache(k_cache, v_cache)
    num_blocks, block_size, Hk, D = k_cache.shape
    table = torch.as_tensor(block_table, dtype=torch.long, device=k_cache.device)
    n = -(-int(length) // block_size)
    if table.dim() != 1:
        raise ValueError(f"block_table must be 1-D, got shape {tuple(table.shape)}")
    if length < 0 or n > table.numel():
        raise ValueError(f"length must be in [0, {table.numel() * block_size}] (the block_table's capacity), "
                         f"got {length}")
    blocks = table[:n]
    if check and n and not (0 <= int(blocks.min()) and int(blocks.max()) < num_blocks):
        raise ValueError(f"block_table's first {n} block ids must be in [0, {num_blocks}), got {blocks.tolist()}")
    # whole blocks in table order, then drop the unused slots of the last one
    k = k_cache[blocks].reshape(n * block_size, Hk, D)[:length]
    v = v_cache[blocks].reshape(n * block_size, Hk, D)[:length]
    return k, v


# ---------------------------------------------------------------- rotary embedding + cache write, one launch

def rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    """What a layer does between its projections and attention, in PyTorch: rotate q (T, Hq, D) and
    k (T, Hk, D) by cos/sin (T, D) (lesson 08's `rope_reference`), store the rotated k and v (T, Hk, D)
    at their cache slots (T,), all valid. Returns the rotated q."""
    q_rot, k_rot = rope_reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    _store(k_cache, slots, k_rot[0].transpose(0, 1))
    _store(v_cache, slots, v)
    return q_rot[0].transpose(0, 1)


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slots_ptr,
                       HQ, HK, HALF, D, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, ss_t, sqo_t, sqo_h, s_slot, s_head,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, D_P: tl.constexpr):
    """One program per token: its q heads rotated to qo, its k heads rotated straight into the key
    cache at the token's slot, its v heads copied into the value cache there."""
    t = tl.program_id(0).to(tl.int64)
    cos1, cos2, sin1, sin2 = _angles(cos_ptr + t * sc_t, sin_ptr + t * ss_t, HALF, BLOCK_D)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    _rotate(q_ptr + t * sq_t, qo_ptr + t * sqo_t, sq_h, sqo_h, HQ, HALF, cos1, cos2, sin1, sin2, BLOCK_HQ, BLOCK_D)
    _rotate(k_ptr + t * sk_t, kc_ptr + slot * s_slot, sk_h, s_head, HK, HALF, cos1, cos2, sin1, sin2,
            BLOCK_HK, BLOCK_D)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    d = tl.arange(0, D_P)[None, :]
    vmask = (heads < HK) & (d < D)
    x = tl.load(v_ptr + t * sv_t + heads * sv_h + d, mask=vmask, other=0.0)
    tl.store(vc_ptr + slot * s_slot + heads * s_head + d, _saturate(x, vc_ptr.dtype.element_ty), mask=vmask)


def rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, backend: str = "auto"):
    """Rotate q and k, write k and v into the paged cache: `rope_write_kv_reference`'s contract, in
    one launch on a GPU instead of three (rotary, then one write each for keys and values). q, k, v may
    be strided views (of a merged qkv projection) with a contiguous last dim; slots must all be valid.
    backend: "triton", "torch" (the reference), "auto" (the kernel on a GPU)."""
    _check_cache(k_cache, v_cache)
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if k.shape != (T, Hk, D) or v.shape != k.shape or tuple(k_cache.shape[2:]) != (Hk, D):
        raise ValueError(f"q (T, Hq, D), k and v (T, Hk, D) must match the cache's (Hk, D) = "
                         f"{tuple(k_cache.shape[2:])}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cos.shape != (T, D) or sin.shape != (T, D) or slots.shape != (T,):
        raise ValueError(f"cos and sin must be (T, D) = ({T}, {D}) and slots (T,), got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}, {tuple(slots.shape)}")
    if D % 2:
        raise ValueError(f"head_dim must be even for the rotary embedding, got {D}")
    if not use_triton(q, backend):
        return rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    return _rope_write_triton(q, k, v, cos, sin, k_cache, v_cache, slots)


@compiler_opaque
def _rope_write_triton(q, k, v, cos, sin, k_cache, v_cache, slots):
    (T, Hq, D), Hk = q.shape, k.shape[1]
    q, k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cos, sin))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the kernel writes into contiguous k_cache and v_cache")
    q_out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if T:
        _rope_write_kernel[(T,)](
            q, k, v, cos, sin, q_out, k_cache, v_cache, slots, Hq, Hk, D // 2, D,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            sin.stride(0), q_out.stride(0), q_out.stride(1), Hk * D, D,
            BLOCK_HQ=next_power_of_2(Hq), BLOCK_HK=next_power_of_2(Hk), BLOCK_D=next_power_of_2(D // 2),
            D_P=next_power_of_2(D))
    return q_out
