"""Beam search with vLLM's names (`BeamSearchParams`, `LLM.beam_search`, `BeamSearchOutput`), its
beams sharing KV blocks in the paged cache.

Greedy decoding keeps one continuation; beam search keeps the `beam_width` most likely ones. At each
step every live beam proposes its 2 * beam_width most likely next tokens (as HF `generate` and vLLM
do), each candidate scored by its summed log-probability over its length ** length_penalty (the
prompt counted, a final EOS not); the best beam_width candidates that do not end in EOS go on, and
each one that does is set aside as finished. After max_tokens steps the best beam_width of the
finished and the live beams are the answer.

Beams are where a paged cache pays twice (the PagedAttention paper's example): beams of one request
share their prompt and most of their past, so in the engine they are sequences that share blocks.
A beam chosen for two continuations is forked (`Scheduler.fork`: every block gains a reference,
nothing is copied), a beam no candidate continues is freed at once, and only the last, partly
filled block, the one the two continuations write differently, is copied on write. The beams of a
request advance together: a beam whose candidates are ready waits (it is scheduled for nothing)
until the others' are, and the scheduler preempts and re-admits a request's beams as one.
vLLM itself now runs beam search outside its engine, as one-token requests that find the beams'
common blocks in its prefix cache: `beam_search_by_requests` does that over our engine, with the
same results and more tokens computed (lesson 09 measures both).

`beam_search_reference` is the spec: the whole model run on every beam's tokens at each step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, as_int, as_number, top_logprobs
from .sequence import Sequence


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters (`vllm.sampling_params.BeamSearchParams`)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False   # vLLM's field; beam search has no stop strings

    def __post_init__(self):
        self.beam_width = as_int("beam_width", self.beam_width)
        self.max_tokens = as_int("max_tokens", self.max_tokens)
        self.length_penalty = as_number("length_penalty", self.length_penalty)
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be an int >= 1, got {self.beam_width!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.temperature != 0:
            raise ValueError(f"temperature must be 0: llmopt's beam search ranks the model's own log-probabilities "
                             f"(deterministic), got {self.temperature!r}")


@dataclass
class BeamSearchSequence:
    """One beam as vLLM returns it: `tokens` holds the prompt and the completion."""
    tokens: list[int]
    logprobs: list[dict] = field(default_factory=list)   # per generated token: {candidate token: log-probability}
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None    # "stop" (ended in EOS), "length" or "abort"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]   # the best beam_width, best first


def beam_score(length: int, last_token: int, cum_logprob: float, eos: set[int], length_penalty: float) -> float:
    """vLLM's and HF's ranking: the summed log-probability over the length (prompt included, a final
    EOS not) to the power length_penalty."""
    if last_token in eos:
        length -= 1
    return cum_logprob / length ** length_penalty


class BeamGroup:
    """One beam-search request between engine steps: its live beams (engine `Sequence`s, best first),
    each beam's candidates once its logits are in, and the beams already finished."""

    def __init__(self, params: BeamSearchParams, eos: set[int], max_len: int):
        self.params, self.eos, self.max_len = params, eos, max_len   # max_len: prompt + completion, at most
        self.beams: list = []
        self.pending: dict[int, tuple[list[int], list[float]]] = {}   # seq_id -> (top tokens, their log-probs)
        self.completed: list[BeamSearchSequence] = []
        self.done = False
        self.request_id: str | None = None
        self.error: str | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0        # beams preempted (a group is preempted all at once)

    @classmethod
    def for_request(cls, seq: Sequence, params: BeamSearchParams, eos: set[int], max_model_len: int,
                    blocks) -> BeamGroup:
        """The group of a new request whose prompt is `seq`; refused when its beams might not fit in the
        cache by themselves (beam_width x the blocks of prompt + max_tokens), so a group can always run."""
        max_len = min(len(seq) + params.max_tokens, max_model_len)
        need = params.beam_width * -(-max_len // blocks.block_size)
        if need > blocks.num_blocks:
            raise ValueError(f"beam search with beam_width {params.beam_width} to {max_len} tokens may need {need} "
                             f"KV blocks; the cache has {blocks.num_blocks}")
        group = cls(params, eos, max_len)
        group.request_id, group.beams = seq.request_id, [seq]
        return group

    def ready(self) -> bool:
        """Every live beam has its candidates: the group can take its step."""
        return all(b.seq_id in self.pending for b in self.beams)

    def score(self, s: BeamSearchSequence) -> float:
        return beam_score(len(s.tokens), s.tokens[-1], s.cum_logprob, self.eos, self.params.length_penalty)

    def choose(self) -> list[tuple]:
        """The next beams as (parent beam, token, its log-probability, the parent's candidates), best
        first; candidates ending in EOS go to `completed` instead. Candidates are taken beam by beam,
        best token first, and sorted stably: ties keep that order (as vLLM's sort does)."""
        p, cands = self.params, []
        for b in self.beams:
            ids, lps = self.pending.pop(b.seq_id)
            top = top_logprobs(ids, lps)
            for tok, lp in zip(ids, lps):
                cum = b.cumulative_logprob + lp
                if tok in self.eos and not p.ignore_eos:
                    self.completed.append(BeamSearchSequence(b.token_ids + [tok], b.logprobs + [top], cum,
                                                             finish_reason="stop"))
                else:
                    score = beam_score(len(b) + 1, tok, cum, self.eos, p.length_penalty)
                    cands.append((score, b, tok, lp, top))
        cands.sort(key=lambda c: c[0], reverse=True)
        return [c[1:] for c in cands[:p.beam_width]]

    def advance(self, scheduler) -> int:
        """One step of the search, once `ready`: the beams no candidate continues are freed first (their
        blocks may then spare a copy), a beam chosen twice or more is forked (blocks shared, copied on
        write when written), and each new beam takes its token. Returns the number of new tokens."""
        chosen = self.choose()
        parents = {parent.seq_id for parent, *_ in chosen}
        for b in self.beams:
            if b.seq_id not in parents:
                scheduler.finish(b)
        beams, taken = [], set()
        for parent, *_ in chosen:   # forks first, from parents that have not taken their token yet
            if parent.seq_id in taken:
                beams.append(self._fork(parent, scheduler))
            else:
                taken.add(parent.seq_id)
                beams.append(parent)
        now = time.perf_counter()
        for seq, (_, token, logprob, top) in zip(beams, chosen):
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            seq.logprobs.append(top)
            seq.first_token_time = seq.first_token_time or now
            seq.forks_pending = 0            # seats: one per beam from now on, beam_width in all
        self.beams = beams
        if not beams or beams[0].num_completion_tokens >= self.params.max_tokens or len(beams[0]) >= self.max_len:
            self.end(scheduler, "length")
        return len(beams)

    def _fork(self, parent: Sequence, scheduler) -> Sequence:
        child = Sequence(parent.token_ids, parent.params, parent.request_id, prompt=parent.prompt)
        child.num_prompt_tokens, child.beam = parent.num_prompt_tokens, self
        child.arrival_time, child.first_token_time = parent.arrival_time, parent.first_token_time
        child.cumulative_logprob, child.logprobs = parent.cumulative_logprob, list(parent.logprobs)
        parent.forks_pending = max(parent.forks_pending, 1)   # the seat of a beam freed in this step
        scheduler.fork(parent, child)
        return child

    def end(self, scheduler, reason: str, error: str | None = None) -> None:
        """The search is over (or aborted, or failed): the live beams join the finished ones, blocks freed."""
        self.finish_time = time.perf_counter()
        for b in self.beams:
            self.completed.append(self.snapshot(b, reason))
            b.finish_time = self.finish_time
            scheduler.finish(b)
        self.beams, self.pending, self.done, self.error = [], {}, True, error

    def snapshot(self, seq, reason: str | None) -> BeamSearchSequence:
        return BeamSearchSequence(list(seq.token_ids), list(seq.logprobs), seq.cumulative_logprob, finish_reason=reason)

    def best_final(self) -> list[BeamSearchSequence]:
        """The answer once the search stops: the live beams count as finished by length."""
        self.completed += [self.snapshot(b, "length") for b in self.beams]
        self.beams = []
        return self.best()

    def best(self) -> list[BeamSearchSequence]:
        """The answer so far: the best beam_width of the finished beams and, while running, the live ones."""
        live = [self.snapshot(b, None) for b in self.beams]
        return sorted(self.completed + live, key=self.score, reverse=True)[:self.params.beam_width]


def beam_step(seqs: list[Sequence], logits: torch.Tensor, scheduler) -> tuple[list[str], int]:
    """In an engine step, the beams whose logits (rows of `logits`) are in: keep each one's 2 * beam_width
    best tokens (one log-softmax, top-k and transfer for all), then advance every group whose beams
    are all in. Returns those groups' request ids and the number of tokens they added."""
    k = min(2 * max(s.beam.params.beam_width for s in seqs), logits.shape[-1])
    values, ids = torch.log_softmax(logits.float(), -1).topk(k)
    both = torch.stack([ids.double(), values.double()]).cpu()   # token ids are exact in float64
    ids, values = both[0].long().tolist(), both[1].tolist()
    groups = []
    for i, seq in enumerate(seqs):
        g, kk = seq.beam, 2 * seq.beam.params.beam_width
        g.pending[seq.seq_id] = (ids[i][:kk], values[i][:kk])
        if g not in groups:
            groups.append(g)
    stepped = [g for g in groups if g.ready()]
    new_tokens = sum(g.advance(scheduler) for g in stepped)
    return [g.request_id for g in stepped], new_tokens


def beam_search_by_requests(engine, prompt_ids: list[int], params: BeamSearchParams) -> list[BeamSearchSequence]:
    """The same search run as vLLM's V1 engine runs it, from outside the engine: at each step every live
    beam is a one-token greedy request asking for its 2 * beam_width best log-probabilities, and the
    engine's prefix cache finds the full blocks the beams share (their last, partial block is computed
    again). Same ranking as `BeamGroup.choose`; the engine's `stats` show the work."""
    g = BeamGroup(params, engine.eos, min(len(prompt_ids) + params.max_tokens, engine.max_model_len))
    one_token = SamplingParams(temperature=0, max_tokens=1, logprobs=2 * params.beam_width, ignore_eos=True)
    g.beams = [Sequence(prompt_ids, one_token)]   # beams as plain Sequences: never queued themselves
    while g.beams:
        ids = [engine.add_request(b.token_ids, one_token) for b in g.beams]
        final = engine.run()
        for b, rid in zip(g.beams, ids):
            top = final[rid].outputs[0].logprobs[0]
            g.pending[b.seq_id] = (list(top), list(top.values()))
        beams = []
        for parent, token, logprob, top in g.choose():
            beam = Sequence(parent.token_ids + [token], one_token)
            beam.cumulative_logprob, beam.logprobs = parent.cumulative_logprob + logprob, parent.logprobs + [top]
            beams.append(beam)
        g.beams = beams
        if beams and (len(beams[0]) - len(prompt_ids) >= params.max_tokens or len(beams[0]) >= g.max_len):
            break
    return g.best_final()


@torch.no_grad()
def beam_search_reference(model, prompt_ids: list[int], params: BeamSearchParams, eos: set[int],
                          max_len: int | None = None) -> list[BeamSearchSequence]:
    """The spec, slow on purpose: every step runs the whole model on every beam's tokens (no cache) and
    takes each beam's 2 * beam_width best tokens, as `BeamGroup.choose` does."""
    max_len = max_len or model.config.max_position_embeddings
    k = min(2 * params.beam_width, model.config.vocab_size)
    beams, completed = [BeamSearchSequence(list(prompt_ids))], []

    def score(s):
        return beam_score(len(s.tokens), s.tokens[-1], s.cum_logprob, eos, params.length_penalty)

    for _ in range(params.max_tokens):
        if not beams:
            break
        cands = []
        for b in beams:
            logits = model(torch.tensor([b.tokens])).logits[0, -1].float()
            values, ids = torch.log_softmax(logits, -1).topk(k)
            top = top_logprobs(ids.tolist(), values.tolist())
            for tok, lp in top.items():
                s = BeamSearchSequence(b.tokens + [tok], b.logprobs + [top], b.cum_logprob + lp)
                if tok in eos and not params.ignore_eos:
                    s.finish_reason = "stop"
                    completed.append(s)
                else:
                    cands.append(s)
        beams = sorted(cands, key=score, reverse=True)[:params.beam_width]
        if beams and len(beams[0].tokens) >= max_len:
            break
    for b in beams:
        b.finish_reason = "length"
    return sorted(completed + beams, key=score, reverse=True)[:params.beam_width]
