"""Serving (lessons 09-10): a paged KV cache, paged attention, continuous batching and an engine
with vLLM's API.

- `BlockManager`: the KV cache in fixed-size blocks, block tables per sequence, reference counts,
  prefix caching of full blocks, copy-on-write;
- `kv_cache`: writing K/V into slots and reading them back, in the model's dtype or FP8
  (`kv_cache_dtype="fp8"`);
- `attention`: paged attention for prefill (PyTorch) and decode (PyTorch reference and a Triton
  kernel), grouped-query aware;
- `Scheduler`: waiting/running queues, token and sequence budgets, chunked prefill, preemption
  by recompute;
- `ModelRunner`: a Llama-family model's forward over the paged cache (quantized and fused models
  plug in);
- `LLMEngine` (`add_request`, `step`, streaming) and `LLM`, `SamplingParams`, `RequestOutput`:
  vLLM's names, so `from llmopt.serving import LLM, SamplingParams` runs code written for vLLM;
- `BeamSearchParams`, `LLM.beam_search`: beam search whose beams share KV blocks (copy-on-write);
- `speculative`: speculative decoding by n-gram lookup or a draft model (`speculative_config`), greedy output unchanged,
  sampled output's distribution unchanged.
"""
from .beam import BeamSearchOutput, BeamSearchParams, BeamSearchSequence, beam_search_reference
from .block_manager import Block, BlockManager, NoFreeBlocks
from .engine import EngineStats, LLMEngine, generate_fn
from .llm import LLM, TextPrompt, TokensPrompt, load_llm, sampling_params_for
from .outputs import CompletionOutput, RequestOutput
from .runner import ModelRunner, kv_bytes_per_token
from .sampling import Logprob, SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "Block", "BlockManager",
           "CompletionOutput", "EngineStats", "LLM", "LLMEngine", "Logprob", "ModelRunner", "NoFreeBlocks",
           "RequestOutput", "SamplingParams", "Scheduler", "Sequence", "SequenceStatus", "TextPrompt", "TokensPrompt",
           "beam_search_reference", "generate_fn", "kv_bytes_per_token", "load_llm", "sample",
           "sampling_params_for"]
