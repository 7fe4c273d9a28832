"""`LLM`: vLLM's offline entry point over `LLMEngine`. Code written for vLLM,

    from vllm import LLM, SamplingParams
    llm = LLM(model="TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=50))
    print(outputs[0].outputs[0].text)

runs unchanged with `from llmopt.serving import LLM, SamplingParams`. `load_llm` returns the real
vLLM's `LLM` when vLLM is installed and a GPU is present (`prefer_vllm=True`), else ours.
"""
from __future__ import annotations

from typing import TypedDict

import torch

from .beam import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling import SamplingParams

IGNORED = ("swap_space", "disable_log_stats", "trust_remote_code_for_tokenizer", "tokenizer_mode")


class LLM:
    def __init__(self, model=None, tokenizer=None, dtype="auto", seed: int = 0, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None, block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, tensor_parallel_size: int = 1, quantization=None,
                 trust_remote_code: bool = False, device=None, num_kv_blocks: int | None = None,
                 backend: str = "auto", enforce_eager: bool = False, num_scheduler_steps: int = 1,
                 speculative_config: dict | None = None, kv_cache_dtype: str = "auto",
                 compilation_config: int | dict | None = None, **kwargs):
        unknown = set(kwargs) - set(IGNORED)
        if unknown:
            raise ValueError(f"unsupported LLM arguments: {sorted(unknown)}")
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1 in llmopt.serving, got {tensor_parallel_size!r}")
        if quantization is not None:
            raise ValueError("quantization=...: quantize the model with llmopt.quant first and pass the model")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer= with a model object")
            self.model, self.tokenizer = model, tokenizer
        else:
            from .. import models

            self.model, tok = models.load(model, dtype=None if dtype == "auto" else dtype, device=device,
                                          trust_remote_code=trust_remote_code)
            self.tokenizer = tokenizer or tok
        if isinstance(self.tokenizer, str):   # vLLM's tokenizer=: a name or a path
            from .. import models

            self.tokenizer = models.load_tokenizer(self.tokenizer)
        if not callable(self.tokenizer):
            raise ValueError(f"tokenizer must be a tokenizer, or its name or path; got {type(self.tokenizer).__name__}")
        kv_memory = None
        p = next(self.model.parameters())
        if p.is_cuda and num_kv_blocks is None:
            free, total = torch.cuda.mem_get_info(p.device)
            kv_memory = max(0, int(free - (1 - gpu_memory_utilization) * total))
        self.engine = LLMEngine(self.model, self.tokenizer, block_size=block_size, num_kv_blocks=num_kv_blocks,
                                kv_cache_memory=kv_memory, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                enable_prefix_caching=enable_prefix_caching,
                                chunked_prefill=enable_chunked_prefill, backend=backend,
                                enforce_eager=enforce_eager, seed=seed, num_scheduler_steps=num_scheduler_steps,
                                speculative_config=speculative_config, kv_cache_dtype=kv_cache_dtype,
                                compilation_config=compilation_config)

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine behind this `LLM` (its step-wise API: add_request, step, abort)."""
        return self.engine

    def chat(self, messages, sampling_params=None, use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: `messages` is one conversation (a list of {"role", "content"} dicts) or a
        list of them; each is rendered with the tokenizer's chat template (or `chat_template`, a Jinja
        string; the bundled model has none and gets a plain one, `chat_prompt`) and generated as
        `generate` does, one output per conversation."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a conversation (a non-empty list of {role, content} dicts) or a "
                             "non-empty list of them")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [chat_input(self.tokenizer, c, chat_template=chat_template,
                              add_generation_prompt=add_generation_prompt,
                              continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: every prompt (a string, token ids, or a {"prompt": ...} /
        {"prompt_token_ids": [...]} dict) searched with `params`, all in one continuous batch. Per prompt a
        `BeamSearchOutput` whose sequences (best first) hold the prompt's and the beam's tokens and, as
        vLLM's, the text of both."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        outputs = []
        for out in self.generate(prompts, params, use_tqdm=use_tqdm):
            seqs = [BeamSearchSequence(out.prompt_token_ids + c.token_ids, c.logprobs, c.cumulative_logprob,
                                       finish_reason=c.finish_reason) for c in out.outputs]
            for s in seqs:
                s.text = self.tokenizer.decode(s.tokens)
            outputs.append(BeamSearchOutput(seqs))
        return outputs

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in the order of `prompts`."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for rid in ids:   # all or nothing: a bad prompt rejects the call before anything runs
                self.engine.abort_request(rid)
            self.engine.run()  # report (and forget) the aborted ones
            raise
        final = self.engine.run(use_tqdm=use_tqdm)
        return [final[rid] for rid in ids]


class TextPrompt(TypedDict):
    """vLLM's prompt as text (`vllm.TextPrompt`): `{"prompt": "..."}`."""
    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's prompt as token ids (`vllm.TokensPrompt`): `{"prompt_token_ids": [...]}`."""
    prompt_token_ids: list[int]


def chat_prompt(tokenizer, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, **template_kwargs) -> str:
    """A conversation as one prompt: the tokenizer's chat template (or `chat_template`) when there is
    one, else a plain one for the bundled (code) model: `# role:` lines, then `# assistant:` for the
    reply (`add_generation_prompt`), or the last message left open for the model to continue
    (`continue_final_message`)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                            "assistant")
            for m in messages):
        raise ValueError("messages must be a non-empty list of {role: system|user|assistant, content: str}")
    if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message continues the last message, an assistant's: "
                         "it needs add_generation_prompt=False")
    if chat_template is not None or getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **template_kwargs)
    text = "".join(f"# {m['role']}:\n{m['content']}\n" for m in messages)
    if continue_final_message:
        return text[:-1]
    return text + ("# assistant:\n" if add_generation_prompt else "")


def chat_input(tokenizer, messages: list[dict], chat_template: str | None = None, **kwargs) -> dict:
    """A conversation as a prompt dict, its text (`chat_prompt`) and token ids. A chat template writes the
    special tokens it wants (Llama-3's starts with the BOS), so its text is encoded without adding any,
    as vLLM does; the plain template has none, and gets the tokenizer's usual ones, as any prompt."""
    if tokenizer is None:
        raise ValueError("a chat needs a tokenizer")
    text = chat_prompt(tokenizer, messages, chat_template=chat_template, **kwargs)
    templated = chat_template is not None or bool(getattr(tokenizer, "chat_template", None))
    return {"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=not templated).input_ids}


# arguments of our `LLM` that vLLM's does not take: dropped when the real vLLM is used
# (num_scheduler_steps was vLLM's until its V1 engine, which overlaps the host's work by itself)
OURS_ONLY = ("backend", "num_kv_blocks", "device", "num_scheduler_steps")


def load_llm(model, prefer_vllm: bool = True, **kwargs):
    """The real vLLM's `LLM` where it is installed and a GPU is present (and `prefer_vllm`), else ours.

    `model` may be a bundled model's short name ("tinypy"): vLLM gets its folder. Arguments only ours
    takes (`OURS_ONLY`) are not passed to vLLM. If vLLM fails to start (an architecture it does not
    know, too little GPU memory), a warning says why and ours is returned. Build the sampling
    parameters with `sampling_params_for(llm, ...)`: vLLM's engine wants its own class."""
    if prefer_vllm and torch.cuda.is_available():
        try:
            from vllm import LLM as VLLM
        except ImportError:
            pass
        else:
            from .. import models

            path = str(models.bundled_path(model)) if isinstance(model, str) and model in models.BUNDLED else model
            try:
                return VLLM(model=path, **{k: v for k, v in kwargs.items() if k not in OURS_ONLY})
            except Exception as e:  # noqa: BLE001 - any failure to start: serve with ours instead
                import warnings

                warnings.warn(f"vLLM could not load {model!r} ({type(e).__name__}: {e}); using llmopt.serving",
                              stacklevel=2)
    return LLM(model=model, **kwargs)


def sampling_params_for(llm, **fields):
    """`SamplingParams(**fields)` of the library `llm` comes from (vLLM's for vLLM's `LLM`, else ours)."""
    if type(llm).__module__.startswith("vllm"):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(**fields)
    return SamplingParams(**fields)
