"""Paged attention (lessons 09-10): the cache writes and reads, the references against plain attention on
contiguous K/V, and the Triton decode kernel against the reference (in the interpreter on CPU: small sizes).

Every cache starts as random garbage and every sequence's blocks are shuffled, so a read from a wrong slot,
a wrong block or past a context's end changes the answer; kernel outputs are filled with nan first, so an
element the kernel fails to write fails the comparison."""
import pytest
import torch
import torch.nn.functional as F

# llmopt.kernels first: on a machine without CUDA it sets TRITON_INTERPRET=1 before triton is imported
from llmopt.kernels import common  # noqa: F401

pytest.importorskip("triton")

from llmopt.serving import attention  # noqa: E402
from llmopt.serving.attention import (  # noqa: E402
    gather_kv,
    paged_decode,
    paged_decode_reference,
    paged_decode_rope,
    paged_decode_triton,
    paged_prefill_reference,
    rope_write_kv,
    rope_write_kv_reference,
    write_kv,
)

# Kernel and reference both compute in float32 and round once to q's dtype; they differ by the order of the
# float32 sums (online softmax over blocks vs one softmax: ~1e-7 relative) and, in 16-bit dtypes, by one
# unit in the last place where the two land either side of a rounding boundary: 2**-10 (~1e-3) in fp16,
# 2**-7 (~8e-3) in bf16. The tolerances are about twice that; float32 gets 1e-5.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lengths_for(bs):
    """Context lengths that hit the edges: one token, exactly one block, one past it, several blocks, a few."""
    return [1, bs, bs + 1, 3 * bs + 2, 2]


def cdiv(a, b):
    return -(-a // b)


class Batch:
    """A random paged cache holding `lengths` sequences, written through write_kv, and its contiguous truth."""

    def __init__(self, lengths, bs, Hk, D, dtype=torch.float32, seed=0, spare=3, table_dtype=torch.int32):
        g = torch.Generator().manual_seed(seed)
        needed = [cdiv(n, bs) for n in lengths]
        num_blocks = sum(needed) + spare  # spare blocks stay garbage
        self.k_cache = torch.randn(num_blocks, bs, Hk, D, generator=g).to(DEVICE, dtype)
        self.v_cache = torch.randn(num_blocks, bs, Hk, D, generator=g).to(DEVICE, dtype)
        self.garbage = (self.k_cache.clone(), self.v_cache.clone())
        perm = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous, out-of-order blocks
        self.tables, self.ks, self.vs, slots = [], [], [], []
        for n, nb in zip(lengths, needed):
            table, perm = perm[:nb], perm[nb:]
            self.tables.append(table)
            self.ks.append(torch.randn(n, Hk, D, generator=g).to(DEVICE, dtype))
            self.vs.append(torch.randn(n, Hk, D, generator=g).to(DEVICE, dtype))
            slots += [table[p // bs] * bs + p % bs for p in range(n)]
        write_kv(self.k_cache, self.v_cache, torch.cat(self.ks), torch.cat(self.vs),
                 torch.tensor(slots, device=DEVICE))
        width = max(needed) + 1  # every row padded; pad with 0 and the last block: real blocks, wrong data
        rows = [t + [(0, num_blocks - 1)[i % 2]] * (width - len(t)) for i, t in enumerate(self.tables)]
        self.block_tables = torch.tensor(rows, dtype=table_dtype, device=DEVICE)
        self.context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        self.lengths = lengths

    def args(self):
        return self.k_cache, self.v_cache, self.block_tables, self.context_lens


def randn(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def attend(q, k, v, scale, causal_from=None):
    """Plain attention in float32 on contiguous K/V: q (T, Hq, D), k/v (L, Hk, D), kv heads repeated for GQA.

    causal_from: the position of q's first row (query i sees keys 0 .. causal_from + i); None: all keys."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", q.float(), k) * scale
    if causal_from is not None:
        T, L = q.shape[0], k.shape[0]
        visible = torch.arange(L)[None, :] <= causal_from + torch.arange(T)[:, None]
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)


# ---------------------------------------------------------------- write_kv, gather_kv

@pytest.mark.parametrize("bs", [4, 16])
def test_write_kv_puts_each_token_at_its_slot_and_nowhere_else(bs):
    b = Batch(lengths_for(bs), bs, Hk=2, D=8)
    k_expect, v_expect = b.garbage[0].clone(), b.garbage[1].clone()
    for table, k, v in zip(b.tables, b.ks, b.vs):
        for p in range(k.shape[0]):
            k_expect[table[p // bs], p % bs] = k[p]
            v_expect[table[p // bs], p % bs] = v[p]
    assert torch.equal(b.k_cache, k_expect) and torch.equal(b.v_cache, v_expect)


def test_write_kv_skips_negative_slots():
    k_cache, v_cache = randn(3, 4, 2, 8), randn(3, 4, 2, 8, seed=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = randn(4, 2, 8, seed=3), randn(4, 2, 8, seed=4)
    write_kv(k_cache, v_cache, k, v, torch.tensor([5, -1, 11, -1], device=DEVICE))
    before_k.view(-1, 2, 8)[[5, 11]] = k[[0, 2]]
    before_v.view(-1, 2, 8)[[5, 11]] = v[[0, 2]]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


@pytest.mark.parametrize("bs", [4, 8])
def test_gather_kv_returns_what_was_written(bs):
    b = Batch(lengths_for(bs), bs, Hk=2, D=8)
    for table, k, v in zip(b.tables, b.ks, b.vs):
        got_k, got_v = gather_kv(b.k_cache, b.v_cache, table + [0, 0], k.shape[0])  # padded table: ignored
        assert got_k.shape == k.shape and torch.equal(got_k, k) and torch.equal(got_v, v)
    k, v = gather_kv(b.k_cache, b.v_cache, torch.tensor(b.tables[3]), 3)  # a prefix, from a tensor table
    assert torch.equal(k, b.ks[3][:3]) and torch.equal(v, b.vs[3][:3])


# ---------------------------------------------------------------- prefill reference

def _rotary(T, D, seed=0):
    """cos and sin (T, D) as Llama builds them: cat(freqs, freqs) at positions in random order."""
    pos = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:T].float()
    freqs = pos[:, None] * 10000.0 ** (-torch.arange(0, D, 2).float() / D)[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,Hq,Hk,D", [(1, 4, 2, 16), (5, 8, 2, 24), (3, 3, 3, 32)])
def test_rope_write_kv_kernel_matches_reference(T, Hq, Hk, D, dtype):
    """Rotary + both cache writes in one launch: q and k views of one merged qkv row, random slots
    in a cache of garbage, a poisoned q output; every other slot of the cache untouched."""
    bs, nb = 4, 6
    qkv = randn(T, (Hq + 2 * Hk) * D, dtype=dtype, seed=T)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    v = qkv[:, (Hq + Hk) * D:].view(T, Hk, D)
    cos, sin = _rotary(T, D)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(D))[:T].to(DEVICE)
    kc, vc = randn(nb, bs, Hk, D, dtype=dtype, seed=2), randn(nb, bs, Hk, D, dtype=dtype, seed=3)
    want_kc, want_vc = kc.clone(), vc.clone()
    want_q = rope_write_kv_reference(q, k, v, cos.to(dtype), sin.to(dtype), want_kc, want_vc, slots)
    got_q = rope_write_kv(q, k, v, cos.to(dtype), sin.to(dtype), kc, vc, slots, backend="triton")
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(kc, want_kc, **TOL[dtype])
    assert torch.equal(vc, want_vc)                          # a copy: exact
    assert not torch.equal(kc, randn(nb, bs, Hk, D, dtype=dtype, seed=2))   # it did write


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [None, 1, 2, 3, 100])
@pytest.mark.parametrize("bs,Hq,Hk,D", [(4, 4, 2, 16), (16, 6, 3, 24)])
def test_decode_with_rope_and_cache_write_in_the_kernel(bs, Hq, Hk, D, splits, dtype):
    """`paged_decode_rope`: the decode kernel rotates q and the new k and stores k and v itself; equals
    rope_write_kv then paged_decode (the reference), whichever piece of the context the new token falls
    in. The new token's slot holds nan before the call: the kernel's own row comes from registers, and
    the store lands there; every other slot stays as it was."""
    b = Batch(lengths_for(bs), bs, Hk, D, dtype=dtype, seed=bs + D)
    B = len(b.lengths)
    qkv = randn(B, (Hq + 2 * Hk) * D, dtype=dtype, seed=D)     # q, k, v: views of one merged projection
    q, k, v = (t.view(B, -1, D) for t in qkv.split([Hq * D, Hk * D, Hk * D], dim=-1))
    cos, sin = (t.to(dtype) for t in _rotary(B, D, seed=bs))
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(b.tables, b.lengths)], device=DEVICE)
    for cache in (b.k_cache, b.v_cache):
        cache.view(-1, Hk, D)[slots] = float("nan")
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    kc2, vc2 = b.k_cache.clone(), b.v_cache.clone()
    want = paged_decode_rope(q, k, v, cos, sin, slots, kc, vc, b.block_tables, b.context_lens, backend="torch")
    out = torch.full_like(q, float("nan"))
    got = paged_decode_triton(q, *b.args(), out=out, splits=splits, rope=(k, v, cos, sin, slots))
    assert got is out
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(b.k_cache, kc, **TOL[dtype])
    assert torch.equal(b.v_cache, vc)
    q2 = rope_write_kv(q, k, v, cos, sin, kc2, vc2, slots, backend="triton")   # the two-kernel path
    assert torch.equal(b.k_cache, kc2)
    assert torch.equal(got, paged_decode_triton(q2, kc2, vc2, b.block_tables, b.context_lens, splits=splits))


def test_rope_write_kv_reference_is_rope_then_write_kv():
    from llmopt.kernels.rope import rope_reference

    T, Hq, Hk, D = 4, 4, 2, 8
    q, k, v = randn(T, Hq, D, seed=4), randn(T, Hk, D, seed=5), randn(T, Hk, D, seed=6)
    cos, sin = _rotary(T, D, seed=1)
    kc, vc = torch.zeros(3, 4, Hk, D, device=DEVICE), torch.zeros(3, 4, Hk, D, device=DEVICE)
    slots = torch.tensor([9, 0, 4, 7], device=DEVICE)
    got = rope_write_kv(q, k, v, cos, sin, kc, vc, slots, backend="torch")
    q2, k2 = rope_reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv(kc2, vc2, k2[0].transpose(0, 1), v, slots)
    torch.testing.assert_close(got, q2[0].transpose(0, 1))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("Hq,Hk", [(2, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("start", [0, 4, 5, 13])  # whole prompt; after a cached block; mid-block; last token only
def test_prefill_reference_is_causal_attention_on_contiguous_kv(Hq, Hk, start):
    bs, D = 4, 16
    b = Batch([14, 6], bs, Hk, D)
    q_all = randn(14, Hq, D)  # queries of every position; the chunk's are the rows from `start`
    scale = D ** -0.5
    got = paged_prefill_reference(q_all[start:], b.k_cache, b.v_cache, b.tables[0], start, scale)
    want = attend(q_all, b.ks[0], b.vs[0], scale, causal_from=0)[start:]  # the full prompt's attention, its tail
    assert got.shape == (14 - start, Hq, D)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    if start == 0:  # and the same as SDPA's own causal attention on the contiguous K/V
        k, v = (t.repeat_interleave(Hq // Hk, 1).transpose(0, 1) for t in (b.ks[0], b.vs[0]))
        sdpa = F.scaled_dot_product_attention(q_all.transpose(0, 1), k, v, is_causal=True)
        torch.testing.assert_close(got, sdpa.transpose(0, 1), **TOL[torch.float32])


def test_prefill_reference_without_enable_gqa(monkeypatch):
    """The torch < 2.5 path (kv heads repeated by hand) gives the same answer."""
    b = Batch([9], 4, 2, 16)
    q = randn(4, 8, 16)
    want = paged_prefill_reference(q, b.k_cache, b.v_cache, b.tables[0], 5)
    monkeypatch.setattr(attention, "_SDPA_GQA", False)
    torch.testing.assert_close(paged_prefill_reference(q, b.k_cache, b.v_cache, b.tables[0], 5), want,
                               **TOL[torch.float32])


# ---------------------------------------------------------------- decode reference

@pytest.mark.parametrize("Hq,Hk", [(2, 2), (8, 2), (4, 1)])
def test_decode_reference_is_the_last_query_over_contiguous_kv(Hq, Hk):
    bs, D = 4, 16
    b = Batch(lengths_for(bs), bs, Hk, D)
    q = randn(len(b.lengths), Hq, D)
    got = paged_decode_reference(q, *b.args(), scale=0.3)
    for i, (k, v) in enumerate(zip(b.ks, b.vs)):
        torch.testing.assert_close(got[i], attend(q[i:i + 1], k, v, 0.3)[0], **TOL[torch.float32])
        # and the last row of the prefill of the same sequence
        last = paged_prefill_reference(q[i:i + 1], b.k_cache, b.v_cache, b.tables[i], k.shape[0] - 1, 0.3)
        torch.testing.assert_close(got[i], last[0], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hk,D,bs", [(2, 2, 16, 4), (8, 2, 32, 8), (4, 1, 24, 16)])
def test_batched_decode_matches_reference(Hq, Hk, D, bs, dtype):
    from llmopt.serving.attention import paged_decode_torch

    b = Batch(lengths_for(bs), bs, Hk, D, dtype=dtype)
    q = randn(len(b.lengths), Hq, D, dtype=dtype)
    got = paged_decode_torch(q, *b.args(), scale=0.5)
    torch.testing.assert_close(got, paged_decode_reference(q, *b.args(), scale=0.5), **TOL[dtype])
    attention._SDPA_GQA, old = False, attention._SDPA_GQA   # the repeat-the-kv-heads fallback
    try:
        torch.testing.assert_close(paged_decode_torch(q, *b.args(), scale=0.5), got, **TOL[dtype])
    finally:
        attention._SDPA_GQA = old


# ---------------------------------------------------------------- the kernel

CASES = [(Hq, Hk, D, bs) for Hq, Hk in [(2, 2), (8, 2), (4, 1)] for D, bs in [(16, 4), (32, 8), (24, 16)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hk,D,bs", CASES)
def test_decode_triton_matches_reference(Hq, Hk, D, bs, dtype):
    b = Batch(lengths_for(bs), bs, Hk, D, dtype=dtype)
    q = randn(len(b.lengths), Hq, D, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_triton(q, *b.args(), scale=D ** -0.5, out=out)
    assert got is out
    torch.testing.assert_close(got, paged_decode_reference(q, *b.args(), scale=D ** -0.5), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 3, 100])
@pytest.mark.parametrize("Hq,Hk,D,bs", [(8, 2, 24, 4), (4, 1, 16, 8)])
def test_decode_triton_split_context_matches_reference(Hq, Hk, D, bs, splits, dtype):
    """Flash-Decoding: the context cut into pieces (1: none; 100: more than the table has blocks, so
    one block each and most pieces past the short contexts) gives the reference's answer."""
    b = Batch(lengths_for(bs) + [7 * bs - 1], bs, Hk, D, dtype=dtype, seed=splits)
    q = randn(len(b.lengths), Hq, D, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_triton(q, *b.args(), scale=D ** -0.5, out=out, splits=splits)
    torch.testing.assert_close(got, paged_decode_reference(q, *b.args(), scale=D ** -0.5), **TOL[dtype])


def test_num_splits_fills_the_machine_but_never_cuts_a_block():
    cpu = torch.device("cpu")         # counted as 8 SMs: about 16 programs wanted
    assert attention.num_splits(1, 4, 128, cpu) == 4
    assert attention.num_splits(1, 1, 3, cpu) == 3            # capped by the table's width
    assert attention.num_splits(64, 8, 128, cpu) == 1         # enough programs without splitting


def test_decode_triton_large_scores_and_strided_q():
    """Scores in the hundreds (exp overflows float32 without the running max), the largest in a late block,
    int64 tables, and q a strided slice of a fused qkv tensor."""
    bs, Hq, Hk, D = 4, 4, 2, 16
    b = Batch([1, 11, 17], bs, Hk, D, table_dtype=torch.int64)
    b.k_cache *= 30
    b.k_cache[b.tables[2][-1]] *= 3  # the last block of the longest sequence holds the biggest scores
    qkv = randn(3, Hq + 2 * Hk, D)
    q = qkv[:, :Hq]
    assert not q.is_contiguous()
    want = paged_decode_reference(q, *b.args(), scale=1.0)
    assert want.isfinite().all()
    torch.testing.assert_close(paged_decode_triton(q, *b.args(), scale=1.0), want, **TOL[torch.float32])


def test_decode_triton_empty_batch():
    b = Batch([3], 4, 1, 16)
    q = randn(0, 2, 16)
    got = paged_decode_triton(q, b.k_cache, b.v_cache, b.block_tables[:0], b.context_lens[:0])
    assert got.shape == (0, 2, 16)


# ---------------------------------------------------------------- the wrapper

def test_paged_decode_backends(monkeypatch):
    b = Batch(lengths_for(4), 4, 2, 16)
    q = randn(len(b.lengths), 4, 16)
    want = paged_decode_reference(q, *b.args())
    batched = paged_decode(q, *b.args(), backend="torch")                 # paged_decode_torch
    torch.testing.assert_close(batched, want, **TOL[torch.float32])
    assert torch.equal(paged_decode(q, *b.args(), scale=16 ** -0.5, backend="torch"), batched)  # default scale
    torch.testing.assert_close(paged_decode(q, *b.args(), backend="triton"), want, **TOL[torch.float32])

    def boom(*args, **kwargs):
        raise AssertionError("the kernel was launched")

    monkeypatch.setattr(attention, "paged_decode_triton", boom)
    if DEVICE == "cpu":  # auto keeps CPU tensors on the batched reference
        assert torch.equal(paged_decode(q, *b.args()), batched)
    with pytest.raises(AssertionError, match="kernel was launched"):
        paged_decode(q, *b.args(), backend="triton")


# ---------------------------------------------------------------- bad input

def _bad_calls():
    b = Batch([5, 9], 4, 2, 16)
    kc, vc, bt, cl = b.args()
    q = randn(2, 4, 16)
    dec = paged_decode_reference
    return [
        ("multiple of the cache's kv heads", lambda: dec(randn(2, 3, 16), kc, vc, bt, cl)),
        ("head_dim", lambda: dec(randn(2, 4, 8), kc, vc, bt, cl)),
        ("q must have shape", lambda: dec(q[0], kc, vc, bt, cl)),
        ("block_tables must be", lambda: dec(q, kc, vc, bt[:1], cl)),
        ("block_tables must be", lambda: dec(q, kc, vc, bt.float(), cl)),
        ("context_lens must be an integer", lambda: dec(q, kc, vc, bt, cl[:1])),
        ("context_lens must be in", lambda: dec(q, kc, vc, bt, torch.tensor([5, 17], device=DEVICE))),
        ("context_lens must be in", lambda: dec(q, kc, vc, bt, torch.tensor([0, 9], device=DEVICE))),
        ("block ids in", lambda: dec(q, kc, vc, torch.tensor([[0, 1, 2], [3, 99, 4]], device=DEVICE), cl)),
        ("v_cache must match", lambda: dec(q, kc, vc[:, :, :1], bt, cl)),
        ("k_cache must have shape", lambda: dec(q, kc[0], vc, bt, cl)),
        ("power-of-2 block_size", lambda: paged_decode_triton(q, randn(8, 6, 2, 16), randn(8, 6, 2, 16), bt, cl)),
        ("out must be", lambda: paged_decode_triton(q, kc, vc, bt, cl, out=torch.empty(2, 4, 8, device=DEVICE))),
        ("backend must be", lambda: paged_decode(q, kc, vc, bt, cl, backend="cuda")),
        ("k must have shape", lambda: write_kv(kc, vc, randn(3, 2, 8), randn(3, 2, 8), torch.arange(3))),
        ("v must have", lambda: write_kv(kc, vc, randn(3, 2, 16), randn(2, 2, 16), torch.arange(3))),
        ("slot_mapping must be", lambda: write_kv(kc, vc, randn(3, 2, 16), randn(3, 2, 16), torch.arange(2))),
        ("length must be in", lambda: gather_kv(kc, vc, b.tables[0], 9)),
        ("block ids must be in", lambda: gather_kv(kc, vc, [0, 99], 6)),
        ("start must be", lambda: paged_prefill_reference(q, kc, vc, b.tables[1], -1)),
        ("length must be in", lambda: paged_prefill_reference(randn(4, 4, 16), kc, vc, b.tables[0], 5)),
        ("multiple of the cache's kv heads", lambda: paged_prefill_reference(randn(4, 3, 16), kc, vc, b.tables[1], 0)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_value_error(i):
    match, call = _bad_calls()[i]
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_gpu_decode_bf16():
    bs, Hq, Hk, D = 16, 32, 8, 128
    b = Batch([1, 16, 17, 500, 1000, 77], bs, Hk, D, dtype=torch.bfloat16)
    q = randn(len(b.lengths), Hq, D, dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_triton(q, *b.args(), out=out)
    torch.testing.assert_close(got, paged_decode_reference(q, *b.args()), **TOL[torch.bfloat16])
    assert torch.equal(paged_decode(q, *b.args()), got)  # auto takes the kernel on a GPU
    one = paged_decode_triton(q, *b.args(), splits=1)     # the default cut the contexts in pieces here
    assert attention.num_splits(len(b.lengths), Hk, b.block_tables.shape[1], q.device) > 1
    torch.testing.assert_close(one, got, **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_decode_rope_bf16():
    """TinyLlama's heads at batch 1 and 3: the fused rotary + cache write + attention against the two ops."""
    bs, Hq, Hk, D = 16, 32, 4, 64
    b = Batch([1, 97, 300], bs, Hk, D, dtype=torch.bfloat16)
    B = len(b.lengths)
    q, k, v = randn(B, Hq, D, dtype=torch.bfloat16), randn(B, Hk, D, dtype=torch.bfloat16, seed=2), \
        randn(B, Hk, D, dtype=torch.bfloat16, seed=3)
    cos, sin = (x.to(torch.bfloat16) for x in _rotary(B, D))
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(b.tables, b.lengths)], device=DEVICE)
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    want = paged_decode_rope(q, k, v, cos, sin, slots, kc, vc, b.block_tables, b.context_lens, backend="torch")
    for rows in (slice(0, 1), slice(0, B)):
        got = paged_decode_rope(q[rows], k[rows], v[rows], cos[rows], sin[rows], slots[rows], b.k_cache, b.v_cache,
                                b.block_tables[rows], b.context_lens[rows])   # auto: the kernel on a GPU
        torch.testing.assert_close(got, want[rows], **TOL[torch.bfloat16])
    torch.testing.assert_close(b.k_cache, kc, **TOL[torch.bfloat16])
    assert torch.equal(b.v_cache, vc)


@pytest.mark.gpu
def test_gpu_rope_write_kv_bf16():
    T, Hq, Hk, D = 7, 32, 4, 64
    q, k, v = randn(T, Hq, D, dtype=torch.bfloat16), randn(T, Hk, D, dtype=torch.bfloat16, seed=2), \
        randn(T, Hk, D, dtype=torch.bfloat16, seed=3)
    cos, sin = (x.to(torch.bfloat16) for x in _rotary(T, D))
    slots = torch.tensor([40, 3, 17, 0, 63, 22, 9], device=DEVICE)
    kc, vc = randn(4, 16, Hk, D, dtype=torch.bfloat16, seed=4), randn(4, 16, Hk, D, dtype=torch.bfloat16, seed=5)
    kc2, vc2 = kc.clone(), vc.clone()
    want = rope_write_kv_reference(q, k, v, cos, sin, kc2, vc2, slots)
    got = rope_write_kv(q, k, v, cos, sin, kc, vc, slots)   # auto: the kernel on a GPU
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    torch.testing.assert_close(kc, kc2, **TOL[torch.bfloat16])
    assert torch.equal(vc, vc2)
