"""`llmopt serve`: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

    llmopt serve --model tinypy --port 8000
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="tinypy", prompt="def add(a, b):", max_tokens=30)

Endpoints: `/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions` (with `stream: true`
as server-sent events; `stream_options: {"include_usage": true}` adds a last chunk with the usage and no
choices). Without `max_tokens` a completion stops after 16 tokens and a chat reply runs to the end of
the context, as in vLLM. A field that would change the answer and that this server does not implement
(`suffix`, `tools`, a `response_format` other than text, ...) gets a 400 naming it, not silence. The
engine steps in a process of its own (`EngineProcess`; or in a thread, `AsyncEngine`) while requests
arrive; each request gets a queue its outputs are pushed to. Faults answer with OpenAI's error body:
bad JSON or fields 400, an unknown model 404, a full queue 429, a request past its deadline 504, a dead
engine 503 (`/health` too); a request the engine fails mid-stream ends with an `error` event, as in
vLLM; a client that disconnects has its request aborted, which frees its KV blocks at once.
"""

import asyncio
import itertools
import json
import logging
import math
import time
from contextlib import asynccontextmanager

from .async_engine import AsyncEngine, Busy, EngineProcess, EngineStopped, Timeout, load_engine
from .beam import BeamSearchParams
from .engine import LLMEngine
from .llm import chat_input
from .outputs import RequestOutput
from .sampling import SamplingParams

SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs",
                   "ignore_eos", "min_tokens", "stop_token_ids", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
                   "include_stop_str_in_output", "skip_special_tokens")
UNTIL_FULL = 2**31 - 1   # beam search's max_tokens when none is given: the engine stops at max_model_len

# OpenAI / vLLM fields that would change the answer and that this server does not implement: a request
# that sets one is refused with a 400 naming it (vLLM's way with `suffix`) rather than answered as if it
# had not. Each maps to the values that mean "not used".
UNSUPPORTED = {"suffix": (None, ""), "prompt_logprobs": (None,), "tools": (None, []), "functions": (None, []),
               "function_call": (None, "none"), "guided_json": (None,), "guided_regex": (None,),
               "guided_choice": (None,), "guided_grammar": (None,), "structural_tag": (None,),
               "logits_processors": (None, []), "chat_template": (None,), "continue_final_message": (None, False),
               "add_generation_prompt": (None, True)}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _ending(e: Exception) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of an exception that ended a request."""
    if isinstance(e, Timeout):
        return 504, "timeout"
    if isinstance(e, EngineStopped):
        return 503, "server_error"
    if isinstance(e, ValueError):   # the engine refused the request
        return 400, "invalid_request_error"
    return 500, "server_error"


def check_fields(body: dict, chat: bool) -> None:
    """A ValueError naming the first field the server cannot honour (see `UNSUPPORTED`)."""
    for name, unused in UNSUPPORTED.items():
        if body.get(name) not in unused:
            raise ValueError(f"{name} is not supported by this server")
    if body.get("best_of") not in (None, body.get("n") or 1):
        raise ValueError(f"best_of is not supported by this server (only best_of equal to n), got {body['best_of']!r}")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ValueError(f"response_format {fmt!r} is not supported by this server: only {{'type': 'text'}}")
    if body.get("echo") not in (None, False):
        if chat:
            raise ValueError("echo is not supported for chat completions by this server")
        if body.get("echo") is not True:
            raise ValueError(f"echo must be true or false, got {body['echo']!r}")
        if body.get("logprobs") is not None:
            raise ValueError("echo with logprobs is not supported: the prompt's log-probabilities are not returned")
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ValueError(f"stream must be true or false, got {stream!r}")
    if options is not None:
        if not stream:
            raise ValueError("stream_options can only be given with stream: true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", True), bool):
            raise ValueError(f"stream_options must be {{\"include_usage\": true|false}}, got {options!r}")
        if options.get("continuous_usage_stats"):
            raise ValueError("stream_options.continuous_usage_stats is not supported by this server")


def request_timeout_of(body: dict, default: float) -> float:
    """The request's `timeout` in seconds (null or absent: the server's `default`)."""
    t = body.get("timeout")
    if t is None:
        return default
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (or null: the server's {default:g}), got {t!r}")
    return float(t)


def chat_messages(messages):
    """OpenAI's message forms as `chat_prompt` takes them: content given as a list of text parts is joined
    with newlines (as vLLM joins them), and the `developer` role (OpenAI's newer name for the system
    message) is `system`. Anything else goes to `chat_prompt` as it is, which says what is wrong."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise ValueError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                 f"are supported, got {parts!r}")
            m = {**m, "content": "\n".join(p["text"] for p in parts)}
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        out.append(m)
    return out


def sampling_params(body: dict, chat: bool = False) -> SamplingParams | BeamSearchParams:
    kw = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    # no max_tokens: completions stop after 16 (OpenAI's legacy default, vLLM's too), chat runs to the end of
    # the context (vLLM: max_model_len - prompt; OpenAI has no cap); an explicit null means the latter
    if body.get("max_completion_tokens") is not None:
        kw["max_tokens"] = body["max_completion_tokens"]
    else:
        kw["max_tokens"] = body.get("max_tokens", None if chat else 16)
    if body.get("use_beam_search"):   # vLLM's extra parameter: n beams, the best first in the choices
        if body.get("stream"):
            raise ValueError("use_beam_search cannot stream: the beams are ranked again at every step")
        max_tokens = UNTIL_FULL if kw["max_tokens"] is None else kw["max_tokens"]
        return BeamSearchParams(beam_width=kw.get("n", 1), max_tokens=max_tokens,
                                ignore_eos=kw.get("ignore_eos", False), temperature=kw.get("temperature", 0.0),
                                length_penalty=body.get("length_penalty", 1.0))
    if isinstance(kw.get("logprobs"), bool):   # chat: logprobs=true with top_logprobs=k
        kw["logprobs"] = body.get("top_logprobs") or 0 if kw["logprobs"] else None
    try:
        return SamplingParams(**kw)
    except TypeError as e:
        raise ValueError(str(e)) from None


def logprobs_body(tokenizer, c, start: int, chat: bool) -> dict | None:
    """OpenAI's `logprobs` object for the tokens of completion `c` from `start` on (None unless the
    request asked for log-probabilities): chat's {"content": [...]} or completions' four lists."""
    if c.logprobs is None:
        return None
    pairs = list(zip(c.token_ids[start:], c.logprobs[start:]))

    def piece(t: int) -> str:
        return tokenizer.decode([t])

    if chat:
        def entry(t, lp):
            return {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
        return {"content": [{**entry(t, top[t]), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                            for t, top in pairs]}
    tokens = [piece(t) for t, _ in pairs]
    offsets = list(itertools.accumulate((len(x) for x in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [top[t] for t, top in pairs],
            "top_logprobs": [{piece(k): v for k, v in top.items()} for _, top in pairs], "text_offset": offsets}


def build_app(engine: LLMEngine | EngineProcess, model_name: str, max_queue: int = 256,
              request_timeout: float = 600.0):
    """The FastAPI app serving `engine` under the name `model_name`: an `LLMEngine` (run in a thread of
    this process, started with the first request) or an `EngineProcess` (its `max_queue` counts)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    if not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")

    state = {"engine": engine if isinstance(engine, EngineProcess) else None}

    @asynccontextmanager
    async def lifespan(app):
        yield
        if state["engine"] is not None:
            state["engine"].close()

    app = FastAPI(title="llmopt serve", lifespan=lifespan)

    def async_engine() -> AsyncEngine | EngineProcess:
        if state["engine"] is None:
            state["engine"] = AsyncEngine(engine, max_queue)
        return state["engine"]

    app.state.async_engine = async_engine

    def fail(status: int, message: str, kind="invalid_request_error", param=None, code=None):
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.get("/health")
    def health():
        in_use, total = async_engine().kv_blocks()
        body = {"status": "ok", "requests": len(async_engine().streams), "kv_blocks_in_use": in_use,
                "kv_blocks": total}
        if async_engine().stopped:
            return JSONResponse({**body, "status": "engine stopped", "why": async_engine().stopped}, 503)
        return body

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llmopt"}]}

    async def handle(request: Request, chat: bool):
        try:
            body = await request.json()
        except Exception:
            return fail(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return fail(400, "the request body must be a JSON object")
        if body.get("model") not in (None, model_name):
            return fail(404, f"the model {body.get('model')!r} does not exist; this server has {model_name!r}",
                        param="model", code="model_not_found")
        try:
            check_fields(body, chat)
            timeout = request_timeout_of(body, request_timeout)
            if chat:
                prompt = chat_input(async_engine().tokenizer, chat_messages(body.get("messages")))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int)
                                                                                       for t in prompt))):
                    raise ValueError("prompt must be a string or a list of token ids (one prompt per request)")
            params = sampling_params(body, chat)
            rid, outputs = async_engine().submit(prompt, params, timeout)
        except Busy as e:
            return fail(429, str(e), kind="rate_limit_error")
        except (ValueError, EngineStopped) as e:
            status, kind = _ending(e)
            return fail(status, str(e), kind=kind)
        created, stream = int(time.time()), bool(body.get("stream"))
        options = body.get("stream_options")   # vLLM: include_usage is true once stream_options is given
        include_usage = options is not None and options.get("include_usage", True)
        obj = "chat.completion" if chat else "text_completion"
        try:
            first = await outputs.get()   # the first token, or why the engine refused the request
        except asyncio.CancelledError:
            async_engine().abort(rid)
            raise
        if isinstance(first, Exception):   # rejected (empty prompt, too long, ...), late, or no engine
            status, kind = _ending(first)
            return fail(status, str(first), kind=kind)

        def usage(out: RequestOutput):
            n_out = sum(len(c.token_ids) for c in out.outputs)
            return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": n_out,
                    "total_tokens": len(out.prompt_token_ids) + n_out}

        echo = ""   # completions' echo: the prompt before each choice's text
        if body.get("echo"):
            echo = prompt if isinstance(prompt, str) else async_engine().tokenizer.decode(prompt)

        if not stream:
            out = first
            try:
                while not out.finished:
                    out = await outputs.get()
                    if isinstance(out, Exception):
                        status, kind = _ending(out)
                        return fail(status, str(out), kind=kind)
            except asyncio.CancelledError:
                async_engine().abort(rid)
                raise
            if out.error:
                return fail(500, out.error, kind="server_error")
            choices = []
            for c in out.outputs:
                choice = {"index": c.index, "finish_reason": c.finish_reason,
                          "logprobs": logprobs_body(async_engine().tokenizer, c, 0, chat)}
                if chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = echo + c.text
                choices.append(choice)
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                    "usage": usage(out)}

        def text_of(c) -> str:
            # a finished completion, or one of a request with stop strings, has its text
            if c.finish_reason is not None or params.stop:
                return c.text
            text = async_engine().tokenizer.decode(c.token_ids, skip_special_tokens=params.skip_special_tokens)
            return text.rstrip("\ufffd")   # a character whose bytes are not all generated yet: send it later

        async def events():
            sent, closed, out = {}, set(), first   # per completion index: characters sent; those finished
            sent_tokens = {}                          # per completion index: tokens whose logprobs were sent
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            try:
                if chat:
                    heads = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(params.n)]
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model_name,
                                "choices": heads, **({"usage": None} if include_usage else {})})
                while True:
                    # outputs carry the whole completion so far: when the client has fallen behind, skip
                    # to the latest one and send everything new in one chunk
                    while not isinstance(out, Exception) and not out.finished and not outputs.empty():
                        out = outputs.get_nowait()
                    if isinstance(out, Exception):   # past its deadline, or the engine died
                        yield _sse(error_body(str(out), _ending(out)[1]))
                        return
                    if out.error:   # the engine failed this request: say so (vLLM's error event), not "finished"
                        if not out.finished:
                            async_engine().abort(rid)
                        yield _sse(error_body(out.error, "server_error"))
                        return
                    for c in out.outputs:   # one chunk per completion with news (OpenAI's way for n > 1)
                        if c.index in closed:
                            continue
                        text = text_of(c)
                        delta = text[sent.get(c.index, 0):] if c.index in sent else echo + text
                        sent[c.index] = len(text)
                        choice = {"index": c.index, "finish_reason": c.finish_reason}
                        lps = logprobs_body(async_engine().tokenizer, c, sent_tokens.get(c.index, 0), chat)
                        sent_tokens[c.index] = len(c.token_ids)
                        news = bool(delta or c.finish_reason is not None or (lps and (lps.get("content")
                                                                                    or lps.get("tokens"))))
                        if chat:
                            choice["delta"] = {"content": delta} if delta else {}
                            choice["logprobs"] = lps
                        else:
                            choice.update(text=delta, logprobs=lps)
                        if c.finish_reason is not None:
                            closed.add(c.index)
                        if news:
                            yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model_name,
                                        "choices": [choice], **({"usage": None} if include_usage else {})})
                    if out.finished:
                        if include_usage:   # OpenAI's last chunk: no choices, the usage of the whole request
                            yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model_name,
                                        "choices": [], "usage": usage(out)})
                        yield "data: [DONE]\n\n"
                        return
                    out = await outputs.get()
            except (asyncio.CancelledError, GeneratorExit):   # the client went away: free its blocks now
                async_engine().abort(rid)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    async def answer(request: Request, chat: bool):
        try:
            return await handle(request, chat)
        except Exception as e:   # a bug of ours: still OpenAI's error body, not a bare "Internal Server Error"
            logging.getLogger(__name__).exception("request failed")
            return fail(500, f"{type(e).__name__}: {e}", kind="server_error")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 256, request_timeout: float = 600,
          threads: int | None = None, engine_process: bool = True, fuse: bool | str = False,
          served_model_name: str | None = None, **engine_kw):
    """Load `model` and serve it until interrupted (what `llmopt serve` runs). `threads`: the engine's
    PyTorch threads (CPU math; default one per core). `engine_process`: the engine in a process of its
    own (default), else in a thread of the server's. `fuse`: lesson 08's fused modules (`load_engine`).
    `served_model_name`: the name clients ask for (default: `model` as given)."""
    import uvicorn

    from .. import models

    name = served_model_name or str(model or models.default_model())
    if engine_process:
        engine = EngineProcess(model, max_queue, threads, fuse, **engine_kw)
    else:
        engine = load_engine(model, threads, fuse, **engine_kw)
    try:
        uvicorn.run(build_app(engine, name, max_queue, request_timeout), host=host, port=port, log_level="warning")
    finally:
        if engine_process:
            engine.close()
