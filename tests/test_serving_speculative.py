"""Speculative decoding by n-gram lookup: the guesses, their verification, and the engine's outputs,
which must be exactly greedy decoding's (HF `generate`, the engine without speculation) under
preemption, chunked prefill, stops, sampled neighbours and max_tokens; for sampled requests,
speculative sampling's rule, whose tokens must be distributed as sampling's own (counted)."""
import random

import pytest
import torch

from llmopt.serving import LLM, LLMEngine, SamplingParams
from llmopt.serving.speculative import SpeculativeConfig, ngram_propose, verify, verify_sampled

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
CODE = ["def fibonacci(n):\n", "import os\n\ndef list_files(path):\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
        "        self.items.append(x)\n\n    def pop(self):\n"]


def test_ngram_propose_takes_the_longest_latest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]     # "1 2 3" last seen before 7 5
    assert ngram_propose([4, 1, 2, 8, 9, 3, 2, 6, 1, 2], 3, max_n=2) == [8, 9, 3]   # the bigram beats "2 6"
    assert ngram_propose([5, 6, 7, 5], 3, max_n=1) == [6, 7, 5]
    assert ngram_propose([1, 2, 3], 4) == [] and ngram_propose([7], 2) == []
    assert ngram_propose([1, 2, 1, 2], 4, max_n=2) == [1, 2]                    # runs up to the end
    assert ngram_propose([3, 1, 2, 9, 1, 2], 4, max_n=2, min_n=2) == [9, 1, 2]


def test_verify_keeps_the_guesses_greedy_would_pick():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([7, 2, 4, 1]):
        logits[row, best] = 5.0
    m, lps, nxt = verify(logits, [7, 2, 9])
    assert m == 2 and nxt.argmax().item() == 4                    # 9 was wrong: greedy's 4 comes instead
    assert lps == pytest.approx(torch.log_softmax(logits[:2], -1)[[0, 1], [7, 2]].tolist())
    m, _, nxt = verify(logits, [7, 2, 4])
    assert m == 3 and nxt.argmax().item() == 1                    # all right: the bonus token from the last row
    assert verify(logits, [3])[0] == 0


def test_config_is_checked():
    for bad, field in ((dict(method="draft_model"), "needs model"), (dict(method="ngram", model="x"), "takes no model"),
                       (dict(method="eagle"), "'ngram' or 'draft_model'"),
                       (dict(num_speculative_tokens=0), "num_speculative"),
                       (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup")):
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig(**bad)
    assert SpeculativeConfig.of(NGRAM).num_speculative_tokens == 4 and SpeculativeConfig.of(None) is None
    assert SpeculativeConfig.of({"model": "x"}).method == "draft_model" and SpeculativeConfig().method == "ngram"
    with pytest.raises(ValueError, match="unsupported keys"):
        SpeculativeConfig.of({"method": "ngram", "disable_by_batch_size": 4})


def test_speculation_and_multi_step_do_not_combine(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLMEngine(model, tok, num_kv_blocks=8, num_scheduler_steps=4, speculative_config=NGRAM)


def _workload(tok, vocab, n=24, seed=0):
    rng = random.Random(seed)
    prompts = [tok(p).input_ids for p in CODE]
    prompts += [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n - len(prompts))]
    return [(p, rng.randint(1, 40)) for p in prompts]


def _draft(model, layers=3):
    """The target with half its layers dropped, untrained: it agrees with the target on about half the tokens."""
    from llmopt import distill

    return distill.init_from_teacher(model, distill.student_config(model.config, num_hidden_layers=layers))


PLAIN, PREEMPTED = dict(num_kv_blocks=256), dict(num_kv_blocks=22, block_size=4)


@pytest.mark.parametrize("kw,guesser", [(PLAIN, "ngram"), (PREEMPTED, "ngram"),
                                        (dict(num_kv_blocks=256, max_num_batched_tokens=9), "ngram"),
                                        (dict(num_kv_blocks=256, enable_prefix_caching=False, chunked_prefill=False),
                                         "ngram"),
                                        (PLAIN, "draft"), (PREEMPTED, "draft")],
                         ids=["plain", "preempted", "tiny-budget", "no-cache-no-chunks", "draft", "draft-preempted"])
def test_speculative_outputs_are_greedy_decodings(model_tok, kw, guesser):
    model, tok = model_tok
    spec = NGRAM if guesser == "ngram" else {"model": _draft(model), "num_speculative_tokens": 3}
    reqs = _workload(tok, model.config.vocab_size)
    sampled = SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True)

    def run(**extra):
        engine = LLMEngine(model, tok, max_num_seqs=8, **kw, **extra)
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for p, n in reqs]
        ids.append(engine.add_request(CODE[0], sampled))      # a sampled neighbour (its guesses: speculative sampling)
        final = engine.run()
        assert sorted(final) == sorted(ids)
        assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks
        engine.blocks.check()
        return [final[i].outputs[0] for i in ids], engine.stats

    want, base = run()
    got, stats = run(speculative_config=spec)
    assert [o.token_ids for o in got[:-1]] == [o.token_ids for o in want[:-1]]
    assert [o.cumulative_logprob for o in got[:-1]] == pytest.approx([o.cumulative_logprob for o in want[:-1]],
                                                                     abs=1e-3)
    assert len(got[-1].token_ids) == 20          # the sampled one: its own draws, as many tokens
    assert stats.spec_accepted > 0 and stats.steps <= base.steps
    if "max_num_batched_tokens" not in kw:     # a 9-token budget leaves few tokens to guess with
        assert stats.steps < base.steps
    if "block_size" in kw:
        assert stats.preemptions > 0
    (prompt, n) = reqs[0]
    x = torch.tensor([prompt])
    with torch.no_grad():
        hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert got[0].token_ids == hf


def test_stops_inside_an_accepted_run_and_max_tokens(model_tok):
    """A stop string, a stop token or max_tokens reached among the accepted guesses ends the request
    there, as greedy decoding would have."""
    model, tok = model_tok
    base = LLM(model=model, tokenizer=tok, num_kv_blocks=128)
    spec = LLM(model=model, tokenizer=tok, num_kv_blocks=128, speculative_config=NGRAM)
    plain = base.generate(CODE[2], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0].outputs[0]
    stop_token = plain.token_ids[25]
    for params in (SamplingParams(temperature=0, max_tokens=60, stop=["append"]),
                   SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[stop_token], ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=60)):
        a = base.generate(CODE[2], params)[0].outputs[0]
        b = spec.generate(CODE[2], params)[0].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, a.finish_reason,
                                                                          a.stop_reason)
    assert spec.engine.stats.spec_accepted > 0


def test_a_draft_that_is_the_target_is_right_and_caches_follow_the_sequences(model_tok):
    """With the target itself as the draft every guess is greedy's pick (but for a near-tie the two code
    paths round differently), so a step yields 1 + k tokens; that holds only if each sequence's draft
    cache is cut back and extended correctly from step to step."""
    import copy

    model, tok = model_tok
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=128,
              speculative_config={"model": copy.deepcopy(model), "num_speculative_tokens": 4})
    out = llm.generate(CODE, params)
    plain = LLM(model=model, tokenizer=tok, num_kv_blocks=128).generate(CODE, params)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain]
    st = llm.engine.stats
    assert st.spec_accepted >= 0.95 * st.spec_proposed > 0
    assert st.steps <= 3 + 40 // 5 + 2        # the prefill step, then about 5 tokens a step
    assert llm.engine.draft.caches == {}       # finished sequences leave no draft cache behind


def test_draft_guesses_equal_a_fresh_drafts_after_rejections(model_tok):
    """The draft's cache, cut back after a rejected guess (or a shorter history: a preemption, a fork)
    and run forward on the new tokens, gives the guesses a draft with no cache gives."""
    from llmopt.serving.speculative import DraftModel

    model, tok = model_tok
    draft = DraftModel(_draft(model), model)
    rng = random.Random(0)
    tokens = tok(CODE[2]).input_ids
    for step in range(10):
        guess = draft.propose(7, tokens, 4)
        assert guess == DraftModel(draft.model, model).propose(7, tokens, 4), step
        kept = rng.choice([0, 1, 3, 4])     # the target kept some guesses, then gave its own token
        tokens = tokens + guess[:kept] + [rng.randrange(1, model.config.vocab_size)]
        if step == 5:
            tokens = tokens[:len(tokens) - 9] + [5]


def test_draft_model_by_name_and_a_foreign_vocabulary(model_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmopt

    small, tok = llmopt.load("tiny-random", dtype=torch.float32)
    llm = LLM(model=small, tokenizer=tok, num_kv_blocks=64, speculative_config={"model": "tiny-random"})
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert llm.generate("def f(x):", params)[0].outputs[0].token_ids == \
        LLM(model=small, tokenizer=tok, num_kv_blocks=64).generate("def f(x):", params)[0].outputs[0].token_ids
    assert llm.engine.stats.spec_accepted == llm.engine.stats.spec_proposed > 0   # the same model: always right
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(small, tok, num_kv_blocks=8, speculative_config={"model": other})


def test_verify_sampled_keeps_the_targets_distribution():
    """Speculative sampling with a guess the model does not favour: over 5,000 draws the first token
    emitted is distributed as the target's first row, and the second, after the first guess was kept,
    as its second row (the accepted guess is sampled at exactly its probability; a rejection draws
    from the rest). Each frequency within 0.035 of its probability, about 5 standard deviations at
    5,000 draws; a residual that kept the rejected guess would put 0.47 on token 3, not 0.27."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0], [0.1, 1.5, 0.3, -1.0, 0.6], [0.0] * 5])
    params = SamplingParams(temperature=0.8)
    target = torch.softmax(logits / 0.8, -1)
    guess = [3, 2]                     # P(3) = 0.27 in row 0, P(2) = 0.15 in row 1
    first, second = torch.zeros(5), torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    n = 5_000
    for _ in range(n):
        m, lps, token, lp = verify_sampled(logits, guess, params, g)
        emitted = guess[:m] + [token]
        first[emitted[0]] += 1
        if m >= 1:
            second[emitted[1]] += 1
        assert len(lps) == m and lp == pytest.approx(torch.log_softmax(logits[m], -1)[token].item(), abs=1e-6)
    assert (first / n - target[0]).abs().max() < 0.035, (first / n, target[0])
    assert (second / second.sum() - target[1]).abs().max() < 0.035 * (n / second.sum()) ** 0.5
    # a guess with probability 0 under top-k is always rejected, and never drawn instead
    m, _, token, _ = verify_sampled(logits, [2], SamplingParams(temperature=1.0, top_k=2), g)
    assert m == 0 and token in (0, 3)


def test_speculative_sampling_in_the_engine(model_tok):
    """Sampled requests are guessed for. With top_k=1 the target puts all its mass on the argmax, so
    speculative sampling must give greedy decoding's tokens exactly; at temperature 0.8 the guesses
    are accepted often on code, a seeded request repeats itself, and every request gets its tokens."""
    model, tok = model_tok
    spec = LLM(model=model, tokenizer=tok, num_kv_blocks=256, speculative_config=NGRAM)
    base = LLM(model=model, tokenizer=tok, num_kv_blocks=256)
    greedy = base.generate(CODE, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    top1 = spec.generate(CODE, SamplingParams(temperature=1.0, top_k=1, seed=5, max_tokens=48, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]
    accepted = spec.engine.stats.spec_accepted
    assert accepted > 0
    warm = SamplingParams(temperature=0.8, seed=11, max_tokens=48, ignore_eos=True)
    a = spec.generate(CODE, warm)
    b = spec.generate(CODE, warm)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 48 for o in a)
    assert spec.engine.stats.spec_accepted > accepted


def test_sampled_speculation_with_forks_stops_and_preemption(model_tok):
    """Sampled speculation beside the engine's other paths: n=3 completions (each fork guessed for
    with its own generator), top-p and min-p, a stop string, and a cache small enough to preempt.
    Every request ends as its parameters say, and no block leaks."""
    model, tok = model_tok
    engine = LLMEngine(model, tok, num_kv_blocks=26, block_size=4, max_num_seqs=6, speculative_config=NGRAM)
    reqs = {
        engine.add_request(CODE[2], SamplingParams(n=3, temperature=0.7, seed=2, max_tokens=30, ignore_eos=True)): 30,
        engine.add_request(CODE[0], SamplingParams(temperature=0.9, top_p=0.9, min_p=0.05, seed=4, max_tokens=25,
                                                   ignore_eos=True)): 25,
        engine.add_request(CODE[1], SamplingParams(temperature=0.8, seed=6, max_tokens=40, stop=["\n\n"])): None,
    }
    final = engine.run()
    assert sorted(final) == sorted(reqs)
    for rid, n in reqs.items():
        outs = final[rid].outputs
        for o in outs:
            if n is not None:
                assert len(o.token_ids) == n and o.finish_reason == "length"
            else:
                assert o.finish_reason in ("stop", "length") and "\n\n" not in o.text
    assert len(final[next(iter(reqs))].outputs) == 3
    assert engine.stats.spec_accepted > 0 and engine.stats.preemptions > 0
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks
    engine.blocks.check()


@pytest.mark.gpu
@pytest.mark.parametrize("guesser", ["ngram", "draft"])
def test_gpu_speculation_with_cuda_graphs_keeps_greedy_tokens(guesser):
    """On a GPU (the engine records CUDA graphs for its decode steps; a verification step runs 1 + k
    tokens a sequence): n-gram and draft guesses leave the greedy tokens as they are without them.
    float32, so kernel choices cannot flip a greedy pick."""
    import llmopt

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    model.eval()
    spec = NGRAM if guesser == "ngram" else {"model": _draft(model), "num_speculative_tokens": 3}
    reqs = _workload(tok, model.config.vocab_size, n=12)
    outs = []
    for extra in ({}, {"speculative_config": spec}):
        engine = LLMEngine(model, tok, num_kv_blocks=256, max_num_seqs=8, **extra)
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for p, n in reqs]
        final = engine.run()
        outs.append([final[i].outputs[0].token_ids for i in ids])
    assert outs[0] == outs[1] and engine.stats.spec_accepted > 0
