"""`llmopt bench http`: concurrent clients against `llmopt serve` on loopback, beside the in-process
engine on the same workload.

`llmopt serve` is started in its own process on a free port; `concurrency` clients (plain asyncio
sockets, each on a keep-alive connection) send the workload's requests to `/v1/completions` with
`stream: true` (greedy, exactly each request's output length), recording the time to the first
streamed token and to the end. Every request must get exactly one complete answer (one request id in
all its events, finish reason "length", a final `[DONE]`; no request id twice), checked after the
timed run. Then the same workload runs through a fresh engine in-process (`bench.run_engine`) on the
server's number of CPU threads: the ratio of the two throughputs is what the HTTP layer costs. The
clients run on the same machine, so on a small CPU part of that cost is theirs.
"""
from __future__ import annotations

import asyncio
import json
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

    def __init__(self, model: str, max_num_seqs: int, max_queue: int, threads: int | None = None,
                 engine_thread: bool = False, fuse: bool | str = False, name: str | None = None):
        self.port = _free_port()
        self.args = [sys.executable, "-m", "llmopt.cli", "serve", "--model", model, "--port", str(self.port),
                     "--max-num-seqs", str(max_num_seqs), "--max-queue", str(max_queue)]
        if name:
            self.args += ["--served-model-name", name]
        if threads:
            self.args += ["--threads", str(threads)]
        self.args += ["--engine-thread"] * engine_thread
        if fuse:
            self.args += ["--fuse"] if fuse is True else ["--fuse", fuse]

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


async def _post(reader, writer, host: str, path: str, body: dict) -> tuple[int, list[tuple[float, bytes]]]:
    """One HTTP/1.1 POST on an open keep-alive connection: (status, [(arrival time, body chunk)])."""
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(None, 2)[1])
    chunks = []
    if "transfer-encoding: chunked" in head:
        while True:   # a chunk: its size in hex, CRLF, the bytes, CRLF; the last one has size 0
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
            chunks.append((time.perf_counter(), chunk))
    else:
        length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
        chunks.append((time.perf_counter(), await reader.readexactly(length)))
    return status, chunks


def _check_answer(status: int, body: bytes, stream: bool) -> tuple[bool, str | None]:
    """Is this one complete answer (status 200, finish reason "length", a stream: every event of one
    request id and a final [DONE])? Returns (ok, request id)."""
    if status != 200:
        return False, None
    if not stream:
        r = json.loads(body)
        return r["choices"][0]["finish_reason"] == "length", r.get("id")
    events = [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]
    if len(events) < 2 or events[-1] != "[DONE]":
        return False, None
    chunks = [json.loads(e) for e in events[:-1]]
    ids = {c["id"] for c in chunks}
    return len(ids) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "length", ids.pop()


async def _client_run(url: str, model: str, reqs, concurrency: int, timeout: float, stream: bool = True):
    """`concurrency` clients, each on its own keep-alive connection, take the requests in turn, for at
    most `timeout` seconds in all. The clients only read while the run is timed (a plain asyncio
    socket, no HTTP library: on a small CPU the load generator shares the cores with the server);
    every answer is checked afterwards."""
    host, port = url.split("//", 1)[1].split(":")
    todo = iter(enumerate(reqs))
    raw = [None] * len(reqs)
    t0 = time.perf_counter()

    async def client():
        conn = None
        try:
            for i, r in todo:
                body = {"model": model, "prompt": r.prompt_ids, "max_tokens": r.output_len, "temperature": 0,
                        "ignore_eos": True, "stream": stream}
                start = time.perf_counter()
                try:
                    conn = conn or await asyncio.open_connection(host, int(port))
                    raw[i] = (start, *await _post(*conn, f"{host}:{port}", "/v1/completions", body), None)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    raw[i] = (start, None, [], f"{type(e).__name__}: {e}")   # lost; go on with a new connection
                    if conn:
                        conn[1].close()
                    conn = None
        finally:
            if conn:
                conn[1].close()

    try:   # the run's time bound: what is not answered by then counts as lost
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(min(concurrency, len(reqs))))), timeout)
    except asyncio.TimeoutError:
        pass
    wall = time.perf_counter() - t0
    results = []
    for item in raw:
        start, status, chunks, error = item or (t0, None, [], f"no answer within the run's bound of {timeout} s")
        end = chunks[-1][0] if chunks else start
        ok, rid = _check_answer(status, b"".join(c for _, c in chunks), stream) if error is None else (False, None)
        results.append({"ok": ok, "id": rid, "status": status, "error": error, "latency": end - start,
                        "total": end - t0, "ttft": chunks[0][0] - start if stream and chunks else None})
    return results, wall


def http_benchmark(model_name=None, n: int = 256, concurrency: int = 32, seed: int = 0, prompt_range=(16, 256),
                   output_range=(16, 128), timeout: float = 600, compare: bool = True, stream: bool = True,
                   threads: int | None = None, engine_thread: bool = False, repeats: int = 1, **engine_kw) -> dict:
    """`timeout`: each run's time bound, seconds (requests not answered by then count as lost).
    `threads`: the server's CPU threads (None: PyTorch's default, one per core). `engine_thread`:
    the engine in a thread of the server's process, not its own. `repeats`: runs of the workload over
    HTTP, each followed by one in-process (a shared machine drifts: the two are interleaved and the
    medians compared)."""
    import statistics

    import torch

    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    from .. import bench as harness
    from .. import data, models

    model, tok = models.load(model_name)
    model.eval()
    name = str(model_name or models.default_model())
    reqs = chat_workload(n, data.token_stream("test", tok), seed, prompt_range, output_range)
    gen = sum(r.output_len for r in reqs)
    engine_kw.setdefault("max_num_seqs", concurrency)
    threads = threads or torch.get_num_threads()
    runs, in_process, answered, duplicates, failed, leftover = [], [], [], [], [], []
    with SubprocessServer(name, engine_kw["max_num_seqs"], max(256, n), threads, engine_thread) as server:
        for _ in range(repeats):
            results, wall = asyncio.run(_client_run(server.url, name, reqs, concurrency, timeout, stream))
            leftover.append(server.health()["kv_blocks_in_use"])
            ok = [r for r in results if r["ok"]]
            answered.append(len(ok))
            duplicates.append(len(ok) - len({r["id"] for r in ok}))
            failed += [r for r in results if not r["ok"]][:5]
            runs.append({"wall_s": wall, "tokens_per_s": gen / wall, "requests_per_s": n / wall,
                         "ttft_s": _percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
                         "latency_s": _percentiles([r["latency"] for r in ok])})
            if compare:   # the same engine as the server's, on its threads, with nothing else running
                every = torch.get_num_threads()
                try:
                    torch.set_num_threads(threads)
                    in_process.append(run_engine(model, tok, reqs, **engine_kw)["tokens_per_s"])
                finally:
                    torch.set_num_threads(every)
    median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    out = {"model": name, "env": harness.environment(), "requests": n, "concurrency": concurrency,
           "stream": stream, "server_threads": threads, "engine_thread": engine_thread, "repeats": repeats,
           "answered": min(answered), "duplicate_ids": max(duplicates), "failed": failed[:5],
           "kv_blocks_in_use_after": max(leftover), **median, "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}
    if compare:
        out["in_process_tokens_per_s"] = statistics.median(in_process)
        out["in_process_runs_tokens_per_s"] = in_process
        out["http_vs_in_process"] = statistics.median(r["tokens_per_s"] for r in runs) / out["in_process_tokens_per_s"]
    return out


def format_http(r: dict) -> str:
    lat, error = r["latency_s"], (r.get("failed") or [{}])[0].get("error")
    latency = (f"latency p50/p90/p99 {lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f} s" if lat else
               "no request answered" + (f" (the first failure: {error})" if error else ""))
    lines = [f"{r['model']}: {r['requests']} requests from {r['concurrency']} concurrent clients over HTTP "
             f"({'streaming ' if r['stream'] else ''}/v1/completions), server on {r['server_threads']} CPU threads"
             + (", the engine in a thread of the server's process" if r["engine_thread"] else
                ", the engine in a process of its own"),
             f"answered completely: {r['answered']}/{r['requests']}, duplicate ids: {r['duplicate_ids']}, "
             f"KV blocks still held after: {r['kv_blocks_in_use_after']}",
             f"{r['tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s; "
             + (f"TTFT p50/p90/p99 {r['ttft_s']['p50']:.2f}/{r['ttft_s']['p90']:.2f}/{r['ttft_s']['p99']:.2f} s; "
                if r["ttft_s"] else "")
             + latency]
    if r["repeats"] > 1:
        lines.append("the median of " + ", ".join(f"{x:.1f}" for x in r["runs_tokens_per_s"]) + " tok/s")
    if "in_process_tokens_per_s" in r:
        lines.append(f"in-process engine on the same workload and threads: {r['in_process_tokens_per_s']:.1f} tok/s"
                     + (" (median of " + ", ".join(f"{x:.1f}" for x in r["in_process_runs_tokens_per_s"]) + ")"
                        if r["repeats"] > 1 else "") + f"; HTTP / in-process = {r['http_vs_in_process']:.2f}")
    return "\n".join(lines)


def main(model=None, n: int = 256, concurrency: int = 32, json_path=None, seed: int = 0, threads: int | None = None,
         stream: bool = True, engine_thread: bool = False, repeats: int = 3, time_limit: float = 600) -> dict:
    r = http_benchmark(model, n=n, concurrency=concurrency, seed=seed, threads=threads, stream=stream,
                       engine_thread=engine_thread, repeats=repeats, timeout=time_limit)
    print(format_http(r))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=1, default=str)
        print(f"saved {json_path}")
    return r
