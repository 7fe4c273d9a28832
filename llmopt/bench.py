"""Every number in the course comes from here: size, time, memory, throughput, roofline.

Timing: warm-up runs, then `repeats` timed runs; we report the median and the spread
(min/max). On CUDA we time with CUDA events after a synchronize; on CPU with
`time.perf_counter`. Memory: CUDA's max allocated on a GPU, the process's peak resident
set (RSS) on CPU; both count everything the process holds (every model still alive, and on
a CPU Python and PyTorch themselves), not one model: `model_size_bytes` is a model's own.
"""
from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# --------------------------------------------------------------------------- size

def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (packed weights, scales and
    zero points included), each storage counted once (tied weights are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one batch-1 decode step must read: everything but the embedding table, of which a
    step reads one row per token (a tied lm_head is read in full and stays counted), and, in a
    Mixture-of-Experts model, only the top_k experts of each MoE block that the token goes to; of
    a layer holding part of its weights twice (the CPU kernels' copies, `unread_bytes`), the copy its forward reads."""
    from .moe.stats import inactive_expert_bytes

    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = emb is not None and out is not None and out.weight.data_ptr() == emb.data_ptr()
    skip = 0 if emb is None or tied else emb.numel() * emb.element_size()
    unread = sum(m.unread_bytes() for m in model.modules() if hasattr(m, "unread_bytes"))
    return model_size_bytes(model) - skip - inactive_expert_bytes(model) - unread


# --------------------------------------------------------------------------- timing

@dataclass
class Stats:
    """Seconds per run: median and spread over `repeats` timed runs."""
    median: float
    min: float
    max: float
    runs: list = field(default_factory=list)

    @classmethod
    def of(cls, runs):
        return cls(statistics.median(runs), min(runs), max(runs), list(runs))

    def __str__(self):
        return f"{self.median * 1e3:.2f} ms (min {self.min * 1e3:.2f}, max {self.max * 1e3:.2f}, n={len(self.runs)})"


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_fn(fn, *, device="cpu", warmup: int = 2, repeats: int = 5) -> Stats:
    """Time `fn()`; CUDA events on a GPU, perf_counter elsewhere."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup=}, {repeats=}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / 1e3)
        else:
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - t)
    return Stats.of(runs)


def time_graph(fn, *, device="cuda", calls: int = 20, warmup: int = 3, repeats: int = 20) -> Stats:
    """GPU time of one `fn()`: `calls` calls recorded into one CUDA graph, replayed and timed with
    CUDA events. Unlike `time_fn`, the time the host takes to launch kernels is left out (a small
    kernel can take less time on the GPU than Python takes to launch it): what a model replayed as a
    CUDA graph pays. Falls back to `time_fn` where `fn` cannot be captured."""
    device = torch.device(device)
    if device.type != "cuda":
        return time_fn(fn, device=device, warmup=warmup, repeats=repeats)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):   # warm up off the default stream (lazy inits, compiles, autotuning)
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:   # noqa: BLE001 - anything a capture refuses: time call by call instead
        sync(device)
        return time_fn(fn, device=device, warmup=warmup, repeats=repeats)
    for _ in range(warmup):
        graph.replay()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return Stats.of(runs)


# --------------------------------------------------------------------------- memory

def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_rss_peak() -> bool:
    """Linux resets the peak RSS (VmHWM) when 5 is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Memory:
    peak_bytes: int = 0
    kind: str = ""  # "cuda max allocated", "process peak RSS" or "process lifetime peak RSS"


@contextmanager
def track_memory(device="cpu"):
    """`with track_memory(dev) as m: ...` then `m.peak_bytes`."""
    device = torch.device(device)
    m = Memory()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.kind = "cuda max allocated"
    else:
        m.kind = "process peak RSS" if _reset_rss_peak() else "process lifetime peak RSS"
    try:
        yield m
    finally:
        if device.type == "cuda":
            sync(device)
            m.peak_bytes = torch.cuda.max_memory_allocated(device)
        else:
            m.peak_bytes = _rss_peak_bytes()


# --------------------------------------------------------------------------- energy

class _Energy:
    """NVML's energy counter (millijoules) on NVIDIA GPUs; `None` where unavailable."""

    def __init__(self, device):
        self.handle = None
        if torch.device(device).type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = torch.device(device).index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.nvml = pynvml
            self.read()
        except Exception:  # no pynvml, no permission, or no energy counter on this GPU
            self.handle = None

    def read(self):
        return None if self.handle is None else self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


# --------------------------------------------------------------------------- generation

@dataclass
class GenerationResult:
    batch_size: int
    prompt_len: int
    new_tokens: int
    ttft_s: float              # time to first token: generate(ids, 1), one forward over the prompt, median
    tpot_s: float              # time per output token after the first, median
    total_s: float             # one whole generate call, median
    tokens_per_s: float        # batch_size * new_tokens / total_s
    requests_per_s: float
    peak_memory_bytes: int
    memory_kind: str
    joules_per_token: float | None = None
    ttft: Stats | None = None
    total: Stats | None = None


def random_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0,
                   device="cpu") -> torch.Tensor:
    """Random token ids: timing does not depend on what the tokens say."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch_size, prompt_len), generator=g).to(device)


@torch.inference_mode()
def generation(model, batch_size: int = 1, prompt_len: int = 32, new_tokens: int = 64,
               warmup: int = 1, repeats: int = 3, input_ids: torch.Tensor | None = None,
               generate_fn=None) -> GenerationResult:
    """Latency and throughput of greedy generation with exactly `new_tokens` per sequence.

    `generate_fn(input_ids, max_new_tokens)` defaults to Hugging Face `model.generate`;
    later lessons pass their own engine here so every method is timed the same way.
    """
    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    device = next(model.parameters()).device
    if input_ids is None:
        input_ids = random_prompts(model.config.vocab_size, batch_size, prompt_len, device=device)
    elif not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty 2-D tensor (batch, prompt_len), got "
                         f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    batch_size, prompt_len = input_ids.shape
    if generate_fn is None:
        def generate_fn(ids, n):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)

    ttft = time_fn(lambda: generate_fn(input_ids, 1), device=device, warmup=warmup, repeats=repeats)
    energy = _Energy(device)
    e0 = energy.read()
    with track_memory(device) as mem:
        total = time_fn(lambda: generate_fn(input_ids, new_tokens), device=device, warmup=warmup, repeats=repeats)
    e1 = energy.read()
    n_tok = batch_size * new_tokens
    joules = None if e0 is None else (e1 - e0) / ((warmup + repeats) * n_tok)
    tpot = (total.median - ttft.median) / (new_tokens - 1) if new_tokens > 1 else ttft.median
    return GenerationResult(batch_size, prompt_len, new_tokens, ttft.median, tpot, total.median,
                            n_tok / total.median, batch_size / total.median, mem.peak_bytes, mem.kind,
                            joules, ttft, total)


# --------------------------------------------------------------------------- roofline

def memory_bandwidth(device="cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Measured bytes/s of a large tensor copy (each byte read once and written once)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeats=repeats)
    return 2 * src.numel() * 4 / t.min  # the best run is closest to the hardware's ability


@dataclass
class Roofline:
    weight_bytes: int
    bandwidth_bytes_per_s: float
    floor_s_per_token: float      # weight bytes / bandwidth: no batch-1 decode step can be faster
    measured_s_per_token: float
    floor_tokens_per_s: float
    measured_tokens_per_s: float
    fraction_of_floor: float      # measured tok/s / floor tok/s (1.0 = at the roofline)


def decode_roofline(model, measured_s_per_token: float, bandwidth: float | None = None) -> Roofline:
    """Batch-1 decode reads every weight once per token: weight bytes / bandwidth is
    the floor on its time per token; compare a measured time per output token."""
    if not measured_s_per_token > 0:
        raise ValueError(f"measured_s_per_token must be > 0, got {measured_s_per_token!r}")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be None (measure it) or > 0 bytes/s, got {bandwidth!r}")
    device = next(model.parameters()).device
    bw = bandwidth or memory_bandwidth(device)
    wb = weight_bytes(model)
    floor = wb / bw
    return Roofline(wb, bw, floor, measured_s_per_token, 1 / floor, 1 / measured_s_per_token,
                    floor / measured_s_per_token)


def prefill(model, tokens: int = 512, batch_size: int = 1, warmup: int = 2, repeats: int = 9, seed: int = 0) -> Stats:
    """Time one forward pass over a prompt of `tokens` tokens, as `generate` starts: every
    position through every layer (compute-bound, so fewer FLOPs show), logits for the last
    position only (the next token's; all 512 rows of a large vocabulary would swamp the rest)."""
    for name, v in (("tokens", tokens), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    device = next(model.parameters()).device
    ids = random_prompts(model.config.vocab_size, batch_size, tokens, seed=seed, device=device)
    with torch.no_grad():
        return time_fn(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device=device,
                       warmup=warmup, repeats=repeats)


def _macs_per_token(module: torch.nn.Module) -> int:
    """Multiply-adds one token costs in `module`'s matrix products: in_features * out_features of every
    innermost linear-like module (nn.Linear, the quantized ones, which compute the same product from
    their codes, the factors of a low-rank layer, the merged projections of `kernels.fuse(merge=True)`),
    and, in a Mixture-of-Experts block, the router and the top_k experts each token goes to."""
    from .moe.layer import MoEFeedForward, is_hf_moe_block
    from .moe.stats import _expert_params

    if isinstance(module, MoEFeedForward) or is_hf_moe_block(module):
        return module.gate.weight.numel() + module.gate.top_k * _expert_params(module)
    inner = sum(_macs_per_token(m) for m in module.children())
    if inner == 0 and isinstance(getattr(module, "in_features", None), int) \
            and isinstance(getattr(module, "out_features", None), int):
        return module.in_features * module.out_features
    return inner


def _q_dim(attn: torch.nn.Module) -> int:
    """Width of the layer's queries: q_proj's outputs, or the first part of a merged qkv_proj."""
    if hasattr(attn, "q_proj"):
        return attn.q_proj.out_features
    return attn.qkv_sizes[0]   # kernels.FusedAttention after merge()


def matmul_flops(model, tokens: int, context: float, logits: int | None = None) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of the matrix products in a Llama-family forward pass
    over `tokens` tokens that each attend to `context` positions on average, with `logits`
    rows of lm_head (default: one per token). By part, from the model's actual modules, so a
    pruned or factorised model is counted as it is; a quantized linear does the same product
    as its float one, fused and merged projections count as their parts, and a Mixture-of-Experts
    block counts its router and the top_k experts each token goes to (not all of them). What is
    left out (norms, activations, rotary, softmax, MoE dispatch) is small in FLOPs but not always in time."""
    from .quant import calibrate

    if tokens < 1 or context < 0 or (logits is not None and logits < 0):
        raise ValueError(f"need tokens >= 1, context >= 0 and logits None or >= 0, got {tokens=}, {context=}, "
                         f"{logits=}")
    parts = dict.fromkeys(("attention projections", "attention scores", "mlp", "lm_head"), 0.0)
    for layer in calibrate.decoder_layers(model):
        for name, child in layer.named_children():
            part = "mlp" if "mlp" in name else "attention projections"
            parts[part] += 2 * tokens * _macs_per_token(child)
        parts["attention scores"] += 2 * 2 * tokens * context * _q_dim(layer.self_attn)  # q.k, then p.v
    parts["lm_head"] = 2 * (tokens if logits is None else logits) * _macs_per_token(model.get_output_embeddings())
    parts["total"] = sum(parts.values())
    return parts


def cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What machine the numbers came from (printed beside every table)."""
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env
