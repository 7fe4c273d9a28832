"""What the engine returns, with vLLM's names and fields (`vllm.outputs`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None     # always summed here; vLLM's V1 engine gives None without logprobs=
    logprobs: list[dict] | None
    finish_reason: str | None = None     # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)  # arrival, first token and finish times (perf_counter s)
    error: str | None = None
    prompt_logprobs: list[dict | None] | None = None   # with SamplingParams(prompt_logprobs=k): per prompt token
    num_cached_tokens: int = 0      # prompt tokens found in the prefix cache (at its latest admission)
