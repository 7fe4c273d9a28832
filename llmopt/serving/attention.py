"""Paged attention (vLLM's PagedAttention, Kwon et al. 2023): attention over a KV cache kept in blocks.

A serving engine cannot give each sequence one contiguous KV buffer sized for its longest possible
output: that reserves memory it may never use and fragments what is left. vLLM cuts the cache into
fixed-size blocks of `block_size` token slots, as an OS cuts memory into pages, and hands them out one
at a time as a sequence grows. Per layer the cache is two tensors, `k_cache` and `v_cache`, each of
shape (num_blocks, block_size, num_kv_heads, head_dim); slot s = block_id * block_size + offset.

A sequence's keys and values are therefore scattered over blocks that need not be adjacent or in
order. Its block table (a list of block ids, the page table) says where: the token at position p lives
in block `table[p // block_size]` at offset `p % block_size`. Attention reads K/V through the table
instead of from one slice; everything else is ordinary attention.

- `kv_cache.py`: writing the new tokens' K/V at their slots (`write_kv`, and `rope_write_kv`, which
  rotates q and k on the way), reading a sequence's back (`gather_kv`), and the FP8 cache (one byte
  per value: the functions here widen what they read, and the kernel rounds the new token it stores
  as `kv_cache.to_cache` does).
- `paged_prefill_reference`: causal attention of a prompt chunk (positions start .. start+T-1) over
  everything cached before it, as chunked prefill and prefix caching need.
- `paged_decode_reference` / `paged_decode_triton` / `paged_decode`: one new query per sequence over its
  whole context, the step that dominates generation. The kernel reads each K/V block once per kv head.
  Where (sequence, kv head) pairs are too few to fill the GPU (batch 1: a handful), it also cuts each
  context into pieces that run side by side and merges their partial softmaxes (Flash-Decoding).
  `paged_decode_rope` also rotates q and the new k and stores the new k and v, in the same kernel.

GQA: with Hq query heads and Hk kv heads (Hq a multiple of Hk), query head h reads kv head h // (Hq // Hk);
the Hq // Hk query heads sharing a kv head are its group (MHA: groups of 1; MQA: Hk = 1, one group).
"""
from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from ..kernels.common import compiler_opaque, next_power_of_2, pdl, pdl_launch, tl, triton, use_triton
from ..kernels.rope import _saturate
from .kv_cache import (  # noqa: F401 - the cache's functions, also reachable from here
    FP8,
    FP8_MAX,
    _check_cache,
    gather_kv,
    rope_write_kv,
    rope_write_kv_reference,
    to_cache,
    write_kv,
)

# scaled_dot_product_attention took enable_gqa in torch 2.5; before that the kv heads are repeated by hand
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ---------------------------------------------------------------- references

def _check_heads(q, k_cache):
    Hq, D = q.shape[-2:]
    Hk, Dk = k_cache.shape[-2:]
    if Hq % Hk:
        raise ValueError(f"q's number of heads ({Hq}) must be a multiple of the cache's kv heads ({Hk})")
    if D != Dk:
        raise ValueError(f"q's head_dim ({D}) must equal the cache's head_dim ({Dk})")
    if q.device != k_cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {k_cache.device}")
    return Hq // Hk


def paged_prefill_reference(q, k_cache, v_cache, block_table, start: int, scale: float | None = None,
                            check: bool = True):
    """Causal attention of one sequence's queries q (T, Hq, D) at positions start .. start+T-1.

    The K/V of positions 0 .. start+T-1 must already be in the cache (start > 0: the chunk follows a
    cached prefix, from chunked prefill or prefix caching). The query at position start+i sees keys
    0 .. start+i. Runs in q's dtype (SDPA accumulates in float32). Returns (T, Hq, D)."""
    _check_cache(k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must have shape (T, Hq, D), got {tuple(q.shape)}")
    group = _check_heads(q, k_cache)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    T = q.shape[0]
    k, v = gather_kv(k_cache, v_cache, block_table, start + T, check)
    q_, k, v = q.transpose(0, 1), k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1)  # heads first
    if start == 0:
        mask, causal = None, True  # square: SDPA's top-left causal mask is the right one
    else:  # query i (position start+i) sees key j iff j <= start + i: the causal mask, aligned bottom-right
        rows = torch.arange(T, device=q.device)[:, None]
        mask, causal = torch.arange(start + T, device=q.device)[None, :] <= start + rows, False
    if _SDPA_GQA:
        out = F.scaled_dot_product_attention(q_, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=group > 1)
    else:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        out = F.scaled_dot_product_attention(q_, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(0, 1)


def _check_decode(q, k_cache, v_cache, block_tables, context_lens, values: bool = True):
    """Shapes of a decode batch; with `values` (one host sync), that every context fits its table and
    points at real blocks. The serving runner, which builds the tables itself, skips the values: a sync
    per layer would stall the GPU, and CUDA graphs cannot capture one."""
    _check_cache(k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must have shape (batch, Hq, D), got {tuple(q.shape)}")
    group = _check_heads(q, k_cache)
    B = q.shape[0]
    num_blocks, block_size = k_cache.shape[:2]
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype.is_floating_point:
        raise ValueError(f"block_tables must be an integer tensor of shape ({B}, max_blocks), "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if context_lens.shape != (B,) or context_lens.dtype.is_floating_point:
        raise ValueError(f"context_lens must be an integer tensor of shape ({B},), "
                         f"got {context_lens.dtype} {tuple(context_lens.shape)}")
    if block_tables.device != q.device or context_lens.device != q.device:
        raise ValueError(f"block_tables and context_lens must be on q's device {q.device}")
    if B == 0 or not values:
        return group
    capacity = block_tables.shape[1] * block_size
    n_blocks = (context_lens.long() + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1], device=q.device)[None, :] < n_blocks[:, None]
    ids = block_tables.long().masked_fill(~used, 0)  # table entries past a sequence's blocks are padding
    lo, hi, first, last = torch.stack([context_lens.min().long(), context_lens.max().long(),
                                       ids.min(), ids.max()]).tolist()
    if lo < 1 or hi > capacity:
        raise ValueError(f"context_lens must be in [1, {capacity}] (max_blocks * block_size), "
                         f"got values in [{lo}, {hi}]")
    if first < 0 or last >= num_blocks:
        raise ValueError(f"block_tables' used entries must be block ids in [0, {num_blocks}), "
                         f"got values in [{first}, {last}]")
    return group


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None):
    """One decode step's attention: q (B, Hq, D), one query per sequence, over that sequence's cache.

    block_tables (B, max_blocks): each sequence's block ids, padded with anything past its blocks.
    context_lens (B,): how many keys each query sees (its own included, already written). Computed per
    sequence in float32 and rounded to q's dtype: the spec the kernel is tested against. Returns (B, Hq, D)."""
    group = _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        k, v = gather_kv(k_cache, v_cache, block_tables[b], n)  # (n, Hk, D)
        k = k.float().repeat_interleave(group, dim=1)  # (n, Hq, D): query head h reads kv head h // group
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None,
                       check: bool = True):
    """The reference in one batched step, what `paged_decode` runs without the kernel: gather every
    sequence's blocks into one padded (B, max_blocks * block_size) K/V tensor, mask the keys past each
    context, one SDPA. Runs in q's dtype. Returns (B, Hq, D). `check=False`: see `_check_decode`."""
    group = _check_decode(q, k_cache, v_cache, block_tables, context_lens, check)
    B, width = block_tables.shape
    _, block_size, Hk, D = k_cache.shape
    k = k_cache[block_tables.long()].reshape(B, width * block_size, Hk, D).transpose(1, 2).to(q.dtype)
    v = v_cache[block_tables.long()].reshape(B, width * block_size, Hk, D).transpose(1, 2).to(q.dtype)
    mask = torch.arange(width * block_size, device=q.device)[None, :] < context_lens[:, None]
    mask = mask[:, None, None, :]                       # (B, 1, 1, keys): broadcast over heads and the query
    if _SDPA_GQA:
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    else:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)
    return out[:, :, 0]


# ---------------------------------------------------------------- kernel

@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
                         kn_ptr, vn_ptr, cos_ptr, sin_ptr, slots_ptr,
                         scale, GROUP, D, blocks_per_split, num_splits,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_ob, stride_oh, stride_tb, stride_knb, stride_knh, stride_vnb, stride_vnh,
                         stride_cos, stride_sin,
                         BLOCK_SIZE: tl.constexpr, GROUP_P: tl.constexpr, D_P: tl.constexpr, SPLIT: tl.constexpr,
                         ROPE: tl.constexpr, PDL: tl.constexpr = False):
    """One (sequence, kv head) over its context; with SPLIT, over the `blocks_per_split` blocks of
    split number program_id(2), leaving the unnormalised (max, sum, weighted values) for the reduction.
    ROPE: q arrives unrotated and the new token's k and v (kn, vn) not yet cached: the program rotates
    q and k (cos/sin rows of each sequence's position), the one whose piece holds the new position
    stores k and v at the sequence's slot, and the new token's row is taken from registers."""
    if PDL:   # programmatic dependent launch (kernels/common.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    context_len = tl.load(lens_ptr + seq)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(context_len, BLOCK_SIZE))
    g = tl.arange(0, GROUP_P)  # the group's query heads, padded to a power of 2
    d = tl.arange(0, D_P)  # head dim, padded likewise
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & (d < D)[None, :]
    # the whole group's queries at once: every K/V block loaded below serves all of them
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    pos = context_len - 1                                  # the new token's position
    if ROPE:   # x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + D/2] (first half), x[d - D/2]
        half = D // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        cs = tl.load(cos_ptr + seq * stride_cos + d, mask=d < D, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + seq * stride_sin + d, mask=d < D, other=0.0).to(tl.float32)
        qp = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + partner[None, :], mask=q_mask, other=0.0)
        # rounded to q's dtype, as the rotary kernel's output would be
        q = (q.to(tl.float32) * cs[None, :] + sign[None, :] * qp.to(tl.float32) * sn[None, :]).to(q.dtype)
        kn_at = kn_ptr + seq * stride_knb + kv_head * stride_knh
        kn = tl.load(kn_at + d, mask=d < D, other=0.0).to(tl.float32)
        kp = tl.load(kn_at + partner, mask=d < D, other=0.0).to(tl.float32)
        # rounded to k's dtype, as the rotary kernel's output would be, then to the cache's
        k_new = _saturate((kn * cs + sign * kp * sn).to(kn_ptr.dtype.element_ty), k_ptr.dtype.element_ty)
        v_new = tl.load(vn_ptr + seq * stride_vnb + kv_head * stride_vnh + d, mask=d < D, other=0.0)
        v_new = _saturate(v_new, v_ptr.dtype.element_ty)
        if (pos // BLOCK_SIZE) // blocks_per_split == split:   # the piece that holds the new token stores it
            slot = tl.load(slots_ptr + seq).to(tl.int64)
            at = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
            tl.store(k_ptr + at + d, k_new, mask=d < D)
            at = (slot // BLOCK_SIZE) * stride_vb + (slot % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
            tl.store(v_ptr + at + d, v_new, mask=d < D)
    q = q.to(tl.float32) * scale

    m = tl.full((GROUP_P,), float("-inf"), tl.float32)  # running max of the scores seen so far
    l = tl.zeros((GROUP_P,), tl.float32)  # running sum of exp(score - m)  # noqa: E741
    acc = tl.zeros((GROUP_P, D_P), tl.float32)  # running sum of exp(score - m) * v
    offs = tl.arange(0, BLOCK_SIZE)
    for i in range(first, last):
        block = tl.load(tables_ptr + seq * stride_tb + i).to(tl.int64)  # the page table lookup
        valid = i * BLOCK_SIZE + offs < context_len  # the last block may be partly filled
        kv_mask = valid[:, None] & (d < D)[None, :]
        k = tl.load(k_ptr + block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # (BLOCK_SIZE, D_P)
        if ROPE:   # the new token's row from registers: its store above need not be visible yet
            new_row = (i * BLOCK_SIZE + offs == pos)[:, None]
            k = tl.where(new_row, k_new.to(tl.float32)[None, :], k)
        # (GROUP_P, BLOCK_SIZE): a broadcast product, not tl.dot, which needs every dim >= 16 on a GPU
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(valid[None, :], s, float("-inf"))
        # online softmax: every block holds at least one valid key, so m_new is finite and exp(m - m_new)
        # is 0 on the first block (m = -inf), a rescale of the old sums afterwards
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        v = tl.load(v_ptr + block * stride_vb + offs[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        if ROPE:
            v = tl.where(new_row, v_new.to(tl.float32)[None, :], v)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    if SPLIT:   # partials of shape (B, Hq, num_splits[, D]); the reduction skips splits past the context
        row = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split
        keep = g < GROUP
        tl.store(m_ptr + row, m, mask=keep)
        tl.store(l_ptr + row, l, mask=keep)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=keep[:, None] & (d < D)[None, :])
    else:
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _paged_decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, lens_ptr, blocks_per_split, num_splits, D,
                                stride_ob, stride_oh,
                                BLOCK_SIZE: tl.constexpr, SPLITS_P: tl.constexpr, D_P: tl.constexpr,
                                PDL: tl.constexpr = False):
    """One (sequence, query head): merge its splits' partial softmaxes. With M the largest of their
    maxima, each split's sums are rescaled by exp(m - M), exactly as the online softmax rescales
    between blocks; out = sum(acc * w) / sum(l * w)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    context_len = tl.load(lens_ptr + seq)
    used = tl.cdiv(tl.cdiv(context_len, BLOCK_SIZE), blocks_per_split)   # splits that saw a block
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, D_P)
    valid = s < used
    row = (seq * tl.num_programs(1) + head) * num_splits + s
    m = tl.load(m_ptr + row, mask=valid, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))      # 0 for the splits that saw nothing
    l = tl.sum(tl.load(l_ptr + row, mask=valid, other=0.0) * w, axis=0)  # noqa: E741
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=valid[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / l
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def num_splits(batch: int, kv_heads: int, width: int, device) -> int:
    """How many pieces to cut each context into (Flash-Decoding, Dao et al. 2023). One program per
    (sequence, kv head) walks its context block after block, so at batch 1 a GPU with 132 SMs runs a
    handful of programs, each a long chain of dependent loads. Splitting the table's `width` blocks
    into pieces that run side by side, then merging their partial softmaxes, fills the GPU: aim at
    about two programs per SM, and never cut finer than one block."""
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    return max(1, min(width, -(-2 * sms // max(1, batch * kv_heads))))


@cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@compiler_opaque
def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None, out=None,
                        check: bool = True, splits: int | None = None, rope=None):
    """The kernel, one program per (sequence, kv head) and piece of context; same contract as
    `paged_decode_reference`. `splits`: how many pieces the table's blocks are cut into (default:
    `num_splits`, which depends only on shapes, so a CUDA graph can hold it); over 1, a second kernel
    merges the pieces. `rope`: (k, v, cos, sin, slots) of `paged_decode_rope`, whose contract the call
    then has (q unrotated).

    The block size must be a power of 2. `out` (B, Hq, D) in q's dtype may be given pre-allocated.
    `check=False` skips the checks of the tables' values (see `_check_decode`)."""
    group = _check_decode(q, k_cache, v_cache, block_tables, context_lens, check)
    if rope is not None:
        rope = _check_rope(q, k_cache, v_cache, *rope)
    B, Hq, D = q.shape
    block_size, Hk = k_cache.shape[1], k_cache.shape[2]
    if block_size != next_power_of_2(block_size):
        raise ValueError(f"the kernel needs a power-of-2 block_size, got {block_size} (the reference takes any)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a contiguous last dim (head_dim)")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with a "
                         f"contiguous last dim, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    scale = D ** -0.5 if scale is None else scale
    width = max(1, tables.shape[1])
    n = num_splits(B, Hk, width, q.device) if splits is None else max(1, min(int(splits), width))
    per_split = -(-width // n)
    n = -(-width // per_split)       # no empty piece at the end
    m_part = l_part = acc_part = out   # the partials; unused (any tensor will do) without splits
    if n > 1:
        m_part = torch.empty(B, Hq, n, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(B, Hq, n, D, dtype=torch.float32, device=q.device)
    kn, vn, cos, sin, slots = rope if rope is not None else (q, q, q, q, lens)   # unused without ROPE
    on = pdl(q)
    _paged_decode_kernel[(B, Hk, n)](
        q, k_cache, v_cache, out, tables, lens, m_part, l_part, acc_part, kn, vn, cos, sin, slots,
        float(scale), group, D, per_split, n,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), tables.stride(0),
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_SIZE=block_size, GROUP_P=next_power_of_2(group), D_P=next_power_of_2(D), SPLIT=n > 1,
        ROPE=rope is not None, PDL=on, **pdl_launch(on))
    if n > 1:
        _paged_decode_reduce_kernel[(B, Hq)](
            m_part, l_part, acc_part, out, lens, per_split, n, D, out.stride(0), out.stride(1),
            BLOCK_SIZE=block_size, SPLITS_P=next_power_of_2(n), D_P=next_power_of_2(D), PDL=on, **pdl_launch(on))
    return out


def _check_rope(q, k_cache, v_cache, k, v, cos, sin, slots):
    """The new tokens' k, v (B, Hk, D; views with a contiguous last dim), cos, sin (B, D) and cache slots (B,)."""
    B, _, D = q.shape
    Hk = k_cache.shape[2]
    if k.shape != (B, Hk, D) or v.shape != (B, Hk, D):
        raise ValueError(f"k and v must have shape ({B}, {Hk}, {D}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if cos.shape != (B, D) or sin.shape != (B, D) or slots.shape != (B,):
        raise ValueError(f"cos and sin must be ({B}, {D}) and slots ({B},), got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}, {tuple(slots.shape)}")
    if D % 2:
        raise ValueError(f"head_dim must be even for the rotary embedding, got {D}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the kernel writes into contiguous k_cache and v_cache")
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in (k, v, cos, sin, slots))


def paged_decode_rope(q, k, v, cos, sin, slots, k_cache, v_cache, block_tables, context_lens,
                      scale: float | None = None, backend: str = "auto", check: bool = True):
    """A decode step's attention with the rotary embedding and the cache write folded in (one kernel
    where `rope_write_kv` then `paged_decode` take two): q (B, Hq, D) and the new tokens' k, v (B, Hk, D)
    as the projections gave them, unrotated, each sequence's cos/sin row (B, D) and cache slot (B,);
    context_lens include the new token. Rotates q and k, stores k and v at the slots, attends. Returns
    (B, Hq, D). The reference is the two ops in a row."""
    if use_triton(q, backend):
        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, check=check,
                                   rope=(k, v, cos, sin, slots))
    q = rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, backend="torch")
    return paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, check)


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None,
                 backend: str = "auto", check: bool = True):
    """Decode attention over the paged cache: q (B, Hq, D) -> (B, Hq, D). scale defaults to head_dim ** -0.5.

    backend: "triton" (the kernel), "torch" (the batched reference, `paged_decode_torch`), "auto" (the
    kernel on a GPU)."""
    if use_triton(q, backend):
        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, check=check)
    return paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, check)
