"""An FP8 KV cache (vLLM's `kv_cache_dtype="fp8"`): the rounding and saturation of the writes, every
writer (PyTorch and kernels) storing the same bytes, the decode kernel reading FP8 as the reference
does, and the engine with it: 4x the blocks of a float32 cache in the same memory, the kernels' tokens
equal to the PyTorch path's, and next-token predictions close to the float32 cache's."""
import pytest
import torch

from llmopt.kernels import common  # noqa: F401  (sets TRITON_INTERPRET=1 on a machine without CUDA)

pytest.importorskip("triton")

from test_serving_attention import DEVICE, TOL, Batch, _rotary, lengths_for, randn  # noqa: E402

from llmopt.serving import LLM, LLMEngine, SamplingParams, kv_bytes_per_token  # noqa: E402
from llmopt.serving.attention import paged_decode_reference, paged_decode_rope, paged_decode_triton  # noqa: E402
from llmopt.serving.bench import teacher_forced  # noqa: E402
from llmopt.serving.kv_cache import (  # noqa: E402
    FP8,
    FP8_MAX,
    gather_kv,
    rope_write_kv,
    rope_write_kv_reference,
    to_cache,
    write_kv,
)


def fp8_batch(bs, Hk, D, seed, lengths=None):
    """test_serving_attention's random paged cache (float32), its caches rounded to FP8."""
    b = Batch(lengths or lengths_for(bs), bs, Hk, D, seed=seed)
    b.k_cache, b.v_cache = to_cache(b.k_cache, FP8), to_cache(b.v_cache, FP8)
    return b


def close_fp8(got, want):
    """Two FP8 tensors written from the same values by different code: the same bytes, except where a
    last-bit difference in float32 tipped a rounding (then one FP8 step apart, 2**-3 relative)."""
    assert got.dtype == want.dtype == FP8
    same = (got.view(torch.uint8) == want.view(torch.uint8)).float().mean().item()
    assert same > 0.99, same
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -3, atol=2 ** -9)


def test_to_cache_rounds_as_torch_and_saturates():
    x = torch.tensor([0.3, -1.7, 1e-3, 447.0, 448.0, 449.0, 1000.0, -5e4, 0.0])
    got = to_cache(x, FP8)
    assert got.dtype == FP8
    inside = x.abs() <= FP8_MAX
    assert torch.equal(got[inside].view(torch.uint8), x[inside].to(FP8).view(torch.uint8))
    assert got[~inside].float().tolist() == [448.0, 448.0, -448.0]       # the largest finite value, never nan
    assert to_cache(x, torch.float16).dtype == torch.float16            # other dtypes: a plain cast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_into_fp8_stores_each_token_rounded_and_nothing_else(dtype):
    bs, Hk, D, nb = 4, 2, 8, 5
    kc, vc = to_cache(randn(nb, bs, Hk, D, seed=2), FP8), to_cache(randn(nb, bs, Hk, D, seed=3), FP8)
    before_k, before_v = kc.clone(), vc.clone()
    k = (randn(6, Hk, D, seed=4) * 200).to(dtype)                        # some past +-448
    v = randn(6, Hk, D, seed=5).to(dtype)
    slots = torch.tensor([17, 0, -1, 5, 19, 8], device=DEVICE)          # -1: padding, skipped
    write_kv(kc, vc, k, v, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, Hk, D)[slots[keep]].view(torch.uint8), to_cache(k[keep], FP8).view(torch.uint8))
    assert torch.equal(vc.view(-1, Hk, D)[slots[keep]].view(torch.uint8), to_cache(v[keep], FP8).view(torch.uint8))
    others = torch.ones(nb * bs, dtype=torch.bool, device=DEVICE)
    others[slots[keep]] = False
    assert torch.equal(kc.view(-1, Hk, D)[others].view(torch.uint8), before_k.view(-1, Hk, D)[others].view(torch.uint8))
    assert torch.equal(vc.view(-1, Hk, D)[others].view(torch.uint8), before_v.view(-1, Hk, D)[others].view(torch.uint8))
    assert kc.float().abs().max() <= FP8_MAX and not kc.float().isnan().any()
    k_read, _ = gather_kv(kc, vc, [4, 0], 6)      # slots 16..19 then 0, 1: tokens 0, 1 at 17 and 0 ... as written
    assert torch.equal(k_read[1].view(torch.uint8), to_cache(k[0], FP8).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_write_kernel_stores_the_references_fp8_bytes(dtype):
    T, Hq, Hk, D, bs, nb = 5, 8, 2, 24, 4, 6
    qkv = randn(T, (Hq + 2 * Hk) * D, dtype=dtype, seed=T)
    qkv[:, Hq * D:] *= 150                                                 # k and v: some past +-448
    q, k, v = (t.view(T, -1, D) for t in qkv.split([Hq * D, Hk * D, Hk * D], dim=-1))
    cos, sin = (t.to(dtype) for t in _rotary(T, D))
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(1))[:T].to(DEVICE)
    kc, vc = to_cache(randn(nb, bs, Hk, D, seed=2), FP8), to_cache(randn(nb, bs, Hk, D, seed=3), FP8)
    want_kc, want_vc = kc.clone(), vc.clone()
    want_q = rope_write_kv_reference(q, k, v, cos, sin, want_kc, want_vc, slots)
    got_q = rope_write_kv(q, k, v, cos, sin, kc, vc, slots, backend="triton")
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    close_fp8(kc, want_kc)
    assert torch.equal(vc.view(torch.uint8), want_vc.view(torch.uint8))   # v is only rounded: exact
    assert (vc.float().abs() == FP8_MAX).any()                             # and some did saturate


def test_kernel_rounds_to_fp8_as_torch_on_a_grid():
    """The kernels' FP8 rounding (`rope._saturate`: to FP8's grid in float32, then an exact cast) equals
    torch's cast for every kind of value: ties, just under a power of two (which Triton's interpreter
    gets wrong on its own), subnormals, past 448, zero and -0."""
    T, Hk, D = 64, 2, 32
    edges = torch.tensor([2.0 ** e for e in range(-10, 9)])
    grid = torch.cat([torch.linspace(-500, 500, 1001), edges * 0.97, edges * 0.999, edges * 1.0625,
                      edges * 1.03125, torch.linspace(-0.02, 0.02, 401), torch.tensor([0.0, -0.0, 448.0, 464.0])])
    v = torch.cat([grid, torch.randn(T * Hk * D - grid.numel()) * 30]).view(T, Hk, D).to(DEVICE)
    q, k = randn(T, 2, D, seed=1), randn(T, Hk, D, seed=2)
    cos, sin = _rotary(T, D)
    kc, vc = (torch.zeros(T // 4, 4, Hk, D, dtype=FP8, device=DEVICE) for _ in range(2))
    rope_write_kv(q, k, v, cos, sin, kc, vc, torch.arange(T, device=DEVICE), backend="triton")
    assert torch.equal(vc.view(T, Hk, D).view(torch.uint8), to_cache(v, FP8).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_reads_an_fp8_cache_as_the_reference(splits, dtype):
    bs, Hq, Hk, D = 4, 8, 2, 16
    b = fp8_batch(bs, Hk, D, seed=splits, lengths=lengths_for(bs) + [7 * bs - 1])
    q = randn(len(b.lengths), Hq, D, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_triton(q, *b.args(), out=out, splits=splits)
    torch.testing.assert_close(got, paged_decode_reference(q, *b.args()), **TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_kernel_with_rope_writes_fp8_as_the_torch_path(splits):
    """The decode kernel that rotates and stores the new token itself: into an FP8 cache the same
    bytes as rope_write_kv's reference then attention, and the same attention output."""
    bs, Hq, Hk, D, dtype = 4, 6, 3, 16, torch.float16
    b = fp8_batch(bs, Hk, D, seed=7)
    B = len(b.lengths)
    qkv = randn(B, (Hq + 2 * Hk) * D, dtype=dtype, seed=D)
    q, k, v = (t.view(B, -1, D) for t in qkv.split([Hq * D, Hk * D, Hk * D], dim=-1))
    cos, sin = (t.to(dtype) for t in _rotary(B, D, seed=bs))
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(b.tables, b.lengths)], device=DEVICE)
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    want = paged_decode_rope(q, k, v, cos, sin, slots, kc, vc, b.block_tables, b.context_lens, backend="torch")
    got = paged_decode_triton(q, *b.args(), splits=splits, rope=(k, v, cos, sin, slots))
    close_fp8(b.k_cache, kc)
    assert torch.equal(b.v_cache.view(torch.uint8), vc.view(torch.uint8))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)   # fp16, plus a tipped FP8 rounding at most


# ---------------------------------------------------------------- the engine

def test_fp8_cache_holds_four_times_the_blocks_of_float32(model_tok):
    model, tok = model_tok
    memory = 1 << 20
    e32 = LLMEngine(model, tok, kv_cache_memory=memory, block_size=16)
    e8 = LLMEngine(model, tok, kv_cache_memory=memory, block_size=16, kv_cache_dtype="fp8")
    assert e8.runner.k_cache[0].dtype == FP8 and e32.runner.k_cache[0].dtype == torch.float32
    per_token = kv_bytes_per_token(model.config, FP8)
    assert 4 * per_token == kv_bytes_per_token(model.config, torch.float32)
    assert e8.blocks.num_blocks == memory // (16 * per_token) >= 4 * e32.blocks.num_blocks
    per_block = e8.runner.cache_bytes // (e8.blocks.num_blocks + 1)     # + the scratch block
    assert e8.runner.cache_bytes - per_block <= memory
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(model, tok, num_kv_blocks=8, kv_cache_dtype="int3")


def test_fp8_cache_predicts_as_float32_does(model_tok):
    """Chunked prefill reads the earlier chunks' keys and values back from the cache, so an FP8 cache
    changes the predictions; it must change them little. Measured on the bundled model (these 714
    positions): the top token agrees at 97.8% of them, the real next token's log-probability moves by
    0.036 on average (perplexity 33.53 -> 33.69)."""
    from llmopt import data

    model, tok = model_tok
    stream = data.token_stream("test", tok)
    prompts = [stream[i * 1000:i * 1000 + 120].tolist() for i in range(6)]
    kw = dict(block_size=8, num_kv_blocks=200, max_num_batched_tokens=32)   # chunks of <= 32: the cache is read
    top32, lp32 = teacher_forced(LLMEngine(model, tok, **kw), prompts)
    top8, lp8 = teacher_forced(LLMEngine(model, tok, kv_cache_dtype="fp8", **kw), prompts)
    agree = (top32 == top8).float().mean().item()
    drift = (lp32 - lp8).abs().mean().item()
    assert agree > 0.95 and drift < 0.05, (agree, drift)
    assert drift > 0                     # the cache really is FP8: something moved


def test_fp8_engine_on_the_kernels_equals_the_torch_path(model_tok):
    """The GPU's path (rotary + cache write kernel, split decode kernel with rotary, multi-step pick),
    interpreted, against the PyTorch path, both on an FP8 cache: the same tokens."""
    model, tok = model_tok
    prompts = [[5, 6, 7, 8, 9], list(range(10, 30))]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = []
    for backend, steps in (("torch", 1), ("triton", 3)):
        engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=40, max_num_seqs=4, backend=backend,
                           kv_cache_dtype="fp8", num_scheduler_steps=steps)
        ids = [engine.add_request(p, params) for p in prompts]
        final = engine.run()
        outs.append([final[i].outputs[0].token_ids for i in ids])
    assert outs[0] == outs[1]


def test_fp8_cache_copy_on_write_and_prefix_hits(model_tok):
    """Blocks of an FP8 cache copied on write (three greedy completions forked from one prompt whose
    last block is partly filled) and found again by the prefix cache keep their bytes: every
    completion equals a lone request's on a fresh FP8 engine."""
    model, tok = model_tok
    prompt = list(range(5, 27))                      # 22 tokens: blocks of 4, the last one half full
    lone = LLMEngine(model, tok, num_kv_blocks=64, block_size=4, kv_cache_dtype="fp8")
    one = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    rid = lone.add_request(prompt, one)
    want = lone.run()[rid]
    engine = LLMEngine(model, tok, num_kv_blocks=64, block_size=4, kv_cache_dtype="fp8")
    rid = engine.add_request(prompt, SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True))
    forked = engine.run()[rid]
    assert engine.stats.copied_blocks > 0
    assert [o.token_ids for o in forked.outputs] == [want.outputs[0].token_ids] * 3
    rid = engine.add_request(prompt, one)
    again = engine.run()[rid]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == want.outputs[0].token_ids


def test_llm_passes_kv_cache_dtype(model_tok):
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, kv_cache_dtype="fp8", num_kv_blocks=32)
    assert llm.llm_engine.runner.k_cache[0].dtype == FP8
    out = llm.generate(["def f(x):"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.gpu
def test_gpu_fp8_cache_engine_equals_the_torch_path():
    """On a GPU (sm_89+), CUDA graphs and the kernels against the PyTorch path, both on an FP8 cache
    (float32 model, as the other GPU engine tests: bf16's own rounding would blur the comparison): the
    same greedy tokens. (On a GPU the tests above run there too: `test_kernel_rounds_to_fp8_as_torch_on_a_grid`
    then checks the kernels' rounding on the device against torch's CUDA cast.)"""
    import llmopt

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 60)), [3] * 33]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = []
    for backend, eager in (("torch", True), ("auto", False)):
        engine = LLMEngine(model, tok, num_kv_blocks=64, max_num_seqs=4, backend=backend, enforce_eager=eager,
                           kv_cache_dtype="fp8")
        ids = [engine.add_request(p, params) for p in prompts]
        final = engine.run()
        outs.append([final[i].outputs[0].token_ids for i in ids])
    assert outs[0] == outs[1]
