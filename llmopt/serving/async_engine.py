"""The engine behind `llmopt serve`: requests arrive on an asyncio event loop while the engine steps
without waiting for them.

`EngineCore.turn` is one turn of the serving loop: take the new messages (add a request, abort one),
abort the requests past their deadline, run one engine step. Two ways to drive it:

- `AsyncEngine`: the core in a thread of the server's process. Simple, and what `build_app` runs for
  an `LLMEngine` (a model that exists only in memory); but the HTTP layer's Python and the engine's
  share one interpreter lock, so on a small CPU each waits for the other.
- `EngineProcess`: the core in a process of its own (as vLLM's V1 engine does), talking to the server
  through a pipe: per step, one message with the outputs of every request that got a token. The two
  interpreters run in parallel; `llmopt serve` uses this one.

Both give the server the same front end: `submit` returns an asyncio.Queue that receives the
request's `RequestOutput`s (the last one `finished`), or the exception that ended it: ValueError if
the engine rejects it, `Timeout` past its deadline (its blocks are freed), `EngineStopped` if the
engine died. `abort` cancels one (a client that went away). The event loop is woken once per step
for all the outputs of that step.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
import time
import uuid

from .engine import LLMEngine
from .sampling import SamplingParams


class Busy(Exception):
    """The server's queue is full (answered 429)."""


class Timeout(Exception):
    """A request passed its deadline (answered 504)."""


class EngineStopped(Exception):
    """The engine died (a crash, a killed process): its requests end with this, and new ones get 503."""


class EngineCore:
    """The engine plus the deadlines of its requests; `turn(messages)` returns (request id, item)
    pairs, item a `RequestOutput` or the exception that ends the request. Messages:
    ("add", request_id, prompt, SamplingParams, deadline) and ("abort", request_id)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.deadlines: dict[str, float] = {}   # the requests someone waits for (time.monotonic())

    def turn(self, messages) -> list:
        items = []
        for msg in messages:
            if msg[0] == "abort":
                self.engine.abort_request(msg[1])
                self.deadlines.pop(msg[1], None)   # its last output ("abort") goes to no one
                continue
            _, rid, prompt, params, deadline = msg
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except Exception as e:   # refused (ValueError), or a bug: either way it fails alone
                items.append((rid, e))
            else:
                self.deadlines[rid] = deadline
        now = time.monotonic()
        for rid, deadline in list(self.deadlines.items()):
            if now >= deadline:
                self.engine.abort_request(rid)
                del self.deadlines[rid]
                items.append((rid, Timeout("the request passed its deadline")))
        if self.engine.has_unfinished_requests():
            # no text here: a stream decodes what it sends, a plain answer its last output
            for out in self.engine.step(detokenize=False):
                if out.request_id in self.deadlines:
                    items.append((out.request_id, out))
                    if out.finished:
                        del self.deadlines[out.request_id]
        return items

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def kv_blocks(self) -> tuple[int, int]:
        """(blocks in use, blocks in all)."""
        b = self.engine.blocks
        return b.num_blocks - b.num_free_blocks(), b.num_blocks


class _FrontEnd:
    """What the server sees: `submit`, `abort`, `streams` (the requests in flight), `kv_blocks()`,
    `tokenizer`, `close()`. Subclasses say how a message reaches the core (`_send`)."""

    def __init__(self, tokenizer, max_queue: int):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1 (requests held at once), got {max_queue!r}")
        self.tokenizer, self.max_queue = tokenizer, max_queue
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopped: str | None = None   # why the engine died, once it has

    def submit(self, prompt, params: SamplingParams, timeout: float) -> tuple[str, asyncio.Queue]:
        if self.stopped:
            raise EngineStopped(self.stopped)
        if len(self.streams) >= self.max_queue:
            raise Busy(f"the server holds {self.max_queue} requests, its limit (--max-queue)")
        rid, q = f"cmpl-{uuid.uuid4().hex}", asyncio.Queue()
        self.streams[rid] = (asyncio.get_running_loop(), q)
        self._send(("add", rid, prompt, params, time.monotonic() + timeout))
        return rid, q

    def abort(self, rid: str) -> None:
        self.streams.pop(rid, None)
        try:
            self._send(("abort", rid))   # the core frees its KV blocks on its next turn
        except EngineStopped:   # no engine, no blocks to free
            pass

    def _route(self, items) -> None:
        """Hand one turn's items to their requests' queues: one wake-up per event loop."""
        deliveries: dict = {}
        for rid, item in items:
            target = self.streams.get(rid)
            if target is None:   # aborted meanwhile
                continue
            deliveries.setdefault(target[0], []).append((target[1], item))
            if not hasattr(item, "finished") or item.finished:
                self.streams.pop(rid, None)
        for loop, batch in deliveries.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:   # that event loop is closed: no one is waiting
                pass

    def _stop(self, why: str) -> None:
        """The engine is gone: end every request in flight with `EngineStopped`; refuse new ones."""
        self.stopped = why
        self._route([(rid, EngineStopped(why)) for rid in list(self.streams)])

    def _send(self, msg) -> None:
        raise NotImplementedError


def _deliver(batch):
    for q, item in batch:
        q.put_nowait(item)


class AsyncEngine(_FrontEnd):
    """The core in a background thread of this process."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256):
        super().__init__(engine.tokenizer, max_queue)
        self.core = EngineCore(engine)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.work = threading.Event()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="llmopt-engine", daemon=True)
        self.thread.start()

    def _send(self, msg) -> None:
        self.inbox.put(msg)
        self.work.set()

    def kv_blocks(self) -> tuple[int, int]:
        return self.core.kv_blocks()

    def _loop(self):
        try:
            while self.running:
                messages = []
                while not self.inbox.empty():
                    messages.append(self.inbox.get())
                self._route(self.core.turn(messages))
                if not self.core.busy:
                    self.work.wait(0.05)
                    self.work.clear()
        except Exception as e:   # a bug in a step: say so to every waiting client rather than hang
            self._stop(f"the engine stopped: {type(e).__name__}: {e}")

    def close(self):
        self.running = False
        self.work.set()
        self.thread.join(timeout=5)


class EngineProcess(_FrontEnd):
    """The core in a process of its own, which loads the model itself: `model` is a name or path for
    `llmopt.models.load` (a folder of `save_quantized` too), `fuse` swaps in lesson 08's fused
    modules, `engine_kw` go to `LLMEngine`, `threads` sets its PyTorch threads. A thread of this
    process receives the core's messages: per turn the items and the KV blocks in use."""

    def __init__(self, model=None, max_queue: int = 256, threads: int | None = None, fuse: bool | str = False,
                 startup_timeout: float = 300, **engine_kw):
        from .. import models

        super().__init__(models.load_tokenizer(model or models.default_model()), max_queue)
        ctx = multiprocessing.get_context("spawn")   # a fresh interpreter: no copied threads or locks
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_core_main, args=(child, model, threads, fuse, engine_kw),
                                name="llmopt-engine", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(startup_timeout):
            self.proc.kill()
            raise RuntimeError(f"the engine process did not start within {startup_timeout} s")
        kind, *info = self.conn.recv()
        if kind == "failed":   # the child's ValueError / FileNotFoundError as the same type: as in a thread
            self.proc.join(5)
            error, message = info
            user_error = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(error)
            if user_error:
                raise user_error(message)
            raise RuntimeError(f"the engine process failed to start: {error}: {message}")
        self._blocks = tuple(info)
        self._lock = threading.Lock()   # sends come from the event loop and from close()
        self.receiver = threading.Thread(target=self._receive, name="llmopt-engine-receiver", daemon=True)
        self.receiver.start()

    def _send(self, msg) -> None:
        try:
            with self._lock:
                self.conn.send(msg)
        except OSError as e:   # the process is gone (BrokenPipeError), or close() closed the pipe
            raise EngineStopped(self.stopped or f"the engine process stopped ({e})") from None

    def kv_blocks(self) -> tuple[int, int]:
        return self._blocks   # as of the core's last turn

    def _receive(self):
        while True:
            try:
                items, self._blocks = self.conn.recv()
            except (EOFError, OSError):   # the core's end of the pipe is closed: it has stopped
                break
            self._route(items)
        self.proc.join(1)
        self._stop(f"the engine process stopped (exit code {self.proc.exitcode})")

    def close(self):
        try:
            self._send(None)
        except EngineStopped:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


FUSE_MODES = {"plain": {}, "merge": {"merge": True}, "gemv": {"gemv": True}}


def load_engine(model=None, threads: int | None = None, fuse: bool | str = False, **engine_kw) -> LLMEngine:
    """An `LLMEngine` on `llmopt.models.load(model)`: `threads` PyTorch threads for this process,
    `fuse` for lesson 08's fused modules: True or "plain" (`kernels.fuse`), "merge" (q/k/v and gate/up
    merged) or "gemv" (merged, the norms and the SwiGLU inside the decode GEMVs)."""
    import torch

    from .. import models

    mode = "plain" if fuse is True else fuse
    if mode and mode not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {tuple(FUSE_MODES)} (or True/False), got {fuse!r}")
    if threads:
        torch.set_num_threads(threads)
    m, tok = models.load(model)
    if mode:
        from ..kernels import fuse as fuse_model

        fuse_model(m, **FUSE_MODES[mode])
    return LLMEngine(m, tok, **engine_kw)


def _core_main(conn, model, threads, fuse, engine_kw):
    """The engine process: load the model, then turn until told to stop (None) or the server is gone."""
    try:
        core = EngineCore(load_engine(model, threads, fuse, **engine_kw))
    except Exception as e:   # the parent raises bad input (a ValueError, a missing file) as that type again
        kind = next((t.__name__ for t in (FileNotFoundError, ValueError) if isinstance(e, t)), type(e).__name__)
        conn.send(("failed", kind, str(e)))
        return
    conn.send(("ready", *core.kv_blocks()))
    try:
        while True:
            messages, wait = [], 0 if core.busy else 0.05   # idle: sleep in poll, wake for a message
            while conn.poll(wait):
                msg = conn.recv()
                if msg is None:
                    return
                messages.append(msg)
                wait = 0
            was_busy = core.busy
            items = core.turn(messages)
            if messages or items or was_busy:
                conn.send((items, core.kv_blocks()))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):   # the server went away
        return
