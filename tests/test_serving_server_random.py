"""`llmopt serve` under random concurrent clients, checked against the engine run offline.

Each seed draws an engine (block size, a cache small enough to preempt, seats, a token budget,
multi-step decoding, prefix caching) and a queue limit, then a crowd of clients that arrive within
a second: completions and chat, streamed or not, greedy, seeded sampling, n completions, stop
strings, logprobs, min_tokens; some hang up mid-answer, some set a deadline too short to meet, some
send a bad field. Every answer must be what `LLM.generate` gives for that request alone (streamed
deltas added up), every bad field a 400, every late request a 504 or an error event, and at the end
the server holds no request and no KV block. The walk that became this test found a float `top_k`
(and a float seed, a nan temperature, ...) passing validation and stopping the whole engine."""
import asyncio
import json
import random
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from llmopt.serving import LLM, LLMEngine, SamplingParams  # noqa: E402
from llmopt.serving.async_engine import EngineProcess  # noqa: E402
from llmopt.serving.http_bench import BackgroundServer  # noqa: E402
from llmopt.serving.llm import chat_prompt  # noqa: E402
from llmopt.serving.server import build_app  # noqa: E402

NAME = "tinypy"
JSON = {"content-type": "application/json"}
TEXTS = ["def add(a, b):", "import os\n", "class Foo:\n    def __init__(self):", "x = [i * i for i in range(",
         "# compute the mean\n", "for k, v in d.items():\n    ", "print(", "return"]
BAD = [("temperature", -1), ("temperature", float("nan")), ("top_p", 2.5), ("max_tokens", 0), ("max_tokens", 2.5),
       ("top_k", -2), ("top_k", 2.5), ("seed", 1.5), ("logprobs", 1.5), ("stop", [3]), ("stop", [""]), ("n", 0),
       ("logit_bias", {"x": 1}), ("stop_token_ids", "ab"), ("min_tokens", -1), ("max_tokens", True),
       ("presence_penalty", float("inf")), ("bad_words", [4])]


def random_request(rng, tok):
    """(body, what the client does: "normal", "hang up", "late" or "bad")."""
    chat = rng.random() < 0.25
    body = {"model": NAME, "max_tokens": rng.randint(1, 40), "temperature": 0, "ignore_eos": True,
            "stream": rng.random() < 0.6}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(TEXTS)}]
    else:
        body["prompt"] = rng.choice(TEXTS) if rng.random() < 0.8 else tok(rng.choice(TEXTS)).input_ids
    kind = rng.choice(["plain", "sampled", "n", "stop", "logprobs", "eos", "min_tokens"])
    if kind == "sampled":
        body.update(temperature=0.9, top_p=0.9, seed=rng.randrange(1000))
    elif kind == "n":
        body.update(n=rng.choice([2, 3]), temperature=rng.choice([0, 1.0]), seed=7)
    elif kind == "stop":
        body["stop"] = [rng.choice(["\n", "(", " =", "):", "self"])]
    elif kind == "logprobs" and not chat:
        body["logprobs"] = 2
    elif kind == "eos":
        del body["ignore_eos"]
    elif kind == "min_tokens":
        body["min_tokens"] = body["max_tokens"]
    action = rng.choices(["normal", "hang up", "late", "bad"], [10, 3, 1, 1])[0]
    if action == "late":
        body.update(timeout=0.01 * rng.randint(1, 30), max_tokens=100)
    elif action == "bad":
        field, value = rng.choice(BAD)
        body[field] = value
    return body, action


async def client(http, url, rng, tok) -> dict:
    """One client's request and what came back: status, and the texts and finish reasons by index."""
    await asyncio.sleep(rng.random())
    body, action = random_request(rng, tok)
    chat = "messages" in body
    rec = {"body": body, "action": action, "texts": {}, "finish": {}, "lp_text": {}}
    path = url + ("/v1/chat/completions" if chat else "/v1/completions")
    if not body["stream"]:
        if action == "hang up":   # gives up waiting: the connection closes with the request in flight
            try:
                await asyncio.wait_for(http.post(path, content=json.dumps(body), headers=JSON), rng.random() / 2)
            except asyncio.TimeoutError:
                pass
            return {**rec, "status": "hung up"}
        r = await http.post(path, content=json.dumps(body), headers=JSON)
        rec["status"], answer = r.status_code, r.json()
        for c in answer.get("choices", []):
            rec["texts"][c["index"]] = c["message"]["content"] if chat else c["text"]
            rec["finish"][c["index"]] = c["finish_reason"]
        return rec
    async with http.stream("POST", path, content=json.dumps(body), headers=JSON) as r:
        rec["status"], chunks = r.status_code, 0
        hang_up_after = rng.randint(1, 5) if action == "hang up" else None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                rec["done"] = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                rec["error event"] = event["error"]
                continue
            chunks += 1
            for c in event["choices"]:
                i = c["index"]
                rec["texts"][i] = rec["texts"].get(i, "") + ((c["delta"].get("content") or "") if chat else c["text"])
                if c["finish_reason"] is not None:
                    assert i not in rec["finish"], "a completion finished twice"
                    rec["finish"][i] = c["finish_reason"]
                if c.get("logprobs") and not chat:
                    rec["lp_text"][i] = rec["lp_text"].get(i, "") + "".join(c["logprobs"]["tokens"])
            if hang_up_after is not None and chunks >= hang_up_after:
                return {**rec, "status": "hung up"}
    return rec


def check(rec, llm, tok, seats):
    body, action, status = rec["body"], rec["action"], rec["status"]
    if status in ("hung up", 429):   # 429: the queue was full, as the server may answer
        return
    if action == "bad":
        assert status == 400, rec
        return
    if status == 400 and body.get("n", 1) > seats:   # more completions than seats: refused by design
        return
    if action == "late" and (status == 504 or "error event" in rec):
        return
    assert status == 200 and "error event" not in rec, rec
    assert rec.get("done") or not body["stream"], rec
    prompt = chat_prompt(tok, body["messages"]) if "messages" in body else body["prompt"]
    kw = {k: body[k] for k in ("n", "temperature", "top_p", "seed", "stop", "max_tokens", "ignore_eos",
                               "logprobs", "min_tokens") if k in body}
    want = llm.generate([prompt], SamplingParams(**kw))[0].outputs
    assert [rec["texts"].get(c.index, "") for c in want] == [c.text for c in want], rec
    assert [rec["finish"].get(c.index) for c in want] == [c.finish_reason for c in want], rec
    if body["stream"] and body.get("logprobs"):
        assert [rec["lp_text"].get(c.index, "") for c in want] == [
            "".join(tok.decode([t]) for t in c.token_ids) for c in want]


async def crowd(url, seed, n, tok) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as http:
        records = await asyncio.gather(*(client(http, url, random.Random(seed * 1000 + i), tok) for i in range(n)))
        t0 = time.monotonic()   # a hung-up request is aborted on the engine's next turn
        while (held := (await http.get(url + "/health")).json())["requests"] or held["kv_blocks_in_use"]:
            assert time.monotonic() - t0 < 20, f"the server still holds requests or blocks: {held}"
            await asyncio.sleep(0.05)
        assert held["status"] == "ok"
    return records


@pytest.mark.parametrize("seed, process", [(0, False), (1, False), (2, False), (3, True)],
                         ids=["thread-0", "thread-1", "thread-2", "process-3"])
def test_random_concurrent_clients(bundled, seed, process):
    model, tok = bundled
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8, 16])
    kw = dict(block_size=bs, max_num_seqs=rng.choice([2, 4, 8]), num_kv_blocks=rng.choice([40, 80, 400]) // bs * 4,
              max_num_batched_tokens=rng.choice([16, 64, 512]), max_model_len=512,
              num_scheduler_steps=rng.choice([1, 2, 4]), enable_prefix_caching=rng.random() < 0.3)
    max_queue = rng.choice([8, 64])
    engine = EngineProcess(NAME, max_queue=max_queue, **kw) if process else LLMEngine(model, tok, **kw)
    with BackgroundServer(build_app(engine, NAME, max_queue=max_queue, request_timeout=120)) as s:
        records = asyncio.run(crowd(s.url, seed, 24, tok))
    if process:
        engine.close()
    llm = LLM(model=model, tokenizer=tok)
    for rec in records:
        check(rec, llm, tok, kw["max_num_seqs"])
    assert sum(r["status"] == 200 for r in records) >= 8   # the walk did reach the answers it checks
