"""`Scheduler`: continuous batching over a paged KV cache (nano-vllm's and vLLM's name).

Every engine step the scheduler picks which tokens run through the model, under two budgets:
`max_num_seqs` sequences and `max_num_batched_tokens` tokens per step.

1. Running sequences first, in arrival order: a decoding sequence needs one token (and maybe a new
   KV block); a sequence in the middle of a chunked prefill needs its next chunk. When the cache has
   no block left for a decode, the most recently arrived running sequence is **preempted by
   recompute**: its blocks are freed, it goes back to the front of the waiting queue and later
   re-runs its prompt and the tokens it had generated as one prefill (prefix caching may find most
   of them still in the cache).
2. Then, if nothing was preempted, waiting sequences join while the budgets and the free blocks
   allow: **continuous batching**, a new request starts the step after one arrives, not when the
   whole batch is done. With `chunked_prefill`, a long prompt is split so that it never takes more
   than the step's remaining token budget, and decodes keep flowing while it is prefilled.

A sequence's blocks are freed the moment it finishes (`finish`). A request for n completions
(parallel sampling) runs its prompt once, then `fork`s into n sequences that share its blocks; it is
admitted only while the batch has seats for all n. The beams of a beam search (`beam.py`) are
preempted and re-admitted together, and a beam with nothing to run (it waits for its group) is
skipped.
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 chunked_prefill: bool = True):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs!r}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens!r}")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_cached_tokens = 0   # tokens found in the prefix cache at admission, summed

    def add(self, seq: Sequence) -> None:
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if len(seq) > capacity:
            raise ValueError(f"the prompt ({len(seq)} tokens) is larger than the whole KV cache ({capacity} tokens)")
        if not self.chunked_prefill and len(seq) > self.max_num_batched_tokens:
            raise ValueError(f"the prompt ({len(seq)} tokens) exceeds max_num_batched_tokens "
                             f"({self.max_num_batched_tokens}) and chunked prefill is off")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of its tokens to run) pairs of the next step."""
        budget, batch, preempted = self.max_num_batched_tokens, [], False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:   # preempted earlier in this loop
                continue
            n = seq.num_uncomputed_tokens
            if n == 0:   # a beam whose candidates are in, waiting for the rest of its group
                continue
            if n == 1:   # a decode step: its slot may need a new block (or a copy-on-write)
                if not self.blocks.can_append(seq):
                    preempted = True
                    while not self.blocks.can_append(seq):
                        for victim in reversed(self._group(self.running[-1], self.running)):   # the latest arrival
                            self._preempt(victim)
                        if seq.status != SequenceStatus.RUNNING:
                            break
                    # a preempted beam group may hold sequences batched earlier in this loop: they leave it
                    batch = [(s, k) for s, k in batch if s.status == SequenceStatus.RUNNING]
                    budget = self.max_num_batched_tokens - sum(k for _, k in batch)
                if seq.status != SequenceStatus.RUNNING:
                    continue
                seq.copies = self.blocks.may_append(seq)  # (src, dst) block copies for the runner
            n = min(n, budget)
            batch.append((seq, n))
            budget -= n
        # New sequences join only while budget is left, i.e. when every running prefill finishes in this
        # step: a prefix-cache hit on blocks another sequence allocated then reads K/V written no later
        # than this step's forward (each layer writes all new K/V before any attention reads them).
        while self.waiting and not preempted and budget > 0:
            group = self._group(self.waiting[0], self.waiting)   # one sequence, or a preempted request's beams
            if self.seats() + sum(s.seats for s in group) > self.max_num_seqs or not self._allocate(group):
                break
            # with chunked prefill off a prompt joins only whole (the beams of a group: in chunks if they must)
            if len(group) == 1 and group[0].num_uncomputed_tokens > budget and not self.chunked_prefill:
                self._release(group)
                break
            for seq in group:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                n = min(seq.num_uncomputed_tokens, budget)
                if n:
                    batch.append((seq, n))
                    budget -= n
        assert sum(n for _, n in batch) <= self.max_num_batched_tokens and self.seats() <= self.max_num_seqs
        return batch

    @staticmethod
    def _group(seq: Sequence, queue) -> list[Sequence]:
        """`seq`, or with it every beam of its beam search in `queue`: they are preempted and admitted as one."""
        return [s for s in queue if s.beam is seq.beam] if seq.beam is not None else [seq]

    def _allocate(self, group: list[Sequence]) -> bool:
        """Blocks for every sequence of `group` (prefix-cache hits first), or for none of them."""
        for i, seq in enumerate(group):
            cache = not seq.wants_prompt_logprobs   # those compute their whole prompt
            if not self.blocks.can_allocate(seq, cache):
                self._release(group[:i])
                return False
            self.blocks.allocate(seq, cache)
            seq.num_computed_tokens = seq.num_prefix_hits = seq.num_cached_tokens
            self.num_cached_tokens += seq.num_cached_tokens
        return True

    def _release(self, group: list[Sequence]) -> None:
        """Undo `_allocate`: blocks back, no cache hits counted. Last first: a later beam may hold blocks an
        earlier one allocated and has not computed, which must leave the prefix cache with the earlier one."""
        for seq in reversed(group):
            self.num_cached_tokens -= seq.num_cached_tokens
            self.blocks.free(seq)
            seq.num_computed_tokens = 0

    def seats(self) -> int:
        """Running sequences, and the forks those that asked for n completions will add."""
        return sum(s.seats for s in self.running)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (a fresh sequence with the parent's tokens) joins the batch holding the parent's
        blocks: a seat the parent reserved at admission, and no new block until one of them writes
        into a shared one (copy-on-write, `BlockManager.may_append`)."""
        assert parent.forks_pending > 0 and parent.status == SequenceStatus.RUNNING
        self.blocks.fork(parent, child)
        parent.forks_pending -= 1
        child.forks_pending = 0
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.copies = []                  # copies planned for blocks it no longer holds
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        if seq.beam is not None:
            seq.beam.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
