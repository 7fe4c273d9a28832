"""`llmopt bench http`: concurrent clients against `llmopt serve` on loopback, beside the in-process
engine on the same workload.

`llmopt serve` is started in its own process on a free port; `concurrency` clients (asyncio + httpx)
send the workload's requests to `/v1/completions` with `stream: true` (greedy, exactly each request's
output length), recording the time to the first streamed token and to the end. Every request must
get exactly one complete answer (its `[DONE]`, finish reason "length", no request id twice). Then the
same workload runs through a fresh engine in-process (`bench.run_engine`) with the server's number of
CPU threads: the ratio of the two throughputs is what the HTTP layer costs. On a small CPU the clients
and the server's event loop share the cores with the model's math, so by default (up to 4 cores) the
server's PyTorch gets one core fewer than the machine has; the in-process engine is also run on every
core, and that ratio is reported too.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

from .bench import _percentiles, chat_workload, run_engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving `app` from a thread, on 127.0.0.1 and a free port."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class SubprocessServer:
    """`llmopt serve` in its own process (its own interpreter, as in a deployment), on a free port."""

    def __init__(self, model: str, max_num_seqs: int, max_queue: int, threads: int | None = None):
        self.port = _free_port()
        self.args = [sys.executable, "-m", "llmopt.cli", "serve", "--model", model, "--port", str(self.port),
                     "--max-num-seqs", str(max_num_seqs), "--max-queue", str(max_queue)]
        if threads:
            self.args += ["--threads", str(threads)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=5).json()

    def __enter__(self):
        import httpx

        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmopt serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                self.health()
                return self
            except httpx.HTTPError:
                if time.monotonic() - t0 > 120:
                    raise RuntimeError("llmopt serve did not answer /health within 120 s") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _client_run(url: str, model: str, reqs, concurrency: int, timeout: float, stream: bool = True):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results = [None] * len(reqs)
    t0 = time.perf_counter()

    async def one(i, r, client):
        async with sem:
            start = time.perf_counter()
            body = {"model": model, "prompt": r.prompt_ids, "max_tokens": r.output_len, "temperature": 0,
                    "ignore_eos": True, "stream": stream}
            if not stream:   # one JSON answer: the client's own cost is one parse per request
                resp = await client.post(f"{url}/v1/completions", json=body)
                end = time.perf_counter()
                ok = resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length"
                results[i] = {"ok": ok, "id": resp.json().get("id") if ok else None, "ttft": None,
                              "latency": end - start, "total": end - t0}
                return
            first, head, last, done = None, None, None, False
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    results[i] = {"ok": False, "status": resp.status_code, "body": (await resp.aread()).decode()}
                    return
                async for line in resp.aiter_lines():   # only the first and last chunks are parsed: a client
                    if not line.startswith("data: "):   # that parsed every token would measure itself
                        continue
                    if line == "data: [DONE]":
                        done = True
                    elif head is None:
                        first, head = time.perf_counter(), line
                    else:
                        last = line
            end = time.perf_counter()
            head, last = json.loads(head[6:]) if head else {}, json.loads((last or head)[6:]) if head else {}
            ok = done and last.get("id") == head.get("id") and last["choices"][0]["finish_reason"] == "length"
            results[i] = {"ok": ok, "id": head.get("id"), "ttft": (first or end) - t0, "latency": end - start,
                          "total": end - t0}

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(one(i, r, client) for i, r in enumerate(reqs)))
    return results, time.perf_counter() - t0


def default_server_threads() -> int | None:
    """All cores but one on a CPU of up to 4 cores (None, PyTorch's default, on a bigger one)."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if cores <= 4 else None


def http_benchmark(model_name=None, n: int = 256, concurrency: int = 32, seed: int = 0, prompt_range=(16, 256),
                   output_range=(16, 128), timeout: float = 600, compare: bool = True, stream: bool = True,
                   threads: int | None = -1, **engine_kw) -> dict:
    """`threads`: the server's CPU threads (-1: `default_server_threads()`; None: PyTorch's default)."""
    import torch

    from .. import bench as harness
    from .. import data, models

    threads = default_server_threads() if threads == -1 else threads
    model, tok = models.load(model_name)
    model.eval()
    name = str(model_name or models.default_model())
    reqs = chat_workload(n, data.token_stream("test", tok), seed, prompt_range, output_range)
    engine_kw.setdefault("max_num_seqs", concurrency)
    with SubprocessServer(name, engine_kw["max_num_seqs"], max(256, n), threads) as server:
        results, wall = asyncio.run(_client_run(server.url, name, reqs, concurrency, timeout, stream))
        leftover = server.health()["kv_blocks_in_use"]
    ok = [r for r in results if r and r["ok"]]
    gen = sum(r.output_len for r in reqs)
    out = {"model": name, "env": harness.environment(), "requests": n, "concurrency": concurrency,
           "answered": len(ok), "duplicate_ids": len(ok) - len({r["id"] for r in ok}),
           "failed": [r for r in results if not (r and r["ok"])][:5], "kv_blocks_in_use_after": leftover,
           "wall_s": wall, "tokens_per_s": gen / wall, "requests_per_s": n / wall,
           "stream": stream, "server_threads": threads or torch.get_num_threads(),
           "ttft_s": _percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
           "latency_s": _percentiles([r["latency"] for r in ok])}
    if compare:
        every = torch.get_num_threads()
        try:   # the same engine as the server's: its threads
            torch.set_num_threads(out["server_threads"])
            out["in_process_tokens_per_s"] = run_engine(model, tok, reqs, **engine_kw)["tokens_per_s"]
        finally:
            torch.set_num_threads(every)
        out["http_vs_in_process"] = out["tokens_per_s"] / out["in_process_tokens_per_s"]
        if out["server_threads"] != every:
            out["in_process_all_threads_tokens_per_s"] = run_engine(model, tok, reqs, **engine_kw)["tokens_per_s"]
            out["http_vs_in_process_all_threads"] = out["tokens_per_s"] / out["in_process_all_threads_tokens_per_s"]
    return out


def format_http(r: dict) -> str:
    lines = [f"{r['model']}: {r['requests']} requests from {r['concurrency']} concurrent clients over HTTP "
             f"({'streaming ' if r['stream'] else ''}/v1/completions), server on {r['server_threads']} CPU threads",
             f"answered completely: {r['answered']}/{r['requests']}, duplicate ids: {r['duplicate_ids']}, "
             f"KV blocks still held after: {r['kv_blocks_in_use_after']}",
             f"{r['tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s; "
             + (f"TTFT p50/p90/p99 {r['ttft_s']['p50']:.2f}/{r['ttft_s']['p90']:.2f}/{r['ttft_s']['p99']:.2f} s; "
                if r["ttft_s"] else "")
             + f"latency p50/p90/p99 {r['latency_s']['p50']:.2f}/{r['latency_s']['p90']:.2f}/"
               f"{r['latency_s']['p99']:.2f} s"]
    if "in_process_tokens_per_s" in r:
        lines.append(f"in-process engine on the same workload and threads: {r['in_process_tokens_per_s']:.1f} tok/s; "
                     f"HTTP / in-process = {r['http_vs_in_process']:.2f}")
    if "in_process_all_threads_tokens_per_s" in r:
        lines.append(f"in-process engine on every core: {r['in_process_all_threads_tokens_per_s']:.1f} tok/s; "
                     f"HTTP / that = {r['http_vs_in_process_all_threads']:.2f}")
    return "\n".join(lines)


def main(model=None, n: int = 256, concurrency: int = 32, json_path=None, seed: int = 0, threads: int | None = -1,
         stream: bool = True) -> dict:
    r = http_benchmark(model, n=n, concurrency=concurrency, seed=seed, threads=-1 if threads is None else threads,
                       stream=stream)
    print(format_http(r))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=1, default=str)
        print(f"saved {json_path}")
    return r
