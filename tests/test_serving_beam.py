"""Beam search (`BeamSearchParams`, `LLM.beam_search`): the engine's beams equal the spec's (the whole
model run on every beam, no cache) and HF `generate(num_beams=...)`'s; beams share KV blocks and copy
only what they write; preemption, chunked prefill, other requests in the batch, abort and bad input."""
import pytest
import torch

from llmopt.serving import LLM, BeamSearchParams, LLMEngine, SamplingParams, beam_search_reference
from llmopt.serving.beam import BeamGroup, beam_score, beam_search_by_requests


def assert_same_beams(out, ref):
    """An engine `RequestOutput` of a beam search holds the reference's beams, in its order."""
    n = len(out.prompt_token_ids)
    assert out.finished
    assert [o.token_ids for o in out.outputs] == [r.tokens[n:] for r in ref]
    assert [o.finish_reason for o in out.outputs] == [r.finish_reason for r in ref]
    assert [o.cumulative_logprob for o in out.outputs] == pytest.approx([r.cum_logprob for r in ref], abs=1e-4)
    assert [list(d) for o in out.outputs for d in o.logprobs] == [list(d) for r in ref for d in r.logprobs]


def run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    final = engine.run()
    assert sorted(final) == sorted(ids)
    return [final[i] for i in ids]


PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 43)), [300, 12]]


@pytest.mark.parametrize("params", [BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True),
                                    BeamSearchParams(beam_width=4, max_tokens=12, length_penalty=0.7),
                                    BeamSearchParams(beam_width=2, max_tokens=9, length_penalty=0.0)])
def test_beams_equal_the_reference_three_requests_in_one_batch(model_tok, params):
    """With EOS the newline token (frequent in the bundled code model), beams also finish early ("stop")."""
    model, tok = model_tok
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=256)
    engine.eos = {tok("\n").input_ids[-1]}
    outs = run(engine, PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert_same_beams(out, beam_search_reference(model, prompt, params, engine.eos))
        assert len(out.outputs) == params.beam_width
    if not params.ignore_eos:
        assert any(o.finish_reason == "stop" for out in outs for o in out.outputs)
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks and not engine.requests
    engine.blocks.check()


@pytest.mark.parametrize("caching", [True, False])
def test_vllm_v1s_way_one_token_requests_gives_the_same_beams(model_tok, caching):
    """`beam_search_by_requests` (beams as one-token requests, shared blocks found by the prefix cache)
    finds the in-engine search's beams; with the prefix cache it recomputes only partial blocks."""
    model, tok = model_tok
    params = BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.7)
    eos = {tok("\n").input_ids[-1]}
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=256, enable_prefix_caching=caching)
    engine.eos = eos
    prompt = list(range(20, 43))
    by_requests = beam_search_by_requests(engine, prompt, params)
    (out,) = run(engine, [prompt], params)
    assert_same_beams(out, by_requests)
    computed = engine.stats.computed_tokens - (len(prompt) + 3 * 7)   # the one-token requests' share
    if caching:
        assert computed < 8 * 3 * 4 + len(prompt)        # at most a partial block (< 4 tokens) a beam a step
    else:
        assert computed > 8 * len(prompt)                # every beam runs its whole context every step


def test_one_beam_is_greedy_and_the_beams_equal_hf_generate(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=256)
    prompt, n = [5, 6, 7, 8, 9], 8
    ids = torch.tensor([prompt])
    (one,) = run(engine, [prompt], BeamSearchParams(beam_width=1, max_tokens=n, ignore_eos=True))
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
    assert one.outputs[0].token_ids == greedy[0, len(prompt):].tolist()
    (out,) = run(engine, [prompt], BeamSearchParams(beam_width=3, max_tokens=n, ignore_eos=True))
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, num_return_sequences=3,
                        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                        output_scores=True, return_dict_in_generate=True)
    assert [o.token_ids for o in out.outputs] == hf.sequences[:, len(prompt):].tolist()
    # HF ranks by the sum over the generated length: the same order, the same numbers
    assert [o.cumulative_logprob / n for o in out.outputs] == pytest.approx(hf.sequences_scores.tolist(), abs=1e-4)


def test_beams_share_blocks_fork_and_copy_only_the_block_they_write(model_tok):
    model, tok = model_tok
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=64)
    prompt = list(range(3, 13))      # 10 tokens: blocks of 4, the third one partly filled and shared by forks
    rid = engine.add_request(prompt, BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True))
    (first,) = engine.step()         # the prefill, then the first step of the search: 4 beams of one parent
    beams = engine.requests[rid][0].beam.beams
    assert len(beams) == 4 and len(first.outputs) == 4 and not first.finished
    assert all(b.block_table == beams[0].block_table for b in beams)
    assert all(engine.blocks.blocks[i].ref_count == 4 for i in beams[0].block_table)
    assert engine.scheduler.seats() == 4
    peak, steps = 0, 1
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        assert len(outs) <= 1 and engine.scheduler.seats() <= 4
        held = {b for s in engine.scheduler.running for b in s.block_table}
        tables = sum(len(s.block_table) for s in engine.scheduler.running)
        peak = max(peak, len(held))
        assert len(held) <= tables      # shared blocks are held once
        engine.blocks.check()
    assert steps == 12 and outs[0].finished and len(outs[0].outputs) == 4
    # 4 beams of 22 tokens in blocks of 4 would hold 4 * 6 = 24 blocks apart; sharing the prompt's 2 full
    # blocks at least saves 6 of them, and only last blocks were ever copied
    assert peak <= 24 - 6 and 0 < engine.stats.copied_blocks
    assert engine.stats.computed_tokens == len(prompt) + 4 * 11
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks


@pytest.mark.parametrize("kw", [dict(num_kv_blocks=13, max_num_seqs=8),
                                dict(num_kv_blocks=13, max_num_seqs=8, max_num_batched_tokens=7),
                                dict(num_kv_blocks=13, max_num_seqs=8, chunked_prefill=False,
                                     enable_prefix_caching=False)])
def test_beams_with_other_requests_under_preemption(model_tok, kw):
    """Two beam searches and four greedy requests in a cache too small for all: requests are preempted
    (beams as a group) and recomputed, and every answer is still the reference's."""
    model, tok = model_tok
    engine = LLMEngine(model, tok, block_size=4, **kw)
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    beam_prompts, greedy_prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]], [[7] * 5, [9, 8, 7], [100, 101], [60] * 6]
    ids = [engine.add_request(p, params) for p in beam_prompts]
    ids += [engine.add_request(p, greedy) for p in greedy_prompts]
    final = engine.run()
    assert sorted(final) == sorted(ids)
    assert engine.stats.preemptions > 0
    assert sum(final[rid].metrics["num_preemptions"] for rid in ids[:2]) > 0     # beams among them
    for p, rid in zip(beam_prompts, ids):
        assert_same_beams(final[rid], beam_search_reference(model, p, params, engine.eos))
    for p, rid in zip(greedy_prompts, ids[2:]):
        x = torch.tensor([p])
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=14, min_new_tokens=14,
                              do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert final[rid].outputs[0].token_ids == want
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks
    engine.blocks.check()


def test_llm_beam_search_is_vllms_api(model_tok):
    model, tok = model_tok
    llm = LLM(model=model, tokenizer=tok, num_kv_blocks=128, block_size=8)
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    outs = llm.beam_search([{"prompt": "def add(a, b):"}, {"prompt_token_ids": [5, 6, 7]}, "x = "], params)
    assert len(outs) == 3 and all(len(o.sequences) == 2 for o in outs)
    prompt = tok("def add(a, b):").input_ids
    ref = beam_search_reference(model, prompt, params, llm.engine.eos)
    assert [s.tokens for s in outs[0].sequences] == [r.tokens for r in ref]      # prompt included, as vLLM's
    for out in outs:
        for s in out.sequences:
            assert s.text == tok.decode(s.tokens) and len(s.logprobs) == len(s.tokens) - len(out.sequences[0].tokens) \
                + len(out.sequences[0].logprobs)
        scores = [beam_score(len(s.tokens), s.tokens[-1], s.cum_logprob, llm.engine.eos, 1.0) for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
    assert outs[1].sequences[0].tokens[:3] == [5, 6, 7]


def test_bad_beam_params_abort_and_streaming(model_tok):
    model, tok = model_tok
    for bad, field in [(dict(beam_width=0, max_tokens=4), "beam_width"),
                       (dict(beam_width=2, max_tokens=0), "max_tokens"),
                       (dict(beam_width=2, max_tokens=4, temperature=0.7), "temperature"),
                       (dict(beam_width=1.5, max_tokens=4), "beam_width")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**bad)
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=16, max_num_seqs=4)
    with pytest.raises(ValueError, match="beam_width"):
        engine.add_request([5, 6], BeamSearchParams(beam_width=5, max_tokens=4))      # more beams than seats
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request([5, 6], BeamSearchParams(beam_width=4, max_tokens=30))     # 4 x 8 blocks > 16
    with pytest.raises(ValueError, match="BeamSearchParams"):
        LLM(model=model, tokenizer=tok, num_kv_blocks=16).beam_search(["x"], SamplingParams())
    rid = engine.add_request([5, 6, 7], BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True))
    for _ in range(3):
        (out,) = engine.step()
        assert out.request_id == rid and not out.finished and len(out.outputs) == 3
        assert all(o.finish_reason is None for o in out.outputs)
    with pytest.raises(ValueError, match="already running"):
        engine.add_request([1], BeamSearchParams(beam_width=1, max_tokens=2), request_id=rid)
    engine.abort_request(rid)
    (out,) = engine.step()
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort"] * 3
    assert all(len(o.token_ids) == 3 for o in out.outputs)
    assert engine.blocks.num_free_blocks() == engine.blocks.num_blocks and not engine.has_unfinished_requests()
    engine.add_request([1], BeamSearchParams(beam_width=1, max_tokens=2), request_id=rid)   # the id is free again


def test_choose_ranks_candidates_and_sets_eos_aside():
    """`BeamGroup.choose` on hand-made candidates: EOS ones finish, the rest are ranked by score."""
    class Beam:       # what choose reads of an engine Sequence
        def __init__(self, seq_id, tokens, cum):
            self.seq_id, self.token_ids, self.cumulative_logprob, self.logprobs = seq_id, tokens, cum, []

        def __len__(self):
            return len(self.token_ids)

    g = BeamGroup(BeamSearchParams(beam_width=2, max_tokens=5), eos={0}, max_len=100)
    a, b = Beam(1, [7, 8, 9], -1.0), Beam(2, [7, 8, 4], -3.0)
    g.beams = [a, b]
    g.pending = {1: ([0, 5, 6, 2], [-0.1, -0.5, -3.0, -4.0]), 2: ([3, 0, 1, 2], [-0.2, -0.3, -2.0, -2.5])}
    assert g.ready()
    chosen = g.choose()
    assert [(p.seq_id, tok) for p, tok, *_ in chosen] == [(1, 5), (2, 3)]    # -1.5/4 beats -3.2/4, then -4/4
    assert [s.tokens for s in g.completed] == [[7, 8, 9, 0], [7, 8, 4, 0]]
    assert g.completed[0].cum_logprob == pytest.approx(-1.1) and g.completed[0].finish_reason == "stop"
    # the EOS is not counted in the length: -1.1 / 3
    assert beam_score(4, 0, -1.1, {0}, 1.0) == pytest.approx(-1.1 / 3)
    assert beam_score(4, 5, -1.1, {0}, 0.0) == pytest.approx(-1.1)


def test_scheduler_random_walk_with_beam_groups():
    """Beam searches (random candidates, EOS included) among plain requests in small random caches: the
    budgets hold, every scheduled token has a slot, blocks stay consistent, and everything drains."""
    import random

    from llmopt.serving import BlockManager, Scheduler, Sequence

    rng = random.Random(11)
    for trial in range(30):
        bm = BlockManager(rng.randint(6, 20), rng.choice([2, 4]), enable_prefix_caching=rng.random() < 0.7)
        sched = Scheduler(bm, max_num_seqs=rng.randint(2, 8), max_num_batched_tokens=rng.randint(1, 48),
                          chunked_prefill=rng.random() < 0.8)
        for _ in range(rng.randint(2, 12)):
            n = rng.randint(1, 12)
            ids = [rng.randrange(1, 4) for _ in range(n)]     # few distinct tokens: prefix hits between beams
            width, max_tokens = rng.randint(1, sched.max_num_seqs), rng.randint(1, 10)
            if n > sched.max_num_batched_tokens and not sched.chunked_prefill:
                continue
            if rng.random() < 0.5 and width * -(-(n + max_tokens) // bm.block_size) <= bm.num_blocks:
                seq = Sequence(ids, SamplingParams(n=width, temperature=0, max_tokens=max_tokens))
                seq.beam = BeamGroup(BeamSearchParams(beam_width=width, max_tokens=max_tokens), {0}, n + max_tokens)
                seq.beam.beams = [seq]
            else:
                seq = Sequence(ids, SamplingParams(max_tokens=5))
            sched.add(seq)
        for _ in range(2000):
            if not sched.has_unfinished():
                break
            batch = sched.schedule()
            assert sum(n for _, n in batch) <= sched.max_num_batched_tokens and sched.seats() <= sched.max_num_seqs
            assert len({s.seq_id for s, _ in batch}) == len(batch)
            ready = []
            for seq, n in batch:
                assert seq.status.name == "RUNNING"
                assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + n
                seq.num_computed_tokens += n
                if seq.num_computed_tokens == len(seq):
                    ready.append(seq)
            for seq in ready:
                if seq.beam is None:
                    seq.token_ids.append(1)
                    if seq.num_completion_tokens >= 5:
                        sched.finish(seq)
                    continue
                g = seq.beam
                toks = rng.sample(range(8), 2 * g.params.beam_width if 2 * g.params.beam_width <= 8 else 8)
                g.pending[seq.seq_id] = (toks, sorted((-rng.random() * 3 for _ in toks), reverse=True))
                if g.ready():
                    g.advance(sched)
                    assert len(g.beams) <= g.params.beam_width
            bm.check()
        assert not sched.has_unfinished(), f"trial {trial} did not drain"
        assert bm.num_free_blocks() == bm.num_blocks


def test_beams_through_the_graph_replay_path_with_a_stand_in_graph(model_tok, monkeypatch):
    """Beams decode through the CUDA-graph path (static inputs, padded batch sizes: 3 beams + 1 greedy
    request run in the graph of 4, then 3 in the graph of 4 padded) on a CPU, with stand-in graphs."""
    from test_serving_engine import _StandInGraph

    from llmopt.serving.runner import ModelRunner

    model, tok = model_tok
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(ModelRunner, "_record", staticmethod(_StandInGraph.record))
    engine = LLMEngine(model, tok, block_size=4, num_kv_blocks=128, max_num_seqs=5, enforce_eager=True,
                       max_model_len=128)
    engine.runner.capture_cuda_graphs(5)
    replays = []
    for size, (g, *_) in engine.runner.graphs.items():
        real = g.replay
        g.replay = lambda real=real, size=size: (replays.append(size), real())
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    rid = engine.add_request([5, 6, 7, 8, 9], params)
    other = engine.add_request([9, 8, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    final = engine.run()
    assert_same_beams(final[rid], beam_search_reference(model, [5, 6, 7, 8, 9], params, engine.eos))
    assert len(final[other].outputs[0].token_ids) == 4
    assert {4} <= set(replays)
    engine.blocks.check()


@pytest.mark.gpu
def test_gpu_beam_search_with_cuda_graphs_equals_the_reference():
    import llmopt

    model, tok = llmopt.load("tinypy", device="cuda", dtype=torch.float32)
    model.eval()
    engine = LLMEngine(model, tok, block_size=16, num_kv_blocks=256, max_num_seqs=8)
    assert engine.runner.graphs
    params = BeamSearchParams(beam_width=4, max_tokens=16, length_penalty=0.7)
    engine.eos = {tok("\n").input_ids[-1]}
    outs = run(engine, PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert_same_beams(out, beam_search_reference(model, prompt, params, engine.eos))
