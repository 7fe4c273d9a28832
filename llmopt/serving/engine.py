"""`LLMEngine` (the step-wise API) and `LLM` (the offline API), with vLLM's names and fields.

    from llmopt.serving import LLM, SamplingParams     # or: from vllm import LLM, SamplingParams
    llm = LLM(model="tinypy")
    for out in llm.generate(["def add(a, b):"], SamplingParams(max_tokens=50, temperature=0)):
        print(out.prompt, out.outputs[0].text)

One engine step = schedule -> copy-on-write copies -> one forward over the batch -> sample one
token for every sequence that reached its last token -> check stop conditions -> free the blocks
of finished sequences. `step()` returns a `RequestOutput` for each request that got a new token,
so a caller can stream.

A request for `n` completions (`SamplingParams(n=...)`, parallel sampling) runs its prompt once; at
its first token it is forked into n sequences that share the prompt's KV blocks (copy-on-write, as
in the PagedAttention paper), each sampling with its own generator (seed + index, as vLLM seeds
them). Its `RequestOutput` carries the n completions, and is finished when all n are.

With `num_scheduler_steps=k` (vLLM's multi-step scheduling) a step whose batch is all greedy decode
runs up to k forwards on the device, each feeding its token to the next, and the host takes the k
tokens in one go: the host's per-token work (above) is paid once per k tokens, and on a GPU the k
CUDA-graph replays run back to back. The tokens are the same as k single steps'.

A request with `BeamSearchParams` is a beam search (`beam.py`): its beams are sequences that share
blocks, forked and freed as the search goes, and its output lists the best beams. With
`speculative_config` decodes run n-gram or draft-model guesses beside their last token and keep the
ones the model agrees with (greedy), or that speculative sampling's rule accepts (sampled)
(`speculative.py`).
The planning of those three lives beside them (`steps_ahead`, `beam_step`, `propose`/`verify_batch`);
the engine calls them from its step.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .beam import BeamGroup, BeamSearchParams, beam_step
from .block_manager import BlockManager
from .multistep import steps_ahead
from .outputs import CompletionOutput, RequestOutput
from .runner import ModelRunner, cache_dtype, kv_bytes_per_token
from .sampling import SamplingParams, as_int, as_list, prompt_logprobs, sample
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .speculative import DraftModel, SpeculativeConfig, propose, verify_batch

STEP_HISTORY = 100_000


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0          # prompt tokens of admitted requests (recomputes not counted)
    computed_tokens: int = 0        # tokens run through the model, prefill and decode
    cached_tokens: int = 0          # tokens whose K/V came from the prefix cache at admission
    generated_tokens: int = 0
    preemptions: int = 0
    copied_blocks: int = 0          # copy-on-write block copies (forked sequences writing a shared block)
    spec_proposed: int = 0          # speculative decoding: tokens guessed, and of them accepted
    spec_accepted: int = 0
    # per step, for the last STEP_HISTORY steps (a server steps for days; the totals count every step)
    kv_used_slots: deque = field(default_factory=lambda: deque(maxlen=STEP_HISTORY))       # tokens in the cache
    kv_reserved_slots: deque = field(default_factory=lambda: deque(maxlen=STEP_HISTORY))   # slots of blocks held
    kv_used_total: int = 0
    kv_reserved_total: int = 0
    kv_reserved_peak: int = 0


class LLMEngine:
    def __init__(self, model, tokenizer, *, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 chunked_prefill: bool = True, backend: str = "auto", enforce_eager: bool = False, seed: int = 0,
                 num_scheduler_steps: int = 1, speculative_config: dict | SpeculativeConfig | None = None,
                 kv_cache_dtype: str = "auto", compilation_config: int | dict | None = None):
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs), ("num_scheduler_steps",
                        num_scheduler_steps), ("max_num_batched_tokens", max_num_batched_tokens)):
            if v < 1:   # checked before the KV budget below divides by block_size
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        self.spec = SpeculativeConfig.of(speculative_config)
        if self.spec is not None and num_scheduler_steps > 1:
            raise ValueError("speculative_config and num_scheduler_steps > 1 do not combine: choose one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.draft = DraftModel(self.spec.model, model) if self.spec and self.spec.method == "draft_model" else None
        self.num_scheduler_steps = num_scheduler_steps
        cfg = model.config
        self.max_model_len = max_model_len or getattr(cfg, "max_position_embeddings", 2048)
        dtype = next(model.parameters()).dtype
        kv_dtype = cache_dtype(kv_cache_dtype, dtype if dtype.is_floating_point else torch.float32)
        if num_kv_blocks is None:   # an FP8 cache ("fp8") holds 2-4x the tokens in the same memory
            per_block = kv_bytes_per_token(cfg, kv_dtype) * block_size
            budget = kv_cache_memory or _default_kv_memory(model, max_num_seqs * self.max_model_len * per_block
                                                           // block_size)
            num_kv_blocks = max(1, budget // per_block)
        self.blocks = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, chunked_prefill)
        # on a GPU the runner records its decode steps as CUDA graphs, unless enforce_eager (vLLM's name)
        self.runner = ModelRunner(model, num_kv_blocks, block_size, backend, max_num_seqs, self.max_model_len,
                                  enforce_eager, num_scheduler_steps, kv_cache_dtype, compilation_config)
        self.eos = _eos_ids(model, tokenizer)
        self.seed = seed
        self.stats = EngineStats()
        self.requests: dict[str, list[Sequence]] = {}   # not yet reported finished: their sequences, by index
        self._pending: list[str] = []   # requests that ended outside a step (abort, cannot fit): next step reports
        self._generators: dict[int, torch.Generator | None] = {}

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt, params: SamplingParams | BeamSearchParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request: a string, a list of token ids, or vLLM's {"prompt": ...} /
        {"prompt_token_ids": [...]} dict. Returns its request id. With `BeamSearchParams` it is a
        beam search: its beams run as greedy sequences, one seat each. vLLM's order,
        `add_request(request_id, prompt, params)`, works too."""
        if isinstance(params, (str, list, dict)) and (request_id is None or isinstance(
                request_id, (SamplingParams, BeamSearchParams))):
            prompt, params, request_id = params, request_id, prompt     # vLLM's LLMEngine.add_request order
        params, beam = params or SamplingParams(), None
        if isinstance(params, BeamSearchParams):
            beam, params = params, SamplingParams(n=params.beam_width, temperature=0, max_tokens=params.max_tokens,
                                                  ignore_eos=params.ignore_eos)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams or BeamSearchParams, "
                             f"got {type(params).__name__}")
        text, ids = _prompt_ids(prompt, self.tokenizer)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        if not ids or text == "":
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context (max_model_len) is "
                             f"{self.max_model_len}, leaving no room to generate")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"{'beam_width' if beam else 'n'} ({params.n}) exceeds max_num_seqs "
                             f"({self.scheduler.max_num_seqs}): the {params.n} sequences run side by side")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt_token_ids must lie in [0, {vocab}), got {min(ids)}..{max(ids)}")
        for name, toks in (("logit_bias", params.logit_bias or ()),
                           ("allowed_token_ids", params.allowed_token_ids or ())):
            if any(not 0 <= t < vocab for t in toks):
                raise ValueError(f"{name} token ids must lie in [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                raise ValueError(f"{name} ({getattr(params, name)}) exceeds the vocabulary ({vocab} tokens)")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words needs a tokenizer")
            params.update_from_tokenizer(self.tokenizer)
        params.update_from_eos(self.eos)   # min_tokens holds them back
        seq = Sequence(ids, params, request_id, prompt=text)
        if seq.request_id in self.requests and not self._finished(seq.request_id):
            raise ValueError(f"request_id {seq.request_id!r} is already running")
        if beam is not None:
            seq.beam = BeamGroup.for_request(seq, beam, self.eos, self.max_model_len, self.blocks)
        self._seed(seq)
        self.scheduler.add(seq)
        self.requests[seq.request_id] = [seq]
        self.stats.prompt_tokens += len(ids)
        return seq.request_id

    def _seed(self, seq: Sequence) -> None:
        """A sampled sequence's own generator: its request's seed + its index (vLLM's seeding of the n
        completions), or without a seed one from the engine's seed and the sequence id."""
        p = seq.params
        if not p.greedy:
            g = torch.Generator()
            g.manual_seed(p.seed + seq.index if p.seed is not None else self.seed * 1_000_003 + seq.seq_id)
            self._generators[seq.seq_id] = g

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After its prompt's last token: the n - 1 more sequences of a request for n completions,
        holding the parent's blocks (no K/V is copied until one of them writes into a shared block)."""
        n, children = parent.params.n, []
        for index in range(n - parent.forks_pending, n):
            child = Sequence(parent.token_ids, parent.params, parent.request_id, prompt=parent.prompt)
            child.index, child.arrival_time = index, parent.arrival_time
            child.prompt_logprobs = list(parent.prompt_logprobs)   # the prompt they share, scored once
            self.scheduler.fork(parent, child)
            self._seed(child)
            self.requests[parent.request_id].append(child)
            children.append(child)
        return children

    def _finished(self, request_id: str) -> bool:
        seqs = self.requests[request_id]
        return seqs[0].beam.done if seqs[0].beam is not None else all(s.is_finished for s in seqs)

    def abort_request(self, request_id) -> None:
        """Abort a request (or, as vLLM's, an iterable of request ids): its blocks are freed now, and the
        next step reports it finished with finish_reason "abort"."""
        if not isinstance(request_id, str):
            for rid in list(request_id):
                self.abort_request(rid)
            return
        if request_id in self.requests and self.requests[request_id][0].beam is not None:
            return self._finish(self.requests[request_id][0], "abort")
        for seq in self.requests.get(request_id, []):
            if not seq.is_finished:
                self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        """Requests still running or queued, or finished ones (aborted) whose output is not yet reported."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ------------------------------------------------------------------ one step

    def step(self, detokenize: bool = True) -> list[RequestOutput]:
        """Run one step; a `RequestOutput` for each request that got a token (its text only with
        `detokenize` or when finished)."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:
                # nothing runs and the head of the queue cannot get blocks: it can never run
                self._finish(self.scheduler.waiting[0], "error", "does not fit in the KV cache")
            return self._flush([])
        for seq, _ in batch:
            if seq.copies:
                self.runner.copy_blocks(seq.copies)
                self.stats.copied_blocks += len(seq.copies)
                seq.copies = []
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.cached_tokens = self.scheduler.num_cached_tokens
        done = [seq.num_computed_tokens + n == len(seq) for seq, n in batch]
        k = steps_ahead(batch, done, self.num_scheduler_steps, self.scheduler, self.max_model_len)
        if k > 1:
            return self._flush(self._multi_step(batch, k), detokenize)
        every = [seq.wants_prompt_logprobs for seq, _ in batch]
        guesses = {}
        if self.spec is not None:
            budget = self.scheduler.max_num_batched_tokens - sum(n for _, n in batch)
            guesses = propose(batch, self.spec, self.blocks, budget, self.max_model_len, self.draft)
        if guesses:   # each guessed token runs beside its sequence's last one, every position's logits kept
            batch = [(seq, n + len(guesses[seq.seq_id][1]) if seq.seq_id in guesses else n) for seq, n in batch]
            every = [e or seq.seq_id in guesses for e, (seq, _) in zip(every, batch)]
        logits = self.runner.forward(batch, done, every if any(every) else None)
        if guesses:
            logits, every, accepted = verify_batch(batch, done, every, logits, guesses, self._generators)
            self.stats.spec_proposed += sum(len(guess) for _, guess in guesses.values())
            self.stats.spec_accepted += sum(len(a[2]) for a in accepted.values())
        if any(every):
            logits = prompt_logprobs(batch, done, every, logits, self._named)
        self.stats.steps += 1
        self.stats.computed_tokens += sum(n for _, n in batch)
        for seq, n in batch:
            seq.num_computed_tokens += n
        ready = [seq for (seq, _), d in zip(batch, done) if d]
        touched = []
        if guesses:
            touched += self._accept(accepted)
            # a stop among the accepted tokens: no next token; a sampled sequence drew its own already
            keep = [i for i, seq in enumerate(ready) if not seq.is_finished
                    and (seq.seq_id not in accepted or accepted[seq.seq_id][4] is None)]
            if len(keep) < len(ready):
                ready, logits = [ready[i] for i in keep], logits[keep]
        if any(seq.beam is not None for seq in ready):   # beams rank candidates instead of sampling
            rows = [i for i, seq in enumerate(ready) if seq.beam is not None]
            stepped, new_tokens = beam_step([ready[i] for i in rows], logits[rows], self.scheduler)
            touched += stepped
            self.stats.generated_tokens += new_tokens
            rows = [i for i, seq in enumerate(ready) if seq.beam is None]
            ready, logits = [ready[i] for i in rows], logits[rows]
        if ready:
            seqs, rows = [], []   # a forked request's n sequences all sample from its row of logits
            for i, seq in enumerate(ready):
                for s in [seq] + (self._fork(seq) if seq.forks_pending else []):
                    seqs.append(s)
                    rows.append(i)
            if len(seqs) > len(ready):
                logits = logits[rows]
            histories = [(s.token_ids, s.num_prompt_tokens) for s in seqs]
            tokens, chosen, tops = sample(logits, [s.params for s in seqs],
                                          [self._generators.get(s.seq_id) for s in seqs], histories)
            for i, seq in enumerate(seqs):
                try:
                    if tokens[i] < 0:
                        raise ValueError("no token left to sample: every logit is masked or not a number")
                    self._append(seq, int(tokens[i]), float(chosen[i]), tops[i])
                except Exception as e:  # one bad request must not stop the batch
                    self._finish(seq, "error", f"{type(e).__name__}: {e}", report=False)
                touched.append(seq.request_id)
        self._record_kv_use()
        return self._flush(touched, detokenize)

    # ------------------------------------------------------------------ speculative decoding

    def _accept(self, accepted) -> list[str]:
        """Take back the guesses, then append the accepted ones as decoded tokens (their K/V are already
        in the cache; stop conditions apply to each), and a sampled sequence's drawn next token. The
        rejected ones' slots are written again later."""
        for seq, length, tokens, lps, drawn in accepted.values():
            del seq.token_ids[length:]
            seq.num_computed_tokens = length
            for token, lp in zip(tokens, lps):
                self._append(seq, token, lp, None)
                if seq.is_finished:
                    break
                self.blocks.may_append(seq)
                seq.num_computed_tokens += 1
            if drawn is not None and not seq.is_finished:
                self._append(seq, *drawn, None)
        return [seq.request_id for seq, *_ in accepted.values()]

    # ------------------------------------------------------------------ multi-step decoding

    def _multi_step(self, batch, k: int) -> list[str]:
        """Run k decode steps on the device, then take their tokens in order as k single steps would:
        a sequence that stops at step j keeps j tokens, and the rest of its run is dropped (its K/V
        went into its own blocks, freed with it). Returns the requests that got tokens."""
        seqs = [seq for seq, _ in batch]
        for seq in seqs:
            self.blocks.reserve(seq, k)
        tokens, logprobs = self.runner.decode_steps(seqs, k)
        self.stats.steps += k
        self.stats.computed_tokens += k * len(seqs)
        for i, seq in enumerate(seqs):
            seq.num_computed_tokens += 1
            for j in range(k):
                try:
                    self._append(seq, tokens[j][i], logprobs[j][i], None)
                except Exception as e:  # one bad request must not stop the batch
                    self._finish(seq, "error", f"{type(e).__name__}: {e}", report=False)
                if seq.is_finished or j == k - 1:
                    break
                self.blocks.may_append(seq)    # the token's block is reserved: this records its tokens
                seq.num_computed_tokens += 1
        self._record_kv_use()
        return [seq.request_id for seq in seqs]

    def _record_kv_use(self) -> None:
        st = self.stats
        used = sum(s.num_computed_tokens for s in self.scheduler.running)
        reserved = sum(len(s.block_table) for s in self.scheduler.running) * self.blocks.block_size
        st.kv_used_slots.append(used)
        st.kv_reserved_slots.append(reserved)
        st.kv_used_total, st.kv_reserved_total = st.kv_used_total + used, st.kv_reserved_total + reserved
        st.kv_reserved_peak = max(st.kv_reserved_peak, reserved)

    def _flush(self, request_ids: list[str], detokenize: bool = True) -> list[RequestOutput]:
        """One output per request: those that ended outside a step (with their text), then `request_ids`."""
        pending, self._pending = self._pending, []
        outputs = [self._output(rid, detokenize or rid in pending) for rid in dict.fromkeys(pending + request_ids)]
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)   # reported once: the engine keeps no finished requests
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float, top: dict | None) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if top is not None:
            seq.logprobs.append(self._named(top))
        self.stats.generated_tokens += 1
        p = seq.params
        n_out = seq.num_completion_tokens
        if p.stop:   # text is needed now only to look for stop strings; otherwise `_output` makes it
            seq.text = self._decode(seq.completion_token_ids, p)
        if n_out >= p.min_tokens:
            by_eos = token in self.eos and not p.ignore_eos   # (p.all_stop_token_ids, without a set a token)
            if by_eos or token in p.stop_token_ids:   # EOS (stop_reason None) or one of stop_token_ids
                if p.stop and not p.include_stop_str_in_output:
                    seq.text = self._decode(seq.completion_token_ids[:-1], p)
                return self._finish(seq, "stop", None if by_eos else token)
            for s in p.stop:
                at = seq.text.find(s)
                if at >= 0:
                    seq.text = seq.text[:at + (len(s) if p.include_stop_str_in_output else 0)]
                    return self._finish(seq, "stop", s)
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _named(self, top: dict) -> dict:
        """Log-probabilities with their tokens' text (vLLM's `Logprob.decoded_token`)."""
        if self.tokenizer is not None:
            for t, lp in top.items():
                lp.decoded_token = self.tokenizer.decode([t])
        return top

    def _decode(self, ids: list[int], p: SamplingParams) -> str:
        if self.tokenizer is None or not p.detokenize:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)

    def _finish(self, seq: Sequence, reason: str, stop_reason=None, report: bool | None = None) -> None:
        if seq.beam is not None:   # aborted or failed: the whole search ends
            if not seq.beam.done:
                seq.beam.end(self.scheduler, reason, stop_reason if reason == "error" else None)
                self._pending.append(seq.request_id)
            return
        seq.finish_reason = reason
        if reason == "error":
            seq.error = stop_reason
        else:
            seq.stop_reason = stop_reason
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        self._generators.pop(seq.seq_id, None)
        if self.draft is not None:
            self.draft.caches.pop(seq.seq_id, None)
        if report or (report is None and reason in ("abort", "error")):
            self._pending.append(seq.request_id)

    def _output(self, request_id: str, text: bool = True) -> RequestOutput:
        """The request's output: a completion per sequence (one, or n once forked); finished when all are."""
        seqs, comps = self.requests[request_id], []
        if seqs[0].beam is not None:
            return self._beam_output(request_id, seqs[0], text)
        for seq in seqs:
            done = seq.status == SequenceStatus.FINISHED
            if (text or done) and not seq.params.stop:
                seq.text = self._decode(_text_ids(seq), seq.params)
            comps.append(CompletionOutput(seq.index, seq.text, seq.completion_token_ids, seq.cumulative_logprob,
                                          list(seq.logprobs) if seq.params.logprobs is not None else None,
                                          seq.finish_reason if done else None, seq.stop_reason if done else None))
        first, done = seqs[0], all(s.is_finished for s in seqs)
        starts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        metrics = _metrics(first, min(starts, default=None), max(s.finish_time for s in seqs) if done else None,
                           sum(s.num_preemptions for s in seqs))
        return RequestOutput(request_id, first.prompt, first.token_ids[:first.num_prompt_tokens], comps, done,
                             metrics, next((s.error for s in seqs if s.error), None),
                             list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None,
                             first.num_prefix_hits)

    def _beam_output(self, request_id: str, root: Sequence, text: bool) -> RequestOutput:
        """A beam search's output: its best beams, best first (the finished and live ones while it runs)."""
        g, comps = root.beam, []
        for i, b in enumerate(g.best()):
            ids = b.tokens[root.num_prompt_tokens:]
            b.text = self._decode(ids, root.params) if text or g.done else ""
            comps.append(CompletionOutput(i, b.text, ids, b.cum_logprob, b.logprobs, b.finish_reason))
        metrics = _metrics(root, root.first_token_time, g.finish_time, g.num_preemptions)
        return RequestOutput(request_id, root.prompt, root.token_ids[:root.num_prompt_tokens], comps, g.done, metrics,
                             g.error, num_cached_tokens=root.num_prefix_hits)

    def run(self, use_tqdm: bool = False) -> dict[str, RequestOutput]:
        """Step until every queued request is finished; the final output of each, by request id."""
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.requests), desc="requests")
        while self.has_unfinished_requests():
            for out in self.step(detokenize=False):
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return final

    def kv_waste(self) -> float:
        """Share of the reserved KV slots that held no token, over all steps so far."""
        reserved = self.stats.kv_reserved_total
        return 1 - self.stats.kv_used_total / reserved if reserved else 0.0


def _metrics(first: Sequence, first_token_time, finished_time, num_preemptions: int) -> dict:
    return {"arrival_time": first.arrival_time, "first_token_time": first_token_time, "finished_time": finished_time,
            "num_preemptions": num_preemptions, "num_cached_tokens": first.num_prefix_hits}


def _default_kv_memory(model, wanted: int) -> int:
    """A GPU: 90% of its free memory (vLLM's gpu_memory_utilization); elsewhere what was asked for
    (max_num_seqs full contexts), at most 1 GiB."""
    p = next(model.parameters())
    if p.is_cuda:
        free, _ = torch.cuda.mem_get_info(p.device)
        return int(free * 0.9)
    return min(wanted, 1 << 30)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def _text_ids(seq: Sequence) -> list[int]:
    """The completion tokens its text shows: as vLLM, not the token that ended it (EOS or one of
    `stop_token_ids`) unless `include_stop_str_in_output`."""
    ids = seq.completion_token_ids
    by_token = seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
    return ids[:-1] if by_token and ids and not seq.params.include_stop_str_in_output else ids


def _prompt_ids(prompt, tokenizer) -> tuple[str | None, list[int]]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), as_list("prompt_token_ids", prompt["prompt_token_ids"], as_int)
        prompt = prompt.get("prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
        return prompt, tokenizer(prompt).input_ids
    if isinstance(prompt, (list, tuple)):
        return None, as_list("prompt_token_ids", prompt, as_int)
    raise ValueError(f"prompt must be a string, a list of token ids or a dict with 'prompt' or "
                     f"'prompt_token_ids', got {type(prompt).__name__}")


def generate_fn(engine: LLMEngine):
    """`fn(input_ids (B, P), n)` that runs the rows as B greedy requests of exactly n tokens through
    `engine`: the engine timed by `llmopt.bench.generation`, the same harness as HF `generate`."""
    def fn(input_ids, max_new_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True)
        ids = [engine.add_request(row.tolist(), params) for row in input_ids]
        final = engine.run()
        return [final[i].outputs[0].token_ids for i in ids]
    return fn
