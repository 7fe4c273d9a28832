"""`llmopt bench serve`: one workload through three servers, side by side in one run.

- HF `generate`, one request at a time (what a naive server does);
- HF `generate` with padded static batches of `batch_size` requests in arrival order: each batch
  is left-padded to its longest prompt and runs until its longest output is done;
- the llmopt engine (paged KV cache, continuous batching, chunked prefill, prefix caching).

The workload is chat-like: prompt and output lengths drawn from long-tailed (log-normal)
distributions clipped to [16, 512] and [16, 256] tokens by default, prompts taken from the test
split, every request run to exactly its output length (`ignore_eos`), all submitted at time 0
(offline throughput, as vLLM's `benchmark_throughput`). Reported per server: tokens/s (generated
tokens), requests/s, time to first token and time per output token (p50/p90/p99), and the KV cache's
reserved-but-unused share ("waste"): for the engine, summed over all its steps (prefill and decode)
before dividing; for the padded static batches, over their decode steps.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass

import torch

from .. import bench
from .engine import LLMEngine
from .sampling import SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: int


def chat_workload(n: int, tokens: torch.Tensor, seed: int = 0, prompt_range=(16, 512), output_range=(16, 256),
                  shared_prefix: int = 0) -> list[Request]:
    """`n` requests with log-normal prompt/output lengths (median about 3x the minimum, a long tail),
    prompts cut from `tokens` (a 1-D token stream). `shared_prefix` > 0 makes the first
    `shared_prefix` tokens of every prompt the same (a system prompt): they replace the start of the
    drawn prompt, so the lengths keep their distribution, and a prompt drawn shorter than the prefix
    keeps one token of its own (prompts are then at least shared_prefix + 1 tokens)."""
    if shared_prefix < 0:
        raise ValueError(f"shared_prefix must be >= 0 tokens, got {shared_prefix}")
    rng = random.Random(seed)

    def length(lo, hi):
        return int(min(hi, max(lo, round(lo * math.exp(rng.gauss(1.1, 0.7))))))

    system = tokens[:shared_prefix].tolist()
    reqs = []
    for _ in range(n):
        p = length(*prompt_range)
        start = rng.randrange(shared_prefix, len(tokens) - p)
        body = tokens[start:start + max(1, p - shared_prefix)].tolist()
        reqs.append(Request(system + body, length(*output_range)))
    return reqs


def _percentiles(xs) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": sum(xs) / len(xs)}


def _summary(name, reqs, wall, ttft, tpot, waste, extra=None) -> dict:
    gen = sum(r.output_len for r in reqs)
    return {"system": name, "requests": len(reqs), "generated_tokens": gen, "wall_s": wall, "tokens_per_s": gen / wall,
            "requests_per_s": len(reqs) / wall, "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot),
            "kv_waste": waste, **(extra or {})}


class _StepClock:
    """A `generate` streamer that records when each step's tokens come out."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def run_hf_single(model, reqs: list[Request]) -> dict:
    dev = next(model.parameters()).device
    ttft, tpot, t0 = [], [], time.perf_counter()
    for r in reqs:
        ids = torch.tensor([r.prompt_ids], device=dev)
        clock = _StepClock()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.output_len,
                       min_new_tokens=r.output_len, do_sample=False, pad_token_id=0, streamer=clock)
        end = time.perf_counter()
        first = clock.times[1] if len(clock.times) > 1 else end    # put #0 is the prompt itself
        ttft.append(first - t0)                                      # all requests arrived at t0
        tpot.append((end - first) / max(1, r.output_len - 1))
    return _summary("HF generate, one request at a time", reqs, time.perf_counter() - t0, ttft, tpot, 0.0)


@torch.inference_mode()
def run_hf_static(model, reqs: list[Request], batch_size: int) -> dict:
    dev = next(model.parameters()).device
    ttft, tpot, used, reserved, t0 = [], [], 0, 0, time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        group = reqs[i:i + batch_size]
        P = max(len(r.prompt_ids) for r in group)
        N = max(r.output_len for r in group)
        ids = torch.zeros(len(group), P, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(group):                                # left padding
            ids[j, P - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, P - len(r.prompt_ids):] = 1
        clock = _StepClock()
        model.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                       pad_token_id=0, streamer=clock)
        end = time.perf_counter()
        first = clock.times[1] if len(clock.times) > 1 else end
        for r in group:
            ttft.append(first - t0)
            tpot.append((end - first) / max(1, r.output_len - 1))  # the batch returns when its longest is done
        for t in range(N):                                           # the padded cache at each decode step
            reserved += len(group) * (P + t)
            used += sum(len(r.prompt_ids) + min(t, r.output_len) for r in group)
    waste = 1 - used / reserved if reserved else 0.0
    return _summary(f"HF generate, static batches of {batch_size}", reqs, time.perf_counter() - t0, ttft, tpot, waste)


def run_engine(model, tokenizer, reqs: list[Request], **engine_kw) -> dict:
    engine = LLMEngine(model, tokenizer, **engine_kw)
    t0 = time.perf_counter()
    ids = [engine.add_request(r.prompt_ids, SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
           for r in reqs]
    final = engine.run()
    wall = time.perf_counter() - t0
    ttft, tpot = [], []
    for rid, r in zip(ids, reqs):
        m = final[rid].metrics
        ttft.append(m["first_token_time"] - t0)
        tpot.append((m["finished_time"] - m["first_token_time"]) / max(1, r.output_len - 1))
    s = engine.stats
    extra = {"steps": s.steps, "preemptions": s.preemptions, "computed_tokens": s.computed_tokens,
             "cached_tokens": s.cached_tokens, "kv_blocks": engine.blocks.num_blocks,
             "block_size": engine.blocks.block_size, "kv_cache_MB": engine.runner.cache_bytes / 1e6,
             "kv_peak_usage": s.kv_reserved_peak / (engine.blocks.num_blocks * engine.blocks.block_size)}
    return _summary("llmopt engine (paged, continuous batching)", reqs, wall, ttft, tpot, engine.kv_waste(), extra)


def teacher_forced(engine: LLMEngine, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' prefill through `engine` with `prompt_logprobs=1`, nothing generated: at every
    position after the first, the model's top token and the log-probability it gave the real next
    token. Two engines that differ in one thing (an FP8 KV cache, a quantized model) compared on the
    same prompts say how much that thing moves the predictions: top-token agreement, log-probability
    drift, perplexity (exp of the mean negative log-probability)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    ids = [engine.add_request(list(p), params) for p in prompts]
    final = engine.run()
    tops, logprobs = [], []
    for rid, prompt in zip(ids, prompts):
        for token, entry in zip(prompt[1:], final[rid].prompt_logprobs[1:]):
            tops.append(next(t for t, lp in entry.items() if lp.rank == 1))
            logprobs.append(entry[token].logprob)
    return torch.tensor(tops), torch.tensor(logprobs)


def serve_benchmark(model_name=None, n: int = 64, batch_size: int = 16, seed: int = 0, device=None,
                    systems=("single", "static", "engine"), prompt_range=(16, 512), output_range=(16, 256),
                    shared_prefix: int = 0, repeats: int = 1, **engine_kw) -> dict:
    """The workload through each of `systems`, `repeats` times, interleaved (system by system, then
    again: a shared machine's speed drifts); per system the run with the median throughput, and
    every run's tokens/s in `runs_tokens_per_s`."""
    from .. import data, models

    model, tok = models.load(model_name, device=device)
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None)
    if context and shared_prefix + 1 + output_range[1] > context:
        raise ValueError(f"shared_prefix ({shared_prefix}) + 1 + the longest output ({output_range[1]}) must fit "
                         f"the model's context ({context} tokens)")
    stream = data.token_stream("test", tok)
    reqs = chat_workload(n, stream, seed, prompt_range, output_range, shared_prefix)
    engine_kw.setdefault("max_num_seqs", batch_size)   # the same batch size as the static batches
    out = {"model": model_name or models.default_model(), "device": str(next(model.parameters()).device),
           "dtype": str(next(model.parameters()).dtype), "env": bench.environment(), "workload": {
               "requests": n, "prompt_tokens": [len(r.prompt_ids) for r in reqs],
               "output_tokens": [r.output_len for r in reqs], "shared_prefix": shared_prefix, "seed": seed},
           "repeats": repeats, "results": []}

    def variant(label, **kw):
        def run():
            r = run_engine(model, tok, reqs, **{**engine_kw, **kw})
            r["system"] += label
            return r
        return run

    runners = {"single": lambda: run_hf_single(model, reqs), "static": lambda: run_hf_static(model, reqs, batch_size),
               "engine": lambda: run_engine(model, tok, reqs, **engine_kw),
               "engine-no-prefix-cache": variant(", no prefix caching", enable_prefix_caching=False),
               "engine-multistep": variant(", 8 steps a sync", num_scheduler_steps=8),
               "engine-fp8": variant(", FP8 KV cache", kv_cache_dtype="fp8"),
               "engine-compiled": variant(", torch.compile", compilation_config=3)}
    runs = {name: [] for name in systems if name in runners}
    for _ in range(repeats):
        for name, rs in runs.items():
            rs.append(runners[name]())
    for rs in runs.values():
        median = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        out["results"].append({**median, "runs_tokens_per_s": [r["tokens_per_s"] for r in rs]})
    return out


def format_results(result: dict) -> str:
    w = result["workload"]
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}): {w['requests']} requests, prompts "
             f"{min(w['prompt_tokens'])}-{max(w['prompt_tokens'])} tokens, outputs {min(w['output_tokens'])}-"
             f"{max(w['output_tokens'])}" + (f", shared prefix {w['shared_prefix']}" if w["shared_prefix"] else ""),
             "system | tok/s | req/s | TTFT p50 / p90 s | TPOT p50 / p90 ms | KV waste | tokens computed"]
    if result.get("repeats", 1) > 1:
        lines[1] = lines[1].replace("tok/s", f"tok/s (median of {result['repeats']} runs: each run)", 1)
    for r in result["results"]:
        runs = r.get("runs_tokens_per_s", [])
        each = f" ({', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else ""
        lines.append(f"{r['system']} | {r['tokens_per_s']:.1f}{each} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p90']:.2f} | "
                     f"{r['tpot_s']['p50'] * 1e3:.1f} / {r['tpot_s']['p90'] * 1e3:.1f} | {r['kv_waste']:.1%} | "
                     f"{r.get('computed_tokens', '-')}")
    base = result["results"][0]["tokens_per_s"]
    lines.append("throughput vs the first: " + ", ".join(f"{r['tokens_per_s'] / base:.2f}x" for r in result["results"]))
    return "\n".join(lines)


def plot_results(result: dict, path=None):
    from ..report import _finish, _pyplot

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [r["system"].replace(" (", "\n(").replace(", ", ",\n", 1) for r in result["results"]]
    a.barh(names, [r["tokens_per_s"] for r in result["results"]], color="tab:blue")
    a.set_xlabel("generated tokens / s")
    a.invert_yaxis()
    for r in result["results"]:
        b.plot([50, 90, 99], [r["ttft_s"][k] for k in ("p50", "p90", "p99")], "o-", label=r["system"])
    b.set_xlabel("percentile")
    b.set_ylabel("time to first token, s")
    b.legend(fontsize=8)
    return _finish(fig, a, path)


def main(model=None, n: int = 64, batch_size: int = 16, json_path=None, plot_path=None, shared_prefix: int = 0,
         systems=("single", "static", "engine"), seed: int = 0, block_size: int = 16, repeats: int = 1,
         kv_cache_memory: int | None = None, device=None) -> dict:
    """`llmopt bench serve`. `kv_cache_memory`: the engines' KV cache in bytes (default: room for every
    sequence at once), e.g. small enough that an FP8 cache (`engine-fp8`) admits more than float32."""
    kw = {} if kv_cache_memory is None else {"kv_cache_memory": kv_cache_memory}
    result = serve_benchmark(model, n=n, batch_size=batch_size, shared_prefix=shared_prefix, systems=systems,
                             seed=seed, block_size=block_size, repeats=repeats, device=device, **kw)
    print(format_results(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"saved {json_path}")
    if plot_path:
        plot_results(result, plot_path)
        print(f"saved {plot_path}")
    return result


# --------------------------------------------------------------------------- decode speed (`llmopt bench decode`)

def _engine_for(model, tokenizer, max_batch: int, max_tokens: int, block_size: int = 16, **kw) -> LLMEngine:
    """An engine whose KV cache holds `max_batch` sequences of `max_tokens` (not 90% of the GPU)."""
    blocks = max_batch * -(-max_tokens // block_size) + max_batch
    return LLMEngine(model, tokenizer, block_size=block_size, num_kv_blocks=blocks, max_num_seqs=max_batch,
                     enable_prefix_caching=False, **kw)


def decode_benchmark(model_name=None, batch_sizes=(1, 32), prompt_len: int = 32, new_tokens: int = 128,
                     repeats: int = 3, device=None, dtype=None,
                     systems=("hf", "eager", "graphs", "fused", "w4-fused"),
                     group_size: int = 128, scheduler_steps: int = 8) -> dict:
    """Greedy decode speed of one model on `bench.generation`'s harness (the one behind the tour's
    rows): HF `generate`; the engine without and with CUDA graphs; the engine serving the model with
    lesson 08's fused kernels (same weights; "merged": also q/k/v and gate/up merged into one
    projection each); and serving it quantized to W4 (RTN, groups of `group_size`) with the fused and
    W4A16 kernels ("w4-fused", "w4-merged"); "gemv": fused and merged, with the norms and the SwiGLU
    inside the decode matmuls (`fuse(gemv=True)`); "graphs-multistep", "multistep" (fused and merged),
    "gemv-multistep" and "w4-multistep" (W4, fused and merged) add multi-step decoding
    (`num_scheduler_steps=scheduler_steps`), "w4-compiled" that with the step compiled; "compiled" and
    "compiled-multistep" the plain model's decode step compiled by `torch.compile` (`compilation_config=3`;
    the first steps of each batch size wait for the compiler, as a warm-up run does); "gemv-pdl" and
    "gemv-multistep-pdl" are the gemv ones with the decode kernels launched by programmatic dependent
    launch (`kernels.common.set_pdl`, on for that engine only; in the same process the block configs
    picked for "gemv" are reused, not timed again).
    CUDA graphs wherever there is a GPU.
    Batch-1 rows also carry the share of the decode floor (weight bytes / measured bandwidth)."""
    import copy

    from .. import models
    from .engine import generate_fn

    model, tok = models.load(model_name, device=device, dtype=dtype)
    model.eval()
    dev = next(model.parameters()).device
    bw = bench.memory_bandwidth(dev)
    from ..kernels import common

    out = {"model": model_name or models.default_model(), "device": str(dev),
           "dtype": str(next(model.parameters()).dtype), "env": bench.environment(),
           "programmatic_dependent_launch": common.pdl(next(model.parameters())),
           "copy_bandwidth_GBps": bw / 1e9, "prompt_len": prompt_len,
           "new_tokens": new_tokens, "rows": []}
    max_b, max_tokens = max(batch_sizes), prompt_len + new_tokens
    runs = []
    if "hf" in systems:
        runs.append(("HF generate", model, None))
    if "eager" in systems:
        runs.append(("llmopt engine, eager", model, {"enforce_eager": True}))
    graphs = ", CUDA graphs" if dev.type == "cuda" else ""
    multi = {"num_scheduler_steps": scheduler_steps}
    steps = f", {scheduler_steps} steps a sync"
    if "graphs" in systems:
        if dev.type == "cuda":
            runs.append(("llmopt engine, CUDA graphs", model, {}))
        else:
            print("graphs: skipped (CUDA graphs need a GPU)", flush=True)
    if "graphs-multistep" in systems:
        runs.append(("llmopt engine" + graphs + steps, model, multi))
    for variant, kw in (("compiled", {}), ("compiled-multistep", multi)):
        if variant in systems:
            runs.append(("llmopt engine, torch.compile" + graphs + (steps if kw else ""), model,
                         {"compilation_config": 3, **kw}))
    from ..kernels.fuse import fuse

    if "fused" in systems:
        runs.append(("llmopt engine, fused kernels" + graphs, fuse(copy.deepcopy(model)), {}))
    for variant, kw in (("merged", {}), ("multistep", multi)):
        if variant in systems:
            runs.append(("llmopt engine, fused kernels, merged qkv / gate-up" + graphs + (steps if kw else ""),
                         fuse(copy.deepcopy(model), merge=True), kw))
    pdl = {"pdl": True}
    for variant, kw in (("gemv", {}), ("gemv-multistep", multi), ("gemv-pdl", pdl),
                        ("gemv-multistep-pdl", {**multi, **pdl})):
        if variant in systems:
            runs.append(("llmopt engine, fused kernels, norm + SwiGLU in the GEMVs" + graphs
                         + (steps if "num_scheduler_steps" in kw else "")
                         + ((", programmatic dependent launch" + ("" if dev.type == "cuda" else " (needs a GPU)"))
                            if "pdl" in kw else ""),
                         fuse(copy.deepcopy(model), gemv=True), kw))
    for variant, merge, kw in (("w4-fused", False, {}), ("w4-merged", True, {}), ("w4-multistep", True, multi),
                               ("w4-compiled", True, {"compilation_config": 3, **multi})):
        if variant in systems:
            from ..quant import QuantConfig, quantize

            w4 = fuse(quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=group_size)), merge=merge)
            runs.append(("llmopt engine, W4 + fused kernels" + (", merged qkv / gate-up" if merge else "")
                         + (", torch.compile" if "compilation_config" in kw else "") + graphs
                         + (steps if "num_scheduler_steps" in kw else ""), w4, kw))
    pdl_before = common.pdl_enabled()
    try:
        for name, m, kw in runs:
            kw = None if kw is None else dict(kw)
            common.set_pdl(kw.pop("pdl", pdl_before) if kw is not None else pdl_before)
            fn = None if kw is None else generate_fn(_engine_for(m, tok, max_b, max_tokens, **kw))
            for b in batch_sizes:
                r = bench.generation(m, b, prompt_len, new_tokens, repeats=repeats, generate_fn=fn)
                row = {"system": name, "batch": b, "tok_s": r.tokens_per_s, "ttft_ms": r.ttft_s * 1e3,
                       "tpot_ms": r.tpot_s * 1e3, "weight_MB": bench.weight_bytes(m) / 1e6,
                       "programmatic_dependent_launch": common.pdl(next(m.parameters()))}
                if b == 1 and r.tpot_s > 0:   # <= 0: the 1-token run's noise outweighed the rest (few repeats)
                    roof = bench.decode_roofline(m, r.tpot_s, bw)
                    row["floor_tok_s"], row["fraction_of_floor"] = roof.floor_tokens_per_s, roof.fraction_of_floor
                out["rows"].append(row)
                print(format_decode_row(row), flush=True)
            if kw is not None:
                del fn
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        common.set_pdl(pdl_before)
    return out


def decode_time_split(model, tokenizer, batch: int = 1, num_scheduler_steps: int = 1, new_tokens: int = 128,
                      prompt_len: int = 32) -> dict:
    """Where a decode step's time goes, on any device: `batch` greedy requests run to `new_tokens`, with
    the model's decode forward (`ModelRunner._forward_decode`, the part a CUDA graph replays) timed
    apart from everything else the engine does per token (scheduling, inputs, sampling, bookkeeping;
    with multi-step decoding also the in-graph token pick). Milliseconds per decode step; on a GPU
    each forward is followed by a sync, so both parts are device time plus host time, not overlapped."""
    engine = _engine_for(model, tokenizer, batch, prompt_len + new_tokens, enforce_eager=True,
                         num_scheduler_steps=num_scheduler_steps)
    runner, spent = engine.runner, [0.0]
    forward = runner._forward_decode
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda *a: None)

    def timed(*args):
        sync()
        t = time.perf_counter()
        out = forward(*args)
        sync()
        spent[0] += time.perf_counter() - t
        return out
    runner._forward_decode = timed
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request([(7 * i + j) % 1000 + 3 for j in range(prompt_len)], params)
    engine.step()                                   # the prefill: not a decode step
    spent[0], start = 0.0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step(detokenize=False)
    wall, steps = time.perf_counter() - start, new_tokens - 1
    return {"batch": batch, "num_scheduler_steps": num_scheduler_steps, "ms_per_step": wall / steps * 1e3,
            "forward_ms": spent[0] / steps * 1e3, "rest_ms": (wall - spent[0]) / steps * 1e3}


def decode_profile(model, tokenizer, batch: int = 1, context: int = 96, steps: int = 20, top: int = 12) -> dict:
    """Where a decode step's time goes, measured three ways (milliseconds per step):

    - `engine_ms`: a whole engine step, host and device, as `llmopt bench decode` sees it;
    - `replay_ms`: the device alone running the step: its CUDA graph replayed back to back (without
      a GPU, or with `enforce_eager`: the eager forward);
    - `kernels_ms`: the summed device time of the kernels one eager forward launches (torch.profiler),
      with `kernels` (how many) and `top` (the costliest by total time: name, calls, ms per step).

    replay - kernels is the idle time between kernels inside the graph; engine - replay is the host's
    share. `batch` requests, each `context` tokens into its sequence. On a CPU the "kernels" are
    PyTorch ops and their self CPU time."""
    engine = _engine_for(model, tokenizer, batch, context + 4 * steps + 8)
    params = SamplingParams(temperature=0, max_tokens=4 * steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request([(11 * i + j) % 1000 + 3 for j in range(context)], params)
    for _ in range(3):                              # the prefill, then two decode steps to warm up
        engine.step(detokenize=False)
    runner = engine.runner
    dev = runner.device
    t = time.perf_counter()
    for _ in range(steps):
        engine.step(detokenize=False)
    bench.sync(dev)
    engine_ms = (time.perf_counter() - t) / steps * 1e3
    seqs = list(engine.scheduler.running)
    size = next((s for s in runner.graphs if s >= len(seqs)), None)
    if size is not None:   # the graph's own input tensors, so the eager forward below runs what it replays
        runner._load_graph_inputs(seqs, size)
        flat, tables = runner._graph_inputs[:4 * size], runner._graph_tables[:size]
    else:
        flat, tables = (t.to(dev) for t in runner.decode_inputs(seqs))

    def forward():
        with torch.inference_mode():
            runner._forward_decode(*flat.view(4, -1), tables)
    if size is not None:
        graph = runner.graphs[size][0]
        step = lambda: graph.replay()   # noqa: E731
    else:
        step = forward
    replay = bench.time_fn(lambda: [step() for _ in range(steps)], device=dev, warmup=1, repeats=3)
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    forward()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            forward()
        bench.sync(dev)
    rows = []
    for e in prof.key_averages():
        if cuda:
            us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        elif e.key.startswith("aten::"):
            us = e.self_cpu_time_total
        else:
            continue
        if us > 0:
            rows.append((e.key, e.count / steps, us / steps / 1e3))
    rows.sort(key=lambda r: -r[2])
    return {"batch": batch, "context": context, "device": str(dev), "engine_ms": engine_ms,
            "replay_ms": replay.median / steps * 1e3, "graphs": size is not None,
            "kernels": sum(r[1] for r in rows), "kernels_ms": sum(r[2] for r in rows),
            "top": [{"name": n[:90], "calls": c, "ms": ms} for n, c, ms in rows[:top]]}


def format_decode_profile(name: str, r: dict) -> str:
    lines = [f"{name} | batch {r['batch']}, context {r['context']} | engine step {r['engine_ms']:.3f} ms | "
             f"{'graph replay' if r['graphs'] else 'eager forward'} {r['replay_ms']:.3f} ms | "
             f"{r['kernels']:.0f} kernels, {r['kernels_ms']:.3f} ms of kernel time"]
    lines += [f"    {k['ms'] * 1e3:8.1f} us  {k['calls']:5.1f}x  {k['name']}" for k in r["top"]]
    return "\n".join(lines)


def format_decode_row(r: dict) -> str:
    floor = (f" | {r['fraction_of_floor']:.1%} of the {r['floor_tok_s']:.0f} tok/s floor"
             if "fraction_of_floor" in r else "")
    # TPOT is (whole run - 1-token run) / (new tokens - 1): noise can make it <= 0 with few repeats or tokens
    tpot = f"{r['tpot_ms']:.2f} ms" + ("" if r["tpot_ms"] > 0 else " (noise: use more repeats or new tokens)")
    return (f"{r['system']} | batch {r['batch']} | {r['tok_s']:.1f} tok/s | TPOT {tpot} | "
            f"TTFT {r['ttft_ms']:.1f} ms | weights {r['weight_MB']:.0f} MB{floor}")


def decode_main(model=None, batch_sizes=(1, 32), new_tokens: int = 128, json_path=None, repeats: int = 3,
                systems=("hf", "eager", "graphs", "fused", "w4-fused"), scheduler_steps: int = 8, dtype=None,
                device=None) -> dict:
    """What `llmopt bench decode` runs (`dtype`: None for the model's default, or a torch dtype or its name)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    result = decode_benchmark(model, batch_sizes=batch_sizes, new_tokens=new_tokens, repeats=repeats, systems=systems,
                              scheduler_steps=scheduler_steps, dtype=dtype, device=device)
    print(f"{result['model']} on {result['device']} ({result['dtype']}), copy bandwidth "
          f"{result['copy_bandwidth_GBps']:.0f} GB/s, prompt {result['prompt_len']}, {result['new_tokens']} new tokens"
          + (", decode kernels with programmatic dependent launch" if result["programmatic_dependent_launch"] else ""))
    base = {r["batch"]: r["tok_s"] for r in result["rows"] if r["system"] == "HF generate"}
    for r in result["rows"]:
        vs = f" | {r['tok_s'] / base[r['batch']]:.2f}x HF generate" if r["batch"] in base else ""
        print(format_decode_row(r) + vs)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"saved {json_path}")
    return result
