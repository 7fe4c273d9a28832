"""`Sequence`: one request's tokens and its place in the engine (nano-vllm's and vLLM's name).

The prompt and every generated token sit in one list, `token_ids`. The scheduler moves a sequence
between WAITING (not yet or no longer holding KV blocks) and RUNNING; `num_computed_tokens` says
how many of its tokens already have keys and values in the cache (the prefix-cache hits count,
and a chunked prefill advances it a chunk at a time); the rest must be run through the model.
"""
from __future__ import annotations

import itertools
import time
from enum import Enum, auto

from .sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 prompt: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0       # prefix-cache hits when the blocks were allocated (0 again once freed)
        self.num_prefix_hits = 0         # the same, kept after its blocks are freed: reported in its output
        self.num_computed_tokens = 0     # tokens whose K/V are in the cache
        self.copies: list[tuple[int, int]] = []  # copy-on-write block copies due before the next step
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] = []   # per generated token, when params.logprobs is set
        self.prompt_logprobs: list[dict | None] = [None]   # per prompt token (the first has none)
        self.finish_reason: str | None = None   # "stop", "length", "abort" or "error"
        self.stop_reason = None          # the stop string or token id that ended it
        self.error: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.text = ""                   # detokenized completion, kept by the engine
        # parallel sampling (params.n > 1): the request's first sequence is prefilled alone, then forked
        # into n sharing its blocks (`Scheduler.fork`); `index` is this one's place among the n
        self.index = 0
        self.forks_pending = params.n - 1
        self.beam = None                 # a beam search's `BeamGroup`, shared by the request's beams (beam.py)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Asked for the prompt's log-probabilities and not all computed yet: its prompt must run through
        the model, every position's logits kept, and no block taken from the prefix cache."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def seats(self) -> int:
        """Places in the running batch it takes or will take: itself and the forks it still owes."""
        return 1 + self.forks_pending

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
