"""`llmopt serve`: the official `openai` client against the server, streaming, every fault with its
status and OpenAI-style error body, a disconnect freeing its blocks, and the HTTP bench's checks;
each with the engine in a thread of the server and in a process of its own (that one with multi-step
decoding: streams get several tokens a step, the texts stay the same)."""
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from llmopt.serving import LLM, LLMEngine, SamplingParams  # noqa: E402
from llmopt.serving.async_engine import EngineProcess  # noqa: E402
from llmopt.serving.http_bench import BackgroundServer  # noqa: E402
from llmopt.serving.server import build_app  # noqa: E402

NAME = "tinypy"


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def server(request, bundled):
    model, tok = bundled
    engine_kw = {"num_kv_blocks": 256, "max_num_seqs": 8}
    if request.param == "engine-thread":
        engine = LLMEngine(model, tok, **engine_kw)
    else:   # the bundled model loaded again in the engine's process: the same weights; multi-step decoding
        engine = EngineProcess(NAME, max_queue=4, num_scheduler_steps=4, **engine_kw)
    app = build_app(engine, NAME, max_queue=4, request_timeout=60)
    with BackgroundServer(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def reference_text(bundled, prompt, n):
    model, tok = bundled
    out = LLM(model=model, tokenizer=tok).generate([prompt], SamplingParams(temperature=0, max_tokens=n,
                                                                            ignore_eos=True))
    return out[0].outputs[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_completion_round_trip_equals_the_engine(client, bundled):
    prompt = "def add(a, b):"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == reference_text(bundled, prompt, 12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and len({c.id for c in chunks}) == 1


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, bundled):
    """vLLM's extra parameter: only the prompt's last k tokens are run."""
    model, tok = bundled
    r = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True, "truncate_prompt_tokens": 3})
    ids = tok("def add(a, b):").input_ids[-3:]
    want = LLM(model=model, tokenizer=tok).generate([ids], SamplingParams(temperature=0, max_tokens=4,
                                                                          ignore_eos=True))[0].outputs[0].text
    assert r.usage.prompt_tokens == 3 and r.choices[0].text == want


def test_chat_completion_and_stream(client):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A function that adds."}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    s = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in s)
    assert text == r.choices[0].message.content


def test_chat_content_parts_and_the_developer_role(client):
    """Content as a list of text parts is the parts joined by newlines (vLLM's way); `developer` is the
    system message under OpenAI's newer name."""
    kw = dict(model=NAME, max_tokens=6, temperature=0)
    want = client.chat.completions.create(messages=[{"role": "system", "content": "You write Python."},
                                                    {"role": "user", "content": "A function\nthat adds."}], **kw)
    got = client.chat.completions.create(messages=[
        {"role": "developer", "content": [{"type": "text", "text": "You write Python."}]},
        {"role": "user", "content": [{"type": "text", "text": "A function"}, {"type": "text", "text": "that adds."}]}],
        **kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens


def test_echo_and_include_usage(client, bundled):
    """`echo` puts the prompt before the completion (whole and streamed); `stream_options.include_usage`
    adds OpenAI's last chunk: no choices, the request's usage; `timeout: null` is the server's default."""
    prompt = "def add(a, b):"
    want = reference_text(bundled, prompt, 8)
    kw = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    r = client.completions.create(echo=True, extra_body={"ignore_eos": True, "timeout": None}, **kw)
    assert r.choices[0].text == prompt + want and r.usage.completion_tokens == 8
    chunks = list(client.completions.create(echo=True, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == prompt + want
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    chat = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, temperature=0, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 5
    assert chat[-1].usage.total_tokens == chat[-1].usage.prompt_tokens + 5


def test_include_stop_str_in_output_reaches_the_engine(client, bundled):
    model, tok = bundled
    kw = dict(temperature=0, max_tokens=20, stop=["\n"], include_stop_str_in_output=True)
    want = LLM(model=model, tokenizer=tok).generate(["def add(a, b):"], SamplingParams(**kw))[0].outputs[0].text
    r = client.completions.create(model=NAME, prompt="def add(a, b):", temperature=0, max_tokens=20, stop=["\n"],
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == want and want.endswith("\n")


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(bundled):
    """vLLM: a chat request without max_tokens may use the rest of the context (OpenAI has no cap); it
    once stopped at 16 tokens, SamplingParams' default. Completions keep vLLM's and OpenAI's 16; an
    explicit `max_tokens: null` means the rest of the context there too."""
    from llmopt.serving.llm import chat_input

    model, tok = bundled
    msgs = [{"role": "user", "content": "class Stack:"}]
    ctx = 40
    ref = LLM(model=model, tokenizer=tok, max_model_len=ctx)
    want = ref.generate([chat_input(tok, msgs)], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    want = want[0].outputs[0]
    engine = LLMEngine(model, tok, num_kv_blocks=16, max_num_seqs=2, max_model_len=ctx)
    with BackgroundServer(build_app(engine, NAME)) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=msgs, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens + r.usage.completion_tokens == ctx and r.usage.completion_tokens > 16
        body = {"model": NAME, "prompt": "def add(a, b):", "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] == 16
        r = httpx.post(f"{s.url}/v1/completions", json={**body, "max_tokens": None}, timeout=60)
        assert r.json()["usage"]["total_tokens"] == ctx


def test_an_engine_error_mid_stream_is_an_error_event(bundled):
    """A request the engine fails after the stream began (here: it outgrows a 64-token KV cache) ends with
    OpenAI's error body as an event, as vLLM sends it, not a chunk with finish_reason "error" (no such
    reason in OpenAI's API): the openai client raises."""
    model, tok = bundled
    engine = LLMEngine(model, tok, num_kv_blocks=4, block_size=16, max_num_seqs=2)
    with BackgroundServer(build_app(engine, NAME)) as s:
        for path, body in [("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
            r = httpx.post(f"{s.url}{path}", json={**body, "max_tokens": 200, "ignore_eos": True, "stream": True},
                           timeout=60)
            events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            assert len(events) > 1 and all(c.get("finish_reason") != "error" for e in events[:-1]
                                           for c in e["choices"])
            assert "does not fit in the KV cache" in events[-1]["error"]["message"]
            assert events[-1]["error"]["type"] == "server_error"
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="does not fit"):
            list(c.completions.create(model=NAME, prompt="x", max_tokens=200, stream=True,
                                      extra_body={"ignore_eos": True}))
        _wait_idle(s)


def test_n_completions_as_choices_and_streamed_by_index(client, bundled):
    """n > 1 (parallel sampling): n choices, seeded as the engine seeds them (seed + index), so the
    streamed deltas of each index add up to its non-streamed text; usage counts every completion."""
    model, tok = bundled
    kw = dict(model=NAME, prompt="def add(a, b):", max_tokens=10, temperature=1.0, n=3, seed=11,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 30
    want = LLM(model=model, tokenizer=tok).generate(["def add(a, b):"], SamplingParams(
        n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True))[0].outputs
    assert [c.text for c in r.choices] == [c.text for c in want]
    texts, finished = ["", "", ""], []
    for chunk in client.completions.create(stream=True, **kw):
        (c,) = chunk.choices
        texts[c.index] += c.text
        if c.finish_reason is not None:
            finished.append(c.index)
    assert texts == [c.text for c in r.choices] and sorted(finished) == [0, 1, 2]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_logprobs_in_openai_form_whole_and_streamed(client, bundled):
    """`logprobs=k` (completions) and `logprobs=true, top_logprobs=k` (chat) come back in OpenAI's
    shapes, with the engine's numbers, and streamed chunks carry each token's once."""
    model, tok = bundled
    kw = dict(model=NAME, prompt="def add(a, b):", max_tokens=8, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    want = LLM(model=model, tokenizer=tok).generate(["def add(a, b):"], SamplingParams(
        temperature=0, max_tokens=8, logprobs=2, ignore_eos=True))[0].outputs[0]
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in want.token_ids] and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(want.token_ids, want.logprobs)], abs=1e-5)
    assert all(len(d) >= 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0
    streamed = [t for chunk in client.completions.create(stream=True, **kw) if chunk.choices[0].logprobs
                for t in chunk.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) >= 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           temperature=0, logprobs=True)            # the chosen token alone
    assert [len(c.top_logprobs) for c in plain.choices[0].logprobs.content] == [1, 1, 1]
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].logprobs is None


def test_beam_search_as_choices(client, bundled, server):
    """vLLM's `use_beam_search` extra parameter: n beams as n choices, best first, as `LLM.beam_search`
    finds them; it does not stream."""
    from llmopt.serving import BeamSearchParams

    model, tok = bundled
    r = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=8, n=3,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.5})
    (want,) = LLM(model=model, tokenizer=tok).beam_search(["def add(a, b):"], BeamSearchParams(
        beam_width=3, max_tokens=8, length_penalty=0.5))
    prompt_len = len(tok("def add(a, b):").input_ids)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [tok.decode(s.tokens[prompt_len:], skip_special_tokens=True)
                                           for s in want.sequences]
    with httpx.Client(timeout=30) as h:
        resp = h.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "x", "n": 2, "stream": True,
                                                             "use_beam_search": True})
    assert resp.status_code == 400 and "cannot stream" in resp.json()["error"]["message"]


def test_penalties_reach_the_sampler(client, bundled):
    model, tok = bundled
    kw = dict(temperature=0, max_tokens=12, frequency_penalty=1.5, presence_penalty=0.5)
    r = client.completions.create(model=NAME, prompt="def add(a, b):", extra_body={"ignore_eos": True,
                                                                                   "repetition_penalty": 1.2}, **kw)
    want = LLM(model=model, tokenizer=tok).generate(["def add(a, b):"], SamplingParams(
        ignore_eos=True, repetition_penalty=1.2, **kw))[0].outputs[0].text
    assert r.choices[0].text == want != reference_text(bundled, "def add(a, b):", 12)
    # OpenAI's logit_bias (token ids as strings) and vLLM's bad_words reach it too
    first = LLM(model=model, tokenizer=tok).generate(["def add(a, b):"], SamplingParams(
        temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]             # greedy's first token, banned below
    kw = dict(temperature=0, max_tokens=6, logit_bias={str(first): -100})
    r = client.completions.create(model=NAME, prompt="def add(a, b):", extra_body={"ignore_eos": True,
                                                                                   "bad_words": ["return"]}, **kw)
    want = LLM(model=model, tokenizer=tok).generate(["def add(a, b):"], SamplingParams(
        ignore_eos=True, bad_words=["return"], **kw))[0].outputs[0]
    assert r.choices[0].text == want.text and first not in want.token_ids


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "n": 0}, 400, "n (completions per prompt)"),
    ({"model": NAME, "prompt": "x", "n": 9}, 400, "max_num_seqs"),
    ({"model": NAME, "prompt": ""}, 400, "empty"),
    ({"model": NAME, "prompt": [7] * 5000}, 400, "max_model_len"),
    ({"model": NAME, "prompt": 3}, 400, "prompt must be"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    # these passed the range checks and then stopped the engine inside a batch (every request in
    # flight answered 503): found by a random walk of concurrent clients
    ({"model": NAME, "prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ({"model": NAME, "prompt": "x", "temperature": 0.7, "seed": 1.5}, 400, "seed"),
    ({"model": NAME, "prompt": "x", "logprobs": 1.5}, 400, "logprobs"),
    ({"model": NAME, "prompt": "x", "logprobs": 10**6}, 400, "logprobs"),
    ('{"model": "tinypy", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ('{"model": "tinypy", "prompt": "x", "logit_bias": {"5": Infinity}}', 400, "logit_bias"),
    ({"model": NAME, "prompt": "x", "stop": [1]}, 400, "stop"),
    ({"model": NAME, "prompt": "x", "stop_token_ids": "ab"}, 400, "stop_token_ids"),
    ({"model": NAME, "prompt": "x", "bad_words": [4]}, 400, "bad_words"),
    ({"model": NAME, "prompt": "x", "use_beam_search": True, "n": 2, "length_penalty": "long"}, 400,
     "length_penalty"),
    # a bad timeout was a TypeError (a bare 500) or, when negative, a 504 the client retried
    ({"model": NAME, "prompt": "x", "timeout": [1]}, 400, "timeout"),
    ({"model": NAME, "prompt": "x", "timeout": -1}, 400, "timeout"),
    ({"model": NAME, "prompt": "x", "timeout": "5"}, 400, "timeout"),
    ({"model": NAME, "prompt": "x", "stream": "false"}, 400, "stream"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    # fields that change the answer and are not implemented: refused by name, not ignored
    ({"model": NAME, "prompt": "x", "suffix": "\n"}, 400, "suffix"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": NAME, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"model": NAME, "prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo"),
    ({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "only text parts"),
])
def test_faults_get_openai_error_bodies(server, body, status, needle):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}{path}", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert _held(server)["status"] == "ok"   # the engine goes on serving the others


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=-1)


def _held(server):
    return httpx.get(f"{server.url}/health").json()


def _wait_idle(server, seconds=10):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        h = _held(server)
        if h["requests"] == 0 and h["kv_blocks_in_use"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the server still holds requests or blocks: {_held(server)}")


def test_disconnect_mid_stream_frees_the_blocks(server):
    body = {"model": NAME, "prompt": "def main():", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                held = _held(server)             # mid-stream: the request holds its blocks
                break                            # then hang up (httpx closes the connection)
    assert held["requests"] == 1 and held["kv_blocks_in_use"] > 0
    _wait_idle(server)                           # aborted: every block is free again


def test_full_queue_answers_429_and_deadline_504(server):
    long = {"model": NAME, "prompt": "import os", "max_tokens": 600, "temperature": 0, "ignore_eos": True,
            "stream": True}
    streams = [httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=30) for _ in range(4)]
    opened = [s.__enter__() for s in streams]     # the queue limit is 4: all held
    try:
        lines = [r.iter_lines() for r in opened]   # kept alive: dropping one closes its connection
        for it in lines:
            next(it)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    _wait_idle(server)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 900,
                                                         "ignore_eos": True, "timeout": 0.2}, timeout=30)
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
    _wait_idle(server)


@pytest.mark.parametrize("engine_thread", [False, True], ids=["engine-process", "engine-thread"])
def test_http_bench_loses_nothing(engine_thread):
    from llmopt.serving.http_bench import http_benchmark

    r = http_benchmark("tinypy", n=12, concurrency=4, prompt_range=(16, 64), output_range=(4, 16), compare=False,
                       engine_thread=engine_thread)
    assert r["engine_thread"] is engine_thread
    assert r["answered"] == 12 and r["duplicate_ids"] == 0 and not r["failed"]
    assert r["kv_blocks_in_use_after"] == 0 and r["tokens_per_s"] > 0 and r["ttft_s"]["p50"] > 0


@pytest.mark.parametrize("args", [["serve", "--port", "0"], ["serve", "--max-queue", "0"],
                                  ["serve", "--request-timeout", "0"], ["serve", "--num-scheduler-steps", "0"],
                                  ["serve", "--max-num-seqs", "-1"], ["bench", "kernels", "--repeats", "0"]])
def test_cli_rejects_bad_numbers_before_loading_anything(args, capsys):
    """`--max-queue 0` once started a server that answered every request 429, and `--repeats 0` ran
    the default 100 repeats: now each is a one-line error, exit code 2."""
    from llmopt.cli import main

    assert main(args) == 2
    assert args[-2] in capsys.readouterr().err


def test_build_app_rejects_an_empty_queue(bundled):
    model, tok = bundled
    with pytest.raises(ValueError, match="max_queue"):
        build_app(LLMEngine(model, tok, num_kv_blocks=16), NAME, max_queue=0)


def test_a_lagging_stream_coalesces_its_chunks_and_keeps_the_text(server, bundled):
    """When the event loop falls behind the engine (here: blocked for a second), the stream skips to
    the newest output and sends all its new text in one chunk; the text equals the plain answer's."""
    prompt = "import os\n"
    body = {"model": NAME, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        (loop, _), = server.app.state.async_engine().streams.values()
        loop.call_soon_threadsafe(time.sleep, 1.0)   # the server's event loop stalls; the engine goes on
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first] + rest[:-1]]
    assert len(chunks) < 20
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference_text(bundled, prompt, 40)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_the_bench_check_rejects_incomplete_or_mixed_streams():
    from llmopt.serving.http_bench import _check_answer

    def sse(*events):
        return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()

    def chunk(rid, finish=None):
        return {"id": rid, "choices": [{"text": "x", "finish_reason": finish}]}

    assert _check_answer(200, sse(chunk("a"), chunk("a", "length"), "[DONE]"), True) == (True, "a")
    assert not _check_answer(200, sse(chunk("a"), chunk("a", "length")), True)[0]            # no [DONE]
    assert not _check_answer(200, sse(chunk("a"), chunk("b", "length"), "[DONE]"), True)[0]   # two requests
    assert not _check_answer(200, sse(chunk("a"), chunk("a", "stop"), "[DONE]"), True)[0]     # cut short
    assert not _check_answer(429, b"", True)[0]
    assert _check_answer(200, json.dumps(chunk("c", "length")).encode(), False) == (True, "c")


def test_an_engine_process_that_cannot_start_says_why():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EngineProcess("/nonexistent/model", num_kv_blocks=8)
    with pytest.raises(ValueError, match="block_size must be >= 1"):   # raised in the engine's process, same type
        EngineProcess(NAME, num_kv_blocks=8, block_size=0)


def test_http_bench_keeps_its_time_bound_and_counts_the_rest_lost():
    from llmopt.serving.http_bench import http_benchmark

    t = time.monotonic()
    r = http_benchmark("tinypy", n=6, concurrency=2, prompt_range=(16, 32), output_range=(900, 1000), compare=False,
                       timeout=1.0)
    assert time.monotonic() - t < 60
    assert r["answered"] < 6 and any("bound" in (f.get("error") or "") for f in r["failed"])


def test_serve_loads_a_saved_quantized_model(tmp_path, bundled):
    """`llmopt serve --model FOLDER --fuse --served-model-name w4` on a folder written by save_quantized:
    the W4 model's greedy text, served by the engine in its own process."""
    import copy

    from llmopt.quant import QuantConfig, quantize, save_quantized
    from llmopt.serving.http_bench import SubprocessServer

    model, tok = bundled
    w4 = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, method="rtn"))
    save_quantized(w4, tok, tmp_path / "w4")
    prompt = "def add(a, b):"
    want = LLM(model=w4, tokenizer=tok).generate([prompt], SamplingParams(temperature=0, max_tokens=10,
                                                                         ignore_eos=True))[0].outputs[0].text
    with SubprocessServer(str(tmp_path / "w4"), max_num_seqs=4, max_queue=8, fuse=True, name="w4") as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["w4"]
        got = c.completions.create(model="w4", prompt=prompt, max_tokens=10, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert got.choices[0].text == want


def test_a_dead_engine_ends_its_requests_and_answers_503(bundled):
    """The engine process is killed mid-stream: the stream ends with an error event, /health and new
    requests answer 503 instead of hanging."""
    import os
    import signal

    engine = EngineProcess(NAME, max_queue=4, num_kv_blocks=64, max_num_seqs=2)
    with BackgroundServer(build_app(engine, NAME)) as s:
        body = {"model": NAME, "prompt": "import os", "max_tokens": 600, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(engine.proc.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        err = json.loads(rest[-1][6:])["error"]
        assert "engine process stopped" in err["message"] and err["type"] == "server_error"
        assert httpx.get(f"{s.url}/health").status_code == 503
        r = httpx.post(f"{s.url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "engine process stopped" in r.json()["error"]["message"]


def test_an_engine_thread_that_fails_answers_503(bundled):
    model, tok = bundled
    engine = LLMEngine(model, tok, num_kv_blocks=64, max_num_seqs=2)

    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in the step")

    engine.step = broken_step
    with BackgroundServer(build_app(engine, NAME)) as s:
        r = httpx.post(f"{s.url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "a bug in the step" in r.json()["error"]["message"]
        assert httpx.get(f"{s.url}/health").json()["status"] == "engine stopped"


def test_load_engine_fuse_modes():
    """`llmopt serve --fuse [plain|merge|gemv]`: the engine's model is fused the way asked."""
    from llmopt.serving.async_engine import load_engine

    plain = load_engine(NAME, fuse=True, num_kv_blocks=8).model.model.layers[0]
    assert type(plain).__name__ == "FusedDecoderLayer" and hasattr(plain.self_attn, "q_proj") and not plain.gemv
    merged = load_engine(NAME, fuse="merge", num_kv_blocks=8).model.model.layers[0]
    assert hasattr(merged.self_attn, "qkv_proj") and not merged.gemv
    assert load_engine(NAME, fuse="gemv", num_kv_blocks=8).model.model.layers[0].gemv
    assert type(load_engine(NAME, num_kv_blocks=8).model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    with pytest.raises(ValueError, match="fuse must be one of"):
        load_engine(NAME, fuse="fast")
