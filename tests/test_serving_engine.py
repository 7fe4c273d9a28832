"""The engine end to end: greedy outputs equal HF `generate` on each prompt alone (with and without
preemption, prefix caching, chunked prefill), no request lost or duplicated, sampling parameters,
stop conditions, streaming, bad input, and the vLLM-style API."""
import copy
import pickle
import random

import numpy as np
import pytest
import torch

from llmopt.serving import LLM, LLMEngine, SamplingParams, Scheduler
from llmopt.serving.block_manager import BlockManager
from llmopt.serving.sequence import Sequence


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def workload(n, vocab, seed=0, max_prompt=200, max_new=24):
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.choice([1, 2, 5, 16, 17, 40, rng.randint(1, max_prompt)]))],
             rng.randint(1, max_new)) for _ in range(n)]


def run_engine(engine, reqs):
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for p, n in reqs]
    final = engine.run()
    assert sorted(final) == sorted(ids) and len(set(ids)) == len(ids)          # nothing lost or duplicated
    return [final[i] for i in ids]


def test_greedy_equals_hf_generate_on_200_prompts(model_tok):
    model, tok = model_tok
    reqs = workload(200, model.config.vocab_size)
    engine = LLMEngine(model, tok, block_size=16, num_kv_blocks=512, max_num_seqs=32, max_num_batched_tokens=512)
    outs = run_engine(engine, reqs)
    for (prompt, n), out in zip(reqs, outs):
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n), prompt
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks   # every block back at the end


def test_preemption_under_a_small_kv_budget_changes_nothing(model_tok):
    model, tok = model_tok
    reqs = workload(40, model.config.vocab_size, seed=1, max_prompt=60, max_new=40)
    engine = LLMEngine(model, tok, block_size=8, num_kv_blocks=24, max_num_seqs=16, max_num_batched_tokens=128)
    outs = run_engine(engine, reqs)
    assert engine.stats.preemptions > 0
    for (prompt, n), out in zip(reqs, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks


def test_prefix_caching_shares_a_system_prompt(model_tok):
    model, tok = model_tok
    rng = random.Random(2)
    system = [rng.randrange(1, 4096) for _ in range(100)]
    reqs = [(system + [rng.randrange(1, 4096) for _ in range(rng.randint(1, 20))], 8) for _ in range(12)]
    on = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=4)
    off = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=4, enable_prefix_caching=False)
    a, b = run_engine(on, reqs), run_engine(off, reqs)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert on.stats.cached_tokens >= 96 * 8 and off.stats.cached_tokens == 0   # 6 full blocks, >= 8 requests
    assert on.stats.computed_tokens < off.stats.computed_tokens
    # each finished output still says how much of its prompt came from the cache (vLLM's num_cached_tokens)
    assert sum(o.num_cached_tokens for o in a) == on.stats.cached_tokens and a[-1].num_cached_tokens == 96
    assert all(o.metrics["num_cached_tokens"] == o.num_cached_tokens for o in a)
    assert all(o.num_cached_tokens == 0 for o in b)


def test_chunked_prefill_off_and_tiny_token_budget_agree(model_tok):
    model, tok = model_tok
    reqs = workload(12, model.config.vocab_size, seed=3, max_prompt=90)
    want = [hf_greedy(model, p, n) for p, n in reqs]
    for kw in (dict(max_num_batched_tokens=7), dict(max_num_batched_tokens=256, chunked_prefill=False)):
        outs = run_engine(LLMEngine(model, tok, num_kv_blocks=128, **kw), reqs)
        assert [o.outputs[0].token_ids for o in outs] == want


def test_quantized_and_fused_models_plug_in(model_tok):
    from llmopt import kernels
    from llmopt.quant import QuantConfig, quantize

    model, tok = model_tok
    w4 = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=64))
    q = kernels.fuse(copy.deepcopy(w4))
    reqs = workload(6, model.config.vocab_size, seed=4, max_prompt=30, max_new=10)
    outs = run_engine(LLMEngine(q, tok, num_kv_blocks=64), reqs)
    for (prompt, n), out in zip(reqs, outs):
        assert out.outputs[0].token_ids == hf_greedy(q, prompt, n)
    # q/k/v and gate/up merged into one projection each: the runner takes the merged path
    merged = kernels.fuse(copy.deepcopy(w4), merge=True)
    assert hasattr(merged.model.layers[0].self_attn, "qkv_proj")
    again = run_engine(LLMEngine(merged, tok, num_kv_blocks=64), reqs)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]


def test_vllm_style_code_runs_unchanged(model_tok):
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, max_num_seqs=8)
    prompts = ["def add(a, b):", "import os\n", "class Stack:"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert [o.prompt for o in outputs] == prompts
    for o in outputs:
        assert o.finished and isinstance(o.outputs[0].text, str) and 1 <= len(o.outputs[0].token_ids) <= 12
        assert o.outputs[0].token_ids == hf_greedy(model, o.prompt_token_ids, len(o.outputs[0].token_ids))
    one = llm.generate("def add(a, b):", SamplingParams(max_tokens=12, temperature=0))
    assert one[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    named = LLM(model=model, tokenizer="tinypy", max_num_seqs=8)   # vLLM's tokenizer=: a name or a path
    assert named.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].token_ids \
        == outputs[0].outputs[0].token_ids


def test_vllm_prompt_types_and_sampling_fields(model_tok):
    """vLLM's `TokensPrompt` / `TextPrompt`, and the `SamplingParams` fields `detokenize`,
    `truncate_prompt_tokens` and `clone()`: each does what vLLM documents."""
    from llmopt.serving import TextPrompt, TokensPrompt

    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ids = tok("def add(a, b):").input_ids
    by_ids, by_text = llm.generate([TokensPrompt(prompt_token_ids=ids), TextPrompt(prompt="def add(a, b):")], greedy)
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids == hf_greedy(model, ids, 5)
    silent = llm.generate([ids], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, detokenize=False))[0]
    assert silent.outputs[0].text == "" and silent.outputs[0].token_ids == by_ids.outputs[0].token_ids
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["\n"], detokenize=False)
    cut = llm.generate([ids], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, truncate_prompt_tokens=3))[0]
    assert cut.prompt_token_ids == ids[-3:] and cut.outputs[0].token_ids == hf_greedy(model, ids[-3:], 5)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    copy_ = greedy.clone()
    copy_.stop_token_ids.append(5)
    assert copy_ != greedy and greedy.stop_token_ids == []
    for bad in ([True, 5], [1.5, 2], {"prompt_token_ids": [1.5]}):   # token ids are ints, not bools or floats
        with pytest.raises(ValueError, match="prompt_token_ids"):
            llm.generate([bad], greedy)
    assert llm.generate([[np.int64(5), np.int64(6)]], greedy)[0].prompt_token_ids == [5, 6]


def test_vllm_step_api_argument_order_and_names(model_tok):
    """vLLM's `llm.llm_engine.add_request(request_id, prompt, params)`, `step()`, `abort_request([...])`
    run on ours; our own order (prompt, params, request_id=) gives the same."""
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64)
    engine = llm.llm_engine
    assert engine is llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert engine.add_request("a", "def add(a, b):", greedy) == "a"
    assert engine.add_request("b", [5, 6, 7], greedy) == "b"
    assert engine.add_request(request_id="c", prompt={"prompt_token_ids": [8, 9]}, params=greedy) == "c"
    assert engine.add_request("def add(a, b):", greedy, request_id="d") == "d"
    assert engine.add_request("x = 1", greedy) not in "abcd"           # ours: the prompt first
    engine.abort_request(["b", "c"])
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["a"].outputs[0].token_ids == final["d"].outputs[0].token_ids
    assert final["a"].prompt == "def add(a, b):" and len(final["a"].outputs[0].token_ids) == 6
    assert final["b"].outputs[0].finish_reason == final["c"].outputs[0].finish_reason == "abort"


def test_sampling_seed_top_k_top_p_and_logprobs(model_tok):
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok)
    p = "def main():\n    "
    a = llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True))[0]
    b = llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True))[0]
    c = llm.generate([p], SamplingParams(temperature=1.0, seed=8, max_tokens=20, ignore_eos=True))[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids != c.outputs[0].token_ids
    # top_k 0 is "no top-k" too (vLLM's default now), the same draws as -1
    off = llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True, top_k=0))[0]
    assert off.outputs[0].token_ids == a.outputs[0].token_ids
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    for sp in (SamplingParams(top_k=1, max_tokens=10, ignore_eos=True, seed=1),
               SamplingParams(top_p=1e-6, max_tokens=10, ignore_eos=True, seed=1)):
        assert llm.generate([p], sp)[0].outputs[0].token_ids == greedy.token_ids
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5 and all(t in lp and len(lp) >= 3 for t, lp in zip(out.token_ids, out.logprobs))
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)))
    # vLLM's Logprob objects (`.logprob`, `.rank`, `.decoded_token`) that still act as floats; and pickle
    chosen = out.logprobs[0][out.token_ids[0]]
    assert chosen.rank == 1 and chosen.logprob == float(chosen)
    assert chosen.decoded_token == tok.decode(out.token_ids[:1])
    assert sorted(v.rank for v in out.logprobs[0].values()) == [1, 2, 3]
    again = pickle.loads(pickle.dumps(chosen))
    assert again == chosen and (again.rank, again.decoded_token) == (chosen.rank, chosen.decoded_token)


def test_penalties_by_hand():
    """presence / frequency count the completion's tokens only; the repetition penalty every token seen,
    dividing a positive logit and multiplying a negative one (vLLM's and HF's definitions)."""
    from llmopt.serving.sampling import apply_penalties, sample

    logits = torch.tensor([4.0, -4.0, 1.0, 2.0, -1.0, 0.5])
    history = ([0, 1, 2, 2, 3], 2)                  # prompt [0, 1], completion [2, 2, 3]
    got = apply_penalties(logits, SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), *history)
    assert got.tolist() == [4.0, -4.0, 1.0 - 1.0 - 2 * 0.5, 2.0 - 1.0 - 0.5, -1.0, 0.5]
    got = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), *history)
    assert got.tolist() == [2.0, -8.0, 0.5, 1.0, -1.0, 0.5]
    assert logits.tolist()[0] == 4.0                # the input is left as it was
    # greedy: the penalized argmax; the log-probability reported is the model's own (before penalties)
    p = SamplingParams(temperature=0, repetition_penalty=10.0, logprobs=0)   # 4 / 10 < 0.5, the one unseen token
    tokens, chosen, _ = sample(logits[None], [p], [None], [history])
    assert tokens.tolist() == [5] and chosen.item() == pytest.approx(torch.log_softmax(logits, -1)[5].item())
    with pytest.raises(ValueError, match="histories"):
        sample(logits[None], [p], [None])
    # a chosen token outside the top k keeps its true rank: 2.0 and 4.0 are above 1.0
    tokens, _, (top,) = sample(logits[None], [SamplingParams(temperature=0, allowed_token_ids=[2], logprobs=1)],
                               [None], [history])
    assert tokens.tolist() == [2] and {t: v.rank for t, v in top.items()} == {0: 1, 2: 3}


def test_repetition_penalty_equals_hf_generate_and_skips_multi_step(model_tok):
    model, tok = model_tok
    prompts = [tok(t).input_ids for t in ("def main():\n    ", "import os\n", "class A:\n")]
    for steps in (1, 4):
        llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64, num_scheduler_steps=steps)
        outs = llm.generate([{"prompt_token_ids": q} for q in prompts],
                            SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True))
        for q, out in zip(prompts, outs):
            with torch.no_grad():
                want = model.generate(torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long),
                                      max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                                      repetition_penalty=1.3)[0, len(q):].tolist()
            assert out.outputs[0].token_ids == want
    assert want != hf_greedy(model, prompts[-1], 16)   # the penalty changed the answer
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_logit_bias_allowed_tokens_and_bad_words_equal_hf_generate(model_tok):
    """vLLM's `logit_bias`, `allowed_token_ids` and `bad_words` against HF `generate`'s `sequence_bias`,
    `prefix_allowed_tokens_fn` and `bad_words_ids`; such rows leave multi-step decoding."""
    model, tok = model_tok
    q = tok("def main():\n    ").input_ids
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64, num_scheduler_steps=4)

    def ours(**kw):
        out = llm.generate({"prompt_token_ids": q}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw))
        return out[0].outputs[0].token_ids

    def hf(**kw):
        with torch.no_grad():
            return model.generate(torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long),
                                  max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                                  **kw)[0, len(q):].tolist()

    greedy = ours()
    assert greedy == hf_greedy(model, q, 16)
    biased = ours(logit_bias={greedy[0]: -100.0, "17": 3.0})             # OpenAI sends the ids as strings
    assert biased == hf(sequence_bias={(greedy[0],): -100.0, (17,): 3.0}) != greedy and greedy[0] not in biased
    allowed = sorted(set(greedy[1::2])) + [5, 6]
    limited = ours(allowed_token_ids=allowed)
    assert limited == hf(prefix_allowed_tokens_fn=lambda b, ids: allowed) and set(limited) <= set(allowed)
    assert "CAPITAL LETTER" in tok.decode(greedy)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=["CAPITAL LETTER"])
    clean = llm.generate({"prompt_token_ids": q}, p)[0].outputs[0].token_ids
    assert clean == hf(bad_words_ids=p.bad_words_token_ids) != greedy
    assert "CAPITAL LETTER" not in tok.decode(clean)
    for bad, field in ((dict(logit_bias={"x": 1}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate("x", SamplingParams(allowed_token_ids=[10 ** 6]))


@pytest.mark.parametrize("engine_kw", [dict(), dict(max_num_batched_tokens=7), dict(num_kv_blocks=9, block_size=4)],
                         ids=["whole", "chunked", "preempted"])
def test_prompt_logprobs_score_every_prompt_token(model_tok, engine_kw):
    """SamplingParams(prompt_logprobs=k): the log-probability of each prompt token given the ones before
    (HF's logits over the whole prompt), with the top k, the same whether the prompt ran whole, in chunks
    of a 7-token step budget or again after a preemption, and with its blocks in the prefix cache."""
    model, tok = model_tok
    prompt = tok("def fibonacci(n):\n    if n < 2:\n        return n\n").input_ids
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    kw = {"num_kv_blocks": 64, **engine_kw}
    engine = LLMEngine(model, tok, **kw)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3)
    first = engine.add_request(prompt, p)
    others = [engine.add_request([9, 8, 7, 6, 5, 4, 3], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
              for _ in range(2 if "block_size" in engine_kw else 0)]   # they crowd the 9 blocks
    final = engine.run()
    got = final[first].prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for t in range(1, len(prompt)):
        assert got[t][prompt[t]] == pytest.approx(want[t - 1, prompt[t]].item(), abs=1e-4)
        top = want[t - 1].topk(3)
        assert set(top.indices.tolist()) <= set(got[t]) and len(got[t]) <= 4
        # vLLM's Logprob: the token's rank in the distribution and its text
        assert got[t][prompt[t]].rank == int((want[t - 1] > want[t - 1, prompt[t]]).sum()) + 1
        assert got[t][prompt[t]].decoded_token == tok.decode([prompt[t]])
    assert final[first].outputs[0].token_ids == hf_greedy(model, prompt, 8)
    if others:
        assert engine.stats.preemptions > 0 and all(final[o].outputs[0].token_ids for o in others)
    again = engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, n=2, temperature=1.0))
    out = engine.run()[again]
    assert [set(e) for e in out.prompt_logprobs[1:]] == [{t} for t in prompt[1:]]   # k = 0: the token alone
    assert [e[t] for e, t in zip(out.prompt_logprobs[1:], prompt[1:])] == pytest.approx(
        [got[i][prompt[i]] for i in range(1, len(prompt))], abs=1e-5)
    assert final[first].outputs[0].token_ids and LLM(model=model, tokenizer=tok).generate(
        [prompt], SamplingParams(max_tokens=2))[0].prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_decode_profile_and_time_split_account_for_a_step(model_tok):
    from llmopt.serving.bench import decode_profile, decode_time_split, format_decode_profile

    model, tok = model_tok
    r = decode_profile(model, tok, batch=2, context=10, steps=2, top=5)
    assert r["engine_ms"] > 0 and r["replay_ms"] > 0 and not r["graphs"]      # a CPU: the eager forward
    assert 0 < r["kernels_ms"] and r["kernels"] > 10 and len(r["top"]) == 5
    assert [k["ms"] for k in r["top"]] == sorted((k["ms"] for k in r["top"]), reverse=True)
    assert "aten::mm" in {k["name"] for k in r["top"]} and "engine step" in format_decode_profile("x", r)
    for steps in (1, 4):
        t = decode_time_split(model, tok, batch=2, num_scheduler_steps=steps, new_tokens=9, prompt_len=5)
        assert t["ms_per_step"] == pytest.approx(t["forward_ms"] + t["rest_ms"])
        assert t["forward_ms"] > 0.1 * t["ms_per_step"]     # the forward was timed: most of a CPU step


def test_rotary_table_rows_equal_the_models_rotary_embedding(model_tok):
    """The runner's cos/sin table gives, bit for bit, what the model's rotary module computes per step;
    a rotary type whose frequencies depend on the context length keeps the module."""
    from llmopt.serving.runner import ModelRunner

    model, _ = model_tok
    runner = ModelRunner(model, num_blocks=4, block_size=4, max_model_len=300)
    assert runner._rope_table is not None and runner._rope_table[0].shape == (300, runner.head_dim)
    x = torch.zeros(1, 1, dtype=torch.float32)
    pos = torch.tensor([[0, 7, 123, 299, 5]])
    for got, want in zip(runner._rotary(x, pos), model.model.rotary_emb(x, pos)):
        assert torch.equal(got, want)
    rot = model.model.rotary_emb
    old = rot.rope_type
    try:
        rot.rope_type = "dynamic"
        assert ModelRunner(model, num_blocks=4, block_size=4, max_model_len=300)._rope_table is None
    finally:
        rot.rope_type = old


def test_greedy_batches_take_the_one_transfer_path_with_the_same_answer():
    from llmopt.serving.sampling import sample

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 4
    greedy = [SamplingParams(temperature=0)] * 5
    tokens, chosen, tops = sample(logits, greedy, [None] * 5)
    want = torch.log_softmax(logits, -1)
    assert tokens.dtype == torch.long and torch.equal(tokens, logits.argmax(-1)) and tops == [None] * 5
    torch.testing.assert_close(chosen, want.gather(1, tokens[:, None])[:, 0])
    # one row asking for top logprobs takes the general path: same tokens and logprobs
    t2, c2, tops2 = sample(logits, greedy[:4] + [SamplingParams(temperature=0, logprobs=2)], [None] * 5)
    assert torch.equal(t2, tokens) and tops2[:4] == [None] * 4 and len(tops2[4]) == 2
    torch.testing.assert_close(c2, chosen)


def test_stop_conditions(model_tok):
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok)
    p = "def f(x):\n    return"
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    tok_stop = free.token_ids[3]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok_stop],
                                         ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == tok_stop and o.token_ids[-1] == tok_stop
    assert len(o.token_ids) == free.token_ids.index(tok_stop) + 1
    assert o.text == tok.decode(o.token_ids[:-1])   # as vLLM: the stop token in token_ids, not in the text
    for stop in (None, ["never printed"]):   # with stop strings the text is made token by token: the same
        kept = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok_stop], stop=stop,
                                                ignore_eos=True, include_stop_str_in_output=True))[0].outputs[0]
        assert kept.token_ids == o.token_ids and kept.text == tok.decode(o.token_ids)
        assert llm.generate([p], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok_stop], stop=stop,
                                                ignore_eos=True))[0].outputs[0].text == o.text
    stop = free.text[5:8]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop and stop not in o.text
    assert free.text.startswith(o.text)
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 4


def test_min_tokens_hold_back_eos_and_stop_tokens(model_tok):
    """vLLM's `min_tokens`: EOS and `stop_token_ids` cannot be picked before the completion has that many
    tokens (HF's `min_new_tokens` holds back EOS the same way); after it, they end the completion."""
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64)
    prompt = "if __name__ == '__main__':\n    main()\n"
    ids = tok(prompt).input_ids
    (eos,) = llm.engine.eos
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9))[0].outputs[0]
    assert first.token_ids == [eos] and first.finish_reason == "stop" and first.text == ""   # ends at once
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=9, min_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    want = hf[0, len(ids):].tolist()
    want = want[:want.index(eos) + 1] if eos in want else want
    for steps in (1, 4):   # held back on the multi-step path too
        llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64, num_scheduler_steps=steps)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9, min_tokens=6))[0].outputs[0]
        assert out.token_ids == want and eos not in out.token_ids[:6]
        # a stop token held back likewise: the model's 2nd token, banned as a stop until 3 tokens are out
        stop = want[1]
        held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9, min_tokens=3, stop_token_ids=[stop])
                            )[0].outputs[0]
        assert held.token_ids[:1] == want[:1] and not {stop, eos} & set(held.token_ids[:3])
        assert held.finish_reason == "length" or held.token_ids[-1] in (stop, eos)
    sampled = llm.generate([prompt] * 4, SamplingParams(temperature=1.0, seed=3, max_tokens=8, min_tokens=5))
    assert all(eos not in o.outputs[0].token_ids[:5] for o in sampled)


def test_streaming_steps_add_up(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_kv_blocks=64)
    rid = engine.add_request("import sys\n", SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.append(list(out.outputs[0].token_ids))
    assert [len(s) for s in seen] == list(range(1, 10)) and all(seen[-1][:len(s)] == s for s in seen)


def test_bad_input_is_a_clear_error(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_kv_blocks=64)
    for kwargs, field in ((dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                          (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
                          (dict(n=0), "n"), (dict(n=2.5), "n")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    # values that pass a range check but would fail inside a batch of other requests (a random walk
    # of concurrent clients against `llmopt serve` found a float top_k stopping the whole engine)
    nan = float("nan")
    for kwargs, field in ((dict(top_k=2.5), "top_k"), (dict(seed=1.5), "seed"), (dict(seed=2**70), "seed"),
                          (dict(logprobs=1.5), "logprobs"), (dict(prompt_logprobs=0.5), "prompt_logprobs"),
                          (dict(max_tokens=True), "max_tokens"), (dict(min_tokens=1.5), "min_tokens"),
                          (dict(temperature=nan), "temperature"), (dict(temperature="0.5"), "temperature"),
                          (dict(repetition_penalty=float("inf")), "repetition_penalty"),
                          (dict(logit_bias={5: nan}), "logit_bias"), (dict(stop=[1]), "stop"),
                          (dict(stop=[""]), "stop"), (dict(stop_token_ids="ab"), "stop_token_ids"),
                          (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(bad_words=[4]), "bad_words"),
                          (dict(allowed_token_ids=[True]), "allowed_token_ids")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    p = SamplingParams(n=2.0, max_tokens=8.0, top_k=np.int64(5), seed=np.int64(3), stop_token_ids=(4,))
    assert (p.n, p.max_tokens, p.top_k, p.seed, p.stop_token_ids) == (2, 8, 5, 3, [4])
    assert all(type(v) is int for v in (p.n, p.max_tokens, p.top_k, p.seed))
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request([5, 6], SamplingParams(logprobs=model.config.vocab_size + 1))
    assert not engine.has_unfinished_requests()   # a refused request leaves nothing behind
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLMEngine(model, tok, num_kv_blocks=64, max_num_seqs=4).add_request([5, 6], SamplingParams(n=5))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([5] * model.config.max_position_embeddings, SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(3.5, SamplingParams())
    llm = LLM(model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()          # the good prompt was not left queued
    with pytest.raises(ValueError, match="unsupported"):
        LLM(model=model, tokenizer=tok, bogus=1)
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model=model, tokenizer=42)


def test_a_request_with_nothing_to_pick_ends_alone(model_tok):
    """Parameters valid one by one can leave a row nothing to pick (every allowed token a banned word),
    or overflow a logit (a repetition penalty of 1e-300, a temperature of 1e-300): that request ends
    with an error or picks as the limit would, and the request beside it is untouched."""
    model, tok = model_tok
    (word,) = tok("return", add_special_tokens=False).input_ids
    cases = [(dict(temperature=0.8, seed=1, allowed_token_ids=[word], bad_words=["return"]), "error"),
             (dict(temperature=0, allowed_token_ids=[word], bad_words=["return"]), "error"),
             (dict(temperature=0.8, seed=1, repetition_penalty=1e-300), "length"),
             (dict(temperature=0, repetition_penalty=1e-300), "length"),
             (dict(temperature=1e-300), "length")]   # under 1e-5: greedy, as in vLLM
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = hf_greedy(model, [7, 8, 9], 6)
    for kw, reason in cases:
        engine = LLMEngine(model, tok, num_kv_blocks=64)
        engine.add_request([7, 8, 9], SamplingParams(max_tokens=6, ignore_eos=True, **kw), request_id="odd")
        engine.add_request([7, 8, 9], good, request_id="good")
        done = engine.run()
        assert done["good"].outputs[0].token_ids == want, kw
        odd = done["odd"].outputs[0]
        assert odd.finish_reason == reason and len(odd.token_ids) == (0 if reason == "error" else 6), kw
        if reason == "error":
            assert "no token left to sample" in done["odd"].error
    assert SamplingParams(temperature=1e-300).greedy and not SamplingParams(temperature=1e-4).greedy
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks


def test_step_records_stay_bounded_and_totals_count_every_step(model_tok, monkeypatch):
    """A server's engine steps for days: the per-step KV records keep the last STEP_HISTORY steps (for
    plots), while the KV waste and the peak come from totals over every step."""
    from llmopt.serving import engine as engine_mod

    model, tok = model_tok
    reqs = workload(6, model.config.vocab_size, seed=3, max_prompt=20, max_new=12)
    full = LLMEngine(model, tok, block_size=4, num_kv_blocks=64, max_num_seqs=3)
    run_engine(full, reqs)
    monkeypatch.setattr(engine_mod, "STEP_HISTORY", 5)
    short = LLMEngine(model, tok, block_size=4, num_kv_blocks=64, max_num_seqs=3)
    run_engine(short, reqs)
    a, b = full.stats, short.stats
    assert a.steps > 5 and len(b.kv_used_slots) == len(b.kv_reserved_slots) == 5
    assert list(b.kv_used_slots) == list(a.kv_used_slots)[-5:]
    assert (b.kv_used_total, b.kv_reserved_total) == (sum(a.kv_used_slots), sum(a.kv_reserved_slots))
    assert b.kv_reserved_peak == max(a.kv_reserved_slots) and short.kv_waste() == full.kv_waste() > 0


def test_more_requests_than_the_cache_holds_are_all_served(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=12, max_num_seqs=64)   # 48 slots
    reqs = [([7, 8, 9, 10, 11, 12], 10)] * 20                                          # 16 slots each
    outs = run_engine(engine, reqs)
    want = hf_greedy(model, reqs[0][0], 10)
    assert all(o.outputs[0].token_ids == want for o in outs)


def test_scheduler_never_exceeds_its_budgets():
    from llmopt.serving.sampling import SamplingParams as SP

    rng = random.Random(5)
    for trial in range(20):
        bm = BlockManager(rng.randint(8, 40), rng.choice([2, 4, 8]))
        sched = Scheduler(bm, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(1, 64))
        for _ in range(rng.randint(1, 15)):
            n = rng.randint(1, bm.num_blocks * bm.block_size // 2)
            # some ask for several completions: forked after their prompt, one seat each, copy-on-write
            k = rng.choice([1, 1, rng.randint(1, sched.max_num_seqs)])
            sched.add(Sequence([rng.randrange(100) for _ in range(n)], SP(max_tokens=5, n=k)))
        for _ in range(500):
            if not sched.has_unfinished():
                break
            batch = sched.schedule()
            assert sum(n for _, n in batch) <= sched.max_num_batched_tokens
            assert len(batch) <= sched.max_num_seqs and sched.seats() <= sched.max_num_seqs
            assert len({s.seq_id for s, _ in batch}) == len(batch)
            for seq, n in batch:
                assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + n
                seq.num_computed_tokens += n
                if seq.num_computed_tokens == len(seq):
                    family = [seq]
                    while seq.forks_pending:
                        family.append(Sequence(seq.token_ids, seq.params))
                        sched.fork(seq, family[-1])
                    for s in family:
                        s.token_ids.append(1)
                        if s.num_completion_tokens >= 5:
                            sched.finish(s)
            bm.check()
        assert not sched.has_unfinished(), f"trial {trial} did not drain"
        assert bm.num_free_blocks() == bm.num_blocks


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "upcycled", "upcycled_w4",
                                  "upcycled_w8a8", "upcycled_w4_fused"])
def test_other_llama_family_models(arch, model_tok):
    """Mistral (same blocks), Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), and Mixture-of-Experts
    models, whose MLP the runner calls as it is: Mixtral, Qwen3-MoE and lesson 07's upcycled model, also
    with its experts quantized (W4, `QuantExperts`; SmoothQuant's W8A8, which calls each expert's
    modules on its tokens; W4 after `kernels.fuse`, whose grouped kernels let a GPU record CUDA graphs)."""
    import transformers

    from llmopt import moe

    _, tok = model_tok
    common = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    experts = dict(num_experts_per_tok=2, router_jitter_noise=0.0)
    config = {"mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
              "qwen2": lambda: transformers.Qwen2Config(**common),
              "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16),
              "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=4, **experts),
              "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, head_dim=16, num_experts=4,
                                                                moe_intermediate_size=48, **experts),
              "upcycled": lambda: transformers.LlamaConfig(**common),
              "upcycled_w4": lambda: transformers.LlamaConfig(**common),
              "upcycled_w8a8": lambda: transformers.LlamaConfig(**common),
              "upcycled_w4_fused": lambda: transformers.LlamaConfig(**common)}[arch]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if arch.startswith("upcycled"):
        model = moe.upcycle(model, num_experts=4, top_k=2).eval()
        with torch.no_grad():   # upcycled experts start as copies: make them differ, so routing matters
            for name, p in model.named_parameters():
                if "experts" in name or "gate" in name:
                    p.add_(torch.randn_like(p) * p.std())
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():   # random biases and norm weights, so a path that skipped them would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    if arch in ("upcycled_w4", "upcycled_w4_fused"):
        from llmopt.quant import QuantConfig, QuantExperts, quantize

        quantize(model, QuantConfig(bits=4, group_size=32))
        assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    if arch == "upcycled_w4_fused":
        from llmopt.kernels import KernelQuantExperts, fuse

        fuse(model)
        assert isinstance(model.model.layers[0].mlp.experts, KernelQuantExperts)
    if arch == "upcycled_w8a8":
        from llmopt.quant import QuantConfig, quantize

        quantize(model, QuantConfig(bits=8, method="smoothquant"), torch.randint(0, 4096, (4, 32)))
        assert model.model.layers[0].mlp.experts.calls_modules
    reqs = workload(6, 4096, seed=6, max_prompt=40, max_new=8)
    outs = run_engine(LLMEngine(model, tok, num_kv_blocks=64, block_size=4), reqs)
    for (prompt, n), out in zip(reqs, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    # experts whose dispatch reads the routing back on the host cannot be replayed from a CUDA graph: on a
    # GPU those MoE models decode eagerly; the grouped kernels of a fused W4 model read nothing back
    from llmopt.serving.runner import graph_blocker

    moe_arch = arch in ("mixtral", "qwen3_moe", "upcycled", "upcycled_w4", "upcycled_w8a8")
    assert (graph_blocker(model) is not None) == moe_arch
    if moe_arch:
        assert "layer 0's MLP" in graph_blocker(model) and "routed" in graph_blocker(model)


def test_a_failing_request_ends_alone(model_tok, monkeypatch):
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_kv_blocks=64)
    ids = [engine.add_request([5, 6, 7, 8 + i], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                stop=["zz"] if i == 1 else None)) for i in range(3)]
    real = engine._decode

    def decode(token_ids, params):
        if params.stop:            # the one request that looks for stop strings breaks while doing so
            raise RuntimeError("detokenizer broke")
        return real(token_ids, params)

    monkeypatch.setattr(engine, "_decode", decode)
    final = engine.run()
    assert final[ids[1]].finished and final[ids[1]].outputs[0].finish_reason == "error"
    assert "detokenizer broke" in final[ids[1]].error
    for i in (0, 2):
        assert final[ids[i]].outputs[0].finish_reason == "length" and len(final[ids[i]].outputs[0].token_ids) == 6
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks


def test_llm_by_name_and_load_llm_falls_back_without_vllm_or_gpu():
    from llmopt.serving import load_llm

    llm = load_llm("tiny-random", prefer_vllm=True, max_num_seqs=4, dtype=torch.float32)   # no GPU here: ours
    assert isinstance(llm, LLM) and llm.engine.scheduler.max_num_seqs == 4
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out) == 1 and out[0].prompt_token_ids == [5, 6, 7] and len(out[0].outputs[0].token_ids) == 3


def _solo(model, tok, prompt, params, **kw):
    engine = LLMEngine(model, tok, num_kv_blocks=64, block_size=4, **kw)
    rid = engine.add_request(prompt, params)
    return engine.run()[rid].outputs[0].token_ids


@pytest.mark.parametrize("num_kv_blocks", [64, 10])     # 10 blocks of 4: the forks preempt each other
def test_n_completions_share_the_prompt_and_equal_n_seeded_requests(model_tok, num_kv_blocks):
    """Parallel sampling: the prompt runs once, then n sequences hold its blocks; completion i equals a
    request of its own with seed + i (vLLM's seeding), so copy-on-write kept each one's K/V its own."""
    model, tok = model_tok
    prompt = list(range(3, 13))       # 10 tokens: with blocks of 4 the last one is partial, shared by the forks
    params = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    engine = LLMEngine(model, tok, num_kv_blocks=num_kv_blocks, block_size=4)
    rid = engine.add_request(prompt, SamplingParams(n=4, seed=100, **params))
    (first,) = engine.step()           # the prefill, the fork, a first token each
    assert [o.index for o in first.outputs] == [0, 1, 2, 3] and not first.finished
    assert all(len(o.token_ids) == 1 for o in first.outputs)
    table = engine.requests[rid][0].block_table
    assert len(table) == 3 and all(s.block_table == table for s in engine.requests[rid])
    assert all(engine.blocks.blocks[b].ref_count == 4 for b in table)
    out = engine.run()[rid]
    assert out.finished and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert [o.token_ids for o in out.outputs] == [_solo(model, tok, prompt, SamplingParams(seed=100 + i, **params))
                                                  for i in range(4)]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4
    if num_kv_blocks == 64:
        assert engine.stats.computed_tokens == len(prompt) + 4 * 11 and engine.stats.preemptions == 0
    else:
        assert engine.stats.preemptions > 0
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks and not engine.requests
    engine.blocks.check()


def test_n_completions_take_n_seats_stream_once_a_step_and_abort_together(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_kv_blocks=64, block_size=4, max_num_seqs=4)
    greedy = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True)
    a = engine.add_request([5, 6, 7], greedy)
    b = engine.add_request([8, 9], SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=30, ignore_eos=True))
    running, final = [], {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert len({o.request_id for o in outs}) == len(outs)        # one output per request and step
        assert engine.scheduler.seats() <= 4
        running.append({s.request_id for s in engine.scheduler.running})
        final.update({o.request_id: o for o in outs if o.finished})
        if b in running[-1] and len(running) > 8:
            engine.abort_request(b)
    assert {a} in running and running.index({a}) < running.index({b})   # b (2 seats) waited for a (3 of 4)
    want = hf_greedy(model, [5, 6, 7], 6)
    assert [o.token_ids for o in final[a].outputs] == [want] * 3
    assert [o.finish_reason for o in final[b].outputs] == ["abort", "abort"] and final[b].finished
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks


def test_n_greedy_completions_with_multi_step_decoding_and_through_llm(model_tok):
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64, block_size=4, num_scheduler_steps=4)
    # a one-token prompt's prefill is one token, as a decode is: its completions still fork at its first token
    for prompt in [5, 6, 7, 8, 9], [2306]:
        (out,) = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=9, ignore_eos=True))
        assert [o.token_ids for o in out.outputs] == [hf_greedy(model, prompt, 9)] * 3


def test_llm_chat_renders_each_conversation_and_generates_it(model_tok):
    """vLLM's `LLM.chat`: one conversation or a list of them; the plain template for the bundled model
    (it has none), the tokenizer's own or a `chat_template` argument otherwise; bad input refused."""
    from llmopt.serving.llm import chat_prompt

    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    talk = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "add two numbers"}]
    (out,) = llm.chat(talk, greedy)
    assert out.prompt == "# system:\nYou write Python.\n# user:\nadd two numbers\n# assistant:\n"
    assert out.outputs[0].token_ids == llm.generate(out.prompt, greedy)[0].outputs[0].token_ids
    other = [{"role": "user", "content": "sort a list"}]
    both = llm.chat([talk, other], greedy)
    assert [o.prompt for o in both] == [out.prompt, chat_prompt(tok, other)]
    assert both[0].outputs[0].token_ids == out.outputs[0].token_ids
    # the last (assistant) message left open for the model to continue
    start = other + [{"role": "assistant", "content": "def sort_list(xs):"}]
    assert chat_prompt(tok, start, add_generation_prompt=False, continue_final_message=True) \
        == "# user:\nsort a list\n# assistant:\ndef sort_list(xs):"
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert llm.chat(other, greedy, chat_template=template)[0].prompt == "<user>sort a list<assistant>"
    templated = copy.deepcopy(tok)
    templated.chat_template = template
    assert chat_prompt(templated, other, add_generation_prompt=False) == "<user>sort a list"
    # a template that writes the BOS itself (Llama-3's): encoded without the tokenizer adding another
    # (this tokenizer adds one to any text), as vLLM; the plain template has none and gets the usual one
    templated.chat_template = "{{ bos_token }}" + template
    bos = tok("x").input_ids[0]
    assert tok("x", add_special_tokens=False).input_ids[0] != bos
    with_bos = LLM(model=model, tokenizer=templated, num_kv_blocks=64).chat(other, greedy)[0]
    assert with_bos.prompt_token_ids == tok(with_bos.prompt, add_special_tokens=False).input_ids
    assert with_bos.prompt_token_ids[0] == bos != with_bos.prompt_token_ids[1]
    assert out.prompt_token_ids == tok(out.prompt).input_ids
    for bad in ([], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": 3}], "hi"):
        with pytest.raises(ValueError, match="messages"):
            llm.chat(bad, greedy)
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(start, greedy, continue_final_message=True)     # add_generation_prompt is on by default


def _decode_ready_engine(model, tok, reqs, **kw):
    """An engine stepped until every request is past its prefill (the next step is a pure decode)."""
    engine = LLMEngine(model, tok, block_size=8, num_kv_blocks=64, max_num_seqs=8, enforce_eager=True, **kw)
    for p, n in reqs:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    return engine


def test_padded_decode_batch_equals_the_unpadded_one(model_tok):
    """What a CUDA graph replays: a decode batch padded to a captured size gives the same logits for
    the real rows, and the padding rows write only into the scratch block."""
    model, tok = model_tok
    reqs = [(list(range(1, 1 + n)), 20) for n in (3, 9, 17)]
    engine = _decode_ready_engine(model, tok, reqs)
    runner, seqs = engine.runner, list(engine.scheduler.running)
    assert len(seqs) == 3
    before = [k.clone() for k in runner.k_cache]
    want = runner.decode(seqs)                              # eager, exact batch
    flat, tables = runner.decode_inputs(seqs, size=8, width=6)
    assert tables.shape == (8, 6) and (tables[3:] == runner.num_blocks).all()
    after_exact = [k.clone() for k in runner.k_cache]
    got = runner._forward_decode(*flat.view(4, 8), tables)
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
    for b, a, k in zip(before, after_exact, runner.k_cache):
        assert not torch.equal(a[:-1], b[:-1])              # the exact batch wrote the new tokens' keys
        torch.testing.assert_close(k[:-1], a[:-1])           # the padded run rewrote the same (real blocks)
        assert torch.equal(a[-1], b[-1])                     # only padding touches the scratch block


def test_decode_fast_path_keeps_hf_outputs_with_a_mixed_then_pure_decode_run(model_tok):
    """Steps alternate between mixed batches (prefill + decode: the general path) and pure decode
    (the decode path); the tokens equal HF generate either way."""
    model, tok = model_tok
    reqs = workload(12, model.config.vocab_size, seed=7, max_prompt=40, max_new=30)
    engine = LLMEngine(model, tok, block_size=8, num_kv_blocks=128, max_num_seqs=4, max_num_batched_tokens=32)
    for (prompt, n), out in zip(reqs, run_engine(engine, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)


def _spy_steps(engine):
    """Record the number of steps of every multi-step run of `engine`."""
    runs, real = [], engine.runner.decode_steps

    def spy(seqs, k):
        runs.append(k)
        return real(seqs, k)
    engine.runner.decode_steps = spy
    return runs


def test_multi_step_decoding_gives_the_single_step_tokens(model_tok):
    """num_scheduler_steps=8: greedy tokens equal HF generate and the single-step engine's, with runs
    that cross block boundaries (block_size 4), stop early (eos, stop ids, stop strings: the tokens
    past the stop are dropped), share a prefix, and a cache too small to reserve 8 tokens ahead."""
    model, tok = model_tok
    reqs = workload(24, model.config.vocab_size, seed=5, max_prompt=40, max_new=40)
    multi = LLMEngine(model, tok, block_size=4, num_kv_blocks=400, max_num_seqs=6, num_scheduler_steps=8)
    runs = _spy_steps(multi)
    for (prompt, n), out in zip(reqs, run_engine(multi, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    assert runs and max(runs) == 8 and min(runs) < 8          # runs of 8, and shorter ones near max_tokens
    multi.blocks.check()
    assert multi.blocks.num_free_blocks() == multi.blocks.num_blocks
    # stops inside a run, a shared system prompt, a sampled request in the batch (single steps then)
    system = tok("# utilities for parsing\nimport os\nimport re\n").input_ids
    free = LLMEngine(model, tok, num_kv_blocks=64)
    rid = free.add_request(system + [5], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    free_out = free.run()[rid].outputs[0]
    params = [SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[free_out.token_ids[5]], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, stop=[free_out.text[6:9]], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=3),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    prompts = [system + [5], system + [5], "def main():\n", system + [9], system + [11, 12]]

    def serve(engine):
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        final = engine.run()
        engine.blocks.check()
        assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks
        return [final[i].outputs[0] for i in ids], set(engine.blocks.hash_to_block_id)

    one, one_hashes = serve(LLMEngine(model, tok, block_size=4, num_kv_blocks=200, seed=1))
    multi = LLMEngine(model, tok, block_size=4, num_kv_blocks=200, seed=1, num_scheduler_steps=8)
    runs = _spy_steps(multi)
    got, got_hashes = serve(multi)
    assert runs
    for a, b in zip(one, got):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                         b.stop_reason)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
    assert got[0].finish_reason == got[1].finish_reason == "stop"
    assert got_hashes == one_hashes       # the prefix cache holds the same blocks either way
    # a cache that cannot hold 8 tokens ahead for everyone: shorter runs, then preemption; same tokens
    reqs = workload(12, model.config.vocab_size, seed=6, max_prompt=30, max_new=30)
    small = LLMEngine(model, tok, block_size=4, num_kv_blocks=40, max_num_seqs=6, num_scheduler_steps=8)
    runs = _spy_steps(small)
    for (prompt, n), out in zip(reqs, run_engine(small, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    assert runs and small.stats.preemptions > 0
    small.blocks.check()


def test_multi_step_decoding_streams_each_run_at_once(model_tok):
    """A step of a multi-step engine reports every token of its run; a waiting request (here: one
    added mid-stream) turns the runs off until it has been admitted."""
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_kv_blocks=64, num_scheduler_steps=4)
    rid = engine.add_request("import sys\n", SamplingParams(temperature=0, max_tokens=11, ignore_eos=True))
    lengths = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                lengths.append(len(out.outputs[0].token_ids))
        if len(lengths) == 2:
            engine.add_request("x = 1\n", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    # prefill: 1 token; runs of 4 (1 -> 5); the newcomer's prefill: one single step (6); then 4, 1
    assert lengths == [1, 5, 6, 10, 11], lengths
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLMEngine(model, tok, num_kv_blocks=8, num_scheduler_steps=0)


def test_engine_on_the_triton_kernels_in_the_interpreter(model_tok):
    """The GPU's path through the runner on a CPU: rotary + cache writes in one kernel, the
    split-context decode attention and multi-step decoding's greedy pick, in Triton's interpreter;
    the tokens equal HF generate."""
    model, tok = model_tok
    reqs = [([5, 6, 7], 6), (list(range(10, 30)), 5), ([3], 4)]
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=40, max_num_seqs=4, backend="triton",
                       num_scheduler_steps=3)
    for (prompt, n), out in zip(reqs, run_engine(engine, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)


def test_gemv_fused_model_on_the_triton_kernels_in_the_interpreter(model_tok, monkeypatch):
    """`fuse(gemv=True)`: at decode the runner folds each norm into the merged projection after it,
    the SwiGLU into the down projection and the final norm into the LM head, and the o projection is
    the plain GEMV (`kernels.gemv`), the
    kernels run in the interpreter; a prefill (more than 8 rows) takes the separate ops. The tokens
    equal HF generate on the unfused model."""
    from collections import Counter

    from llmopt import kernels
    from llmopt.kernels import gemv

    model, tok = model_tok
    fused = kernels.fuse(copy.deepcopy(model), backend="triton", gemv=True)
    assert all(layer.gemv for layer in fused.model.layers)
    calls, real = Counter(), gemv.gemv_triton

    def spy(*args, **kw):
        calls[kw.get("prologue", gemv.PLAIN)] += 1
        return real(*args, **kw)
    monkeypatch.setattr(gemv, "gemv_triton", spy)
    reqs = [([5, 6, 7], 5), (list(range(10, 30)), 4)]
    engine = LLMEngine(fused, tok, block_size=4, num_kv_blocks=40, max_num_seqs=4, backend="triton",
                       num_scheduler_steps=2)
    for (prompt, n), out in zip(reqs, run_engine(engine, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    layers = model.config.num_hidden_layers
    assert calls[gemv.NORM] >= 3 * (2 * layers + 1) and calls[gemv.SWIGLU] >= 3 * layers, calls
    assert calls[gemv.PLAIN] >= 3 * layers, calls     # the o projection


def test_a_gemv_decode_step_is_six_kernels_per_layer(model_tok, monkeypatch):
    """What one decode step of `fuse(gemv=True)` launches, counted in the interpreter: per layer the
    q/k/v GEMV with the norm, attention with rotary and the cache write, its pieces' merge, the o GEMV,
    the gate/up GEMV with the norm, the down GEMV with the SwiGLU; then the LM head's GEMV with the
    final norm. Nothing else is a kernel of ours, and no matmul is left to PyTorch."""
    from collections import Counter

    from triton.runtime.interpreter import InterpretedFunction

    from llmopt import kernels

    model, tok = model_tok
    fused = kernels.fuse(copy.deepcopy(model), backend="triton", gemv=True)
    engine = LLMEngine(fused, tok, block_size=4, num_kv_blocks=16, max_num_seqs=2, backend="triton")
    engine.add_request(list(range(5, 15)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()                                    # the prefill: 10 tokens, 3 blocks, so the attention splits
    launched, linears = Counter(), []
    real = InterpretedFunction.run

    def run(self, *args, **kw):
        launched[self.fn.__name__] += 1
        return real(self, *args, **kw)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **kw: linears.append(1))
    engine.step()                                    # one decode step
    layers = model.config.num_hidden_layers
    assert launched == Counter({"_gemv_kernel": 4 * layers + 1, "_paged_decode_kernel": layers,
                                "_paged_decode_reduce_kernel": layers}), launched
    assert not linears


class _StandInGraph:
    """A CUDA graph's contract on a CPU: `replay()` reruns the recorded step on the tensors it was
    recorded with, and its output lands in the tensor the recording returned."""
    def __init__(self, fn):
        self.fn = fn
        self.out = fn()

    def replay(self):
        self.out.copy_(self.fn())

    def pool(self):
        return None

    @classmethod
    def record(cls, fn, pool):   # ModelRunner._record's signature
        graph = cls(fn)
        return graph, graph.out


@pytest.mark.parametrize("steps, compiled", [(1, 0), (8, 0), (8, 3)])
def test_graph_replay_path_with_a_stand_in_graph(model_tok, monkeypatch, steps, compiled):
    """The engine's CUDA-graph path (static input tensors, padded batch sizes, the scratch block, the
    multi-step graph's in-graph token pick and input update; with compilation_config=3, the compiled
    step recorded) run on a CPU through stand-in graphs: the tokens equal HF generate."""
    from torch._dynamo.utils import counters

    from llmopt.serving.runner import ModelRunner

    model, tok = model_tok
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(ModelRunner, "_record", staticmethod(_StandInGraph.record))
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=300, max_num_seqs=5, enforce_eager=True,
                       max_model_len=128, num_scheduler_steps=steps, compilation_config=compiled)
    before = counters["stats"]["unique_graphs"]
    engine.runner.capture_cuda_graphs(5)
    assert (counters["stats"]["unique_graphs"] - before >= 4) == bool(compiled)   # one graph a size, compiled
    assert sorted(engine.runner.graphs) == [1, 2, 4, 5]
    runs = _spy_steps(engine)
    replays = []
    for size, (g, *_) in engine.runner.graphs.items():
        real = g.replay
        g.replay = lambda real=real, size=size: (replays.append(size), real())
    # the first request holds block 0 to the end, while padded batches run beside it
    reqs = [([7, 8, 9, 10, 11], 60)] + workload(9, model.config.vocab_size, seed=8, max_prompt=30, max_new=30)
    eager = LLMEngine(model, tok, block_size=4, num_kv_blocks=300, max_num_seqs=5, enforce_eager=True)
    for (prompt, n), out, ref in zip(reqs, run_engine(engine, reqs), run_engine(eager, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
        # the same logits to rounding (a padded batch sums in another order: 1.1e-4 apart over 60 tokens with
        # PyTorch's unvectorized kernels); a padding row that wrote into a live block would show here
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref.outputs[0].cumulative_logprob, rel=1e-5,
                                                                  abs=1e-4)
    assert set(replays) == {1, 2, 4, 5}, set(replays)          # every graph, padded batches among them
    assert bool(runs) == (steps > 1) and (steps == 1 or max(runs) == 8)


@pytest.mark.gpu
def test_gpu_cuda_graph_multi_step_equals_single_step():
    """On a GPU: the multi-step CUDA graphs (greedy pick and input update inside the graph, replays back
    to back) give the eager single-step engine's tokens, padded batches included."""
    import llmopt

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    model.eval()
    reqs = workload(24, model.config.vocab_size, seed=3, max_prompt=60, max_new=40)
    multi = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=12, num_scheduler_steps=8)
    runs = _spy_steps(multi)
    eager = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=12, enforce_eager=True)
    for x, y in zip(run_engine(multi, reqs), run_engine(eager, reqs)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert runs and max(runs) == 8


@pytest.mark.gpu
def test_gpu_compiled_cuda_graphs_equal_eager():
    """On a GPU: compilation_config=3 (torch.compile's kernels recorded in the CUDA graphs), single and
    multi-step, gives the eager engine's tokens, padded batches included."""
    import llmopt

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    model.eval()
    reqs = workload(12, model.config.vocab_size, seed=4, max_prompt=60, max_new=30)
    eager = run_engine(LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=4, enforce_eager=True),
                       reqs)
    for steps in (1, 8):
        engine = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=4, compilation_config=3,
                           num_scheduler_steps=steps)
        assert sorted(engine.runner.graphs) == [1, 2, 4]
        for x, y in zip(run_engine(engine, reqs), eager):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids


@pytest.mark.gpu
def test_gpu_moe_model_decodes_eagerly_with_hf_tokens():
    """On a GPU: lesson 07's upcycled model is served without CUDA graphs (its routing reads counts
    back on the host), with a warning saying so, and gives HF generate's tokens."""
    import llmopt
    from llmopt import moe

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    big = moe.upcycle(model, num_experts=4, top_k=2).eval()
    with pytest.warns(UserWarning, match="decoding without CUDA graphs: layer 0's MLP"):
        engine = LLMEngine(big, tok, block_size=16, num_kv_blocks=128, max_num_seqs=8)
    assert not engine.runner.graphs
    reqs = workload(8, model.config.vocab_size, seed=4, max_prompt=40, max_new=12)
    for (prompt, n), out in zip(reqs, run_engine(engine, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(big, prompt, n)


@pytest.mark.gpu
def test_gpu_fused_w4_moe_model_records_cuda_graphs():
    """On a GPU: the upcycled model in W4 after `kernels.fuse` runs its experts with the grouped MoE kernels,
    which read nothing back to the host, so the engine records CUDA graphs for it; its tokens are the eager
    engine's and HF generate's (float32)."""
    import llmopt
    from llmopt import kernels, moe
    from llmopt.quant import QuantConfig, quantize

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    big = kernels.fuse(quantize(moe.upcycle(model, num_experts=4, top_k=2).eval(), QuantConfig(bits=4, group_size=32)))
    engine = LLMEngine(big, tok, block_size=16, num_kv_blocks=128, max_num_seqs=8)
    assert engine.runner.graphs and engine.runner.eager_reason is None
    eager = LLMEngine(big, tok, block_size=16, num_kv_blocks=128, max_num_seqs=8, enforce_eager=True)
    reqs = workload(8, model.config.vocab_size, seed=4, max_prompt=40, max_new=12)
    for (prompt, n), out, ref in zip(reqs, run_engine(engine, reqs), run_engine(eager, reqs)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids == hf_greedy(big, prompt, n)


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_equals_eager_and_hf():
    """On a GPU: the engine with CUDA graphs gives the eager engine's and HF generate's tokens (float32,
    so kernel choices cannot flip a greedy pick), with batches that need padding."""
    import llmopt

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    model.eval()
    reqs = workload(24, model.config.vocab_size, seed=3, max_prompt=60, max_new=20)
    graphs = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=12)
    assert sorted(graphs.runner.graphs) == [1, 2, 4, 8, 12]
    eager = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=12, enforce_eager=True)
    assert not eager.runner.graphs
    a, b = run_engine(graphs, reqs), run_engine(eager, reqs)
    for (prompt, n), x, y in zip(reqs, a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert x.outputs[0].token_ids == hf


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_gemv_fused_engine_equals_hf(pdl):
    """On a GPU: `fuse(gemv=True)` served with CUDA graphs and multi-step decoding (the fused GEMVs,
    rotary and cache write inside attention, the in-graph token pick) gives HF generate's tokens on the
    unfused model (float32, so no kernel choice can flip a greedy pick), padded batches included; also
    with the decode kernels launched by programmatic dependent launch (recorded so in the graphs)."""
    import llmopt
    from llmopt import kernels
    from llmopt.kernels import common

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    model.eval()
    fused = kernels.fuse(copy.deepcopy(model), gemv=True)
    reqs = workload(12, model.config.vocab_size, seed=4, max_prompt=60, max_new=20)
    common.set_pdl(pdl)
    try:
        engine = LLMEngine(fused, tok, block_size=16, num_kv_blocks=256, max_num_seqs=6, num_scheduler_steps=4)
        outs = run_engine(engine, reqs)
    finally:
        common.set_pdl(False)
    for (prompt, n), out in zip(reqs, outs):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == hf


def test_decode_benchmark_pdl_variants_turn_it_on_for_their_own_engine_only(monkeypatch):
    """The -pdl variants build their engine (where CUDA graphs record the launches) and run it with
    `set_pdl(True)`; every other variant, and the caller afterwards, keep the setting they had."""
    from llmopt.kernels import common
    from llmopt.serving import bench as sbench

    seen, real = [], sbench._engine_for

    def spy(*args, **kw):
        seen.append(common.pdl_enabled())
        return real(*args, **kw)

    monkeypatch.setattr(sbench, "_engine_for", spy)
    assert not common.pdl_enabled()
    r = sbench.decode_benchmark(None, batch_sizes=(1,), prompt_len=4, new_tokens=3, repeats=1,
                                systems=("gemv", "gemv-pdl", "gemv-multistep-pdl"))
    assert seen == [False, True, True] and not common.pdl_enabled()
    names = [row["system"] for row in r["rows"]]
    assert ", programmatic dependent launch" in names[1] and "steps a sync" in names[2], names
    assert all(row["tok_s"] > 0 and row["programmatic_dependent_launch"] is False for row in r["rows"])  # a CPU


@pytest.mark.gpu
def test_gpu_engine_batch_32_is_3x_hf_generate():
    """Issue bar: a TinyLlama-1.1B-shaped model (random, bf16), batch 32: the engine (CUDA graphs) >= 3x
    HF generate on the same harness. Measured on an H200, 2026-11-26: 5640 vs 1834 tok/s (3.08x)."""
    from llmopt.serving.bench import decode_benchmark

    r = decode_benchmark("tinyllama-1.1b-random", batch_sizes=(32,), new_tokens=64, repeats=2, systems=("hf", "graphs"))
    rows = {x["system"]: x for x in r["rows"]}
    assert rows["llmopt engine, CUDA graphs"]["tok_s"] >= 3 * rows["HF generate"]["tok_s"], rows


@pytest.mark.gpu
@pytest.mark.xfail(reason="not reached yet: on an H200 (2026-11-27) batch-1 decode with CUDA graphs reached 17.8% "
                   "of the floor as loaded and 23.9% with the fused kernels (2.09 ms per token against 0.50); "
                   "multi-step decoding, the split-context attention with rotary and the cache write inside, "
                   "and the fused decode GEMVs are not yet timed on a GPU",
                   strict=False)
def test_gpu_engine_batch_1_reaches_half_the_bandwidth_floor():
    from llmopt.serving.bench import decode_benchmark

    r = decode_benchmark("tinyllama-1.1b-random", batch_sizes=(1,), new_tokens=64, repeats=2,
                         systems=("gemv-multistep",))
    assert r["rows"][0]["fraction_of_floor"] >= 0.5, r["rows"]


def test_load_llm_hands_vllm_a_folder_and_falls_back_when_it_fails(monkeypatch):
    """With a (fake) vLLM and a GPU: the bundled short name becomes its folder, our-only arguments are
    dropped, vLLM's SamplingParams are used for it; a vLLM that fails to start gives ours, with a warning."""
    import sys
    import types

    from llmopt import models
    from llmopt.serving import llm as llm_mod

    seen = {}

    class FakeVLLM:
        def __init__(self, model, **kw):
            if model == "broken":
                raise RuntimeError("unknown architecture")
            seen.update(model=model, **kw)

    class FakeParams:
        def __init__(self, **kw):
            self.kw = kw

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeVLLM, FakeParams
    FakeVLLM.__module__ = "vllm.entrypoints.llm"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    got = llm_mod.load_llm("tinypy", max_num_seqs=8, backend="torch", num_kv_blocks=10)
    assert isinstance(got, FakeVLLM)
    assert seen == {"model": str(models.bundled_path("tinypy")), "max_num_seqs": 8}
    p = llm_mod.sampling_params_for(got, temperature=0, max_tokens=4)
    assert isinstance(p, FakeParams) and p.kw == {"temperature": 0, "max_tokens": 4}
    calls = []
    monkeypatch.setattr(llm_mod, "LLM", lambda **kw: calls.append(kw) or "ours")
    with pytest.warns(UserWarning, match="unknown architecture"):
        assert llm_mod.load_llm("broken", max_num_seqs=2) == "ours"
    assert calls == [{"model": "broken", "max_num_seqs": 2}]
    assert isinstance(llm_mod.sampling_params_for("ours", max_tokens=3), SamplingParams)


def test_serve_benchmark_runs_each_system_repeatedly_and_keeps_the_median():
    from llmopt.serving.bench import format_results, serve_benchmark

    r = serve_benchmark("tinypy", n=6, batch_size=3, repeats=3, prompt_range=(16, 40), output_range=(4, 12),
                        block_size=4)   # short sequences: small blocks, or a partly filled block is most of one
    assert [x["system"].split(",")[0] for x in r["results"]] == ["HF generate", "HF generate",
                                                                  "llmopt engine (paged"]
    for x in r["results"]:
        runs = x["runs_tokens_per_s"]
        assert len(runs) == 3 and x["tokens_per_s"] == sorted(runs)[1] and x["generated_tokens"] == sum(
            q for q in r["workload"]["output_tokens"])
    single, static, engine = r["results"]
    assert engine["kv_waste"] < static["kv_waste"] and single["kv_waste"] == 0
    assert "median of 3 runs" in format_results(r)
    m = serve_benchmark("tinypy", n=6, batch_size=3, prompt_range=(16, 40), output_range=(4, 12), block_size=4,
                        systems=("engine", "engine-multistep"))["results"]
    assert m[1]["system"].endswith("8 steps a sync") and m[0]["generated_tokens"] == m[1]["generated_tokens"]
    assert m[1]["steps"] >= m[0]["steps"] - 1 and m[1]["computed_tokens"] >= m[0]["computed_tokens"]


@pytest.mark.parametrize("steps", [1, 4])
def test_compiled_decode_equals_hf_generate(tiny, steps):
    """compilation_config=3: the decode step by torch.compile, the batch padded to a captured size and
    the block tables of any width. The tokens equal HF generate's, through batches of 1 to 3 sequences
    whose tables grow from 2 to 12 blocks, and dynamo compiles once per batch size, not per width."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    model.eval()
    reqs = [([3, 4, 5], 40), ([9] * 17, 9), ([7, 8], 30), ([11, 12, 13, 14, 15], 21), ([2], 44)]
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=64, max_num_seqs=3, compilation_config=3,
                       num_scheduler_steps=steps)
    assert engine.runner.compiled and engine.runner.batch_sizes == [1, 2, 3]
    before = counters["stats"]["unique_graphs"]
    for (prompt, n), out in zip(reqs, run_engine(engine, reqs)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    assert 1 <= counters["stats"]["unique_graphs"] - before <= 3
    engine.blocks.check()


def test_compilation_config_takes_vllms_forms(tiny):
    from llmopt.serving.runner import compilation_level

    assert [compilation_level(c) for c in (None, 0, 3, {"level": 2}, {"mode": 1})] == [0, 0, 3, 2, 1]
    for bad in (-1, 4, "3", True, {"level": 3, "mode": 3}, {"backend": "inductor"}):
        with pytest.raises(ValueError, match="compilation_config"):
            compilation_level(bad)
    model, tok = tiny
    with pytest.raises(ValueError, match="compilation_config"):
        LLM(model=model, tokenizer=tok, num_kv_blocks=8, compilation_config={"cudagraph_mode": "FULL"})
    assert not LLM(model=model, tokenizer=tok, num_kv_blocks=8, compilation_config=0).llm_engine.runner.compiled


def test_compiled_decode_runs_the_triton_kernels_as_they_are(tiny):
    """compilation_config=3 with backend="triton" (the interpreter here, a GPU's kernels there): every
    function that launches a kernel is opaque to the compiler (`kernels.common.compiler_opaque`), so
    the compiled step calls the kernels between its own pieces (attention, token pick, norms, GEMVs).
    Fused with the norms and SwiGLU inside the GEMVs, and W4 with merged projections, 2 steps a sync:
    the tokens equal the uncompiled engine's on the same kernels."""
    from torch._dynamo.utils import counters

    from llmopt.kernels import fuse
    from llmopt.quant import QuantConfig, quantize

    model, tok = tiny
    model.eval()
    models = [fuse(copy.deepcopy(model), backend="triton", gemv=True),
              fuse(quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32)), backend="triton", merge=True)]
    reqs = [([3, 4, 5], 6), ([7, 8], 5)]
    for m in models:
        runs = []
        for level in (0, 3):
            engine = LLMEngine(m, tok, block_size=4, num_kv_blocks=64, max_num_seqs=2, backend="triton",
                               compilation_config=level, num_scheduler_steps=2)
            before = counters["stats"]["unique_graphs"]
            runs.append([o.outputs[0].token_ids for o in run_engine(engine, reqs)])
            assert (counters["stats"]["unique_graphs"] > before) == bool(level)
        assert runs[0] == runs[1]


def test_engine_arguments_are_checked_before_use(model_tok):
    """block_size 0 divided the KV budget (a ZeroDivisionError) before BlockManager could check it."""
    model, tok = model_tok
    for kw, field in ((dict(block_size=0), "block_size"), (dict(block_size=-16), "block_size"),
                      (dict(max_num_seqs=0), "max_num_seqs"), (dict(num_scheduler_steps=0), "num_scheduler_steps"),
                      (dict(max_num_batched_tokens=0), "max_num_batched_tokens")):
        with pytest.raises(ValueError, match=field):
            LLMEngine(model, tok, **kw)
