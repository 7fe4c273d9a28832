"""`llmopt bench kernels`: each kernel against eager PyTorch and `torch.compile`, in one run.

For every kernel and size: the median GPU time (`bench.time_graph`: calls recorded in a CUDA graph
and replayed, so the host's launch overhead is left out, as in a graph-captured model), the bytes it must move at
least (inputs read once, outputs written once) and the flops, hence GB/s, TFLOP/s and the
fraction of the bandwidth a device-to-device copy reaches in the same run; the speedups over the
eager reference and over `torch.compile(reference)`; for the quantized GEMV/GEMM also over the
`F.linear` of the same layer with its unquantized weight ("dense_linear": bf16 on a GPU). A GPU's L2
(50-60 MB on an H100/H200) holds a whole 4-bit 7B-class layer, so timing one layer call after call
would read it from the cache; a model's decode reads every layer from memory once per token. So each
quantized case cycles through copies of its layer (and of the dense weight) that together fill three
times the L2, one copy per call, in all of its columns. The decode GEMVs with a prologue
(`kernels.gemv`, at TinyLlama-1.1B's layer sizes, one row: "gemv+norm" is residual add + RMSNorm +
matmul, "gemv+swiglu" SwiGLU + matmul) are timed the same way; their
"dense_linear" column is the separate ops they replace: the norm or SwiGLU kernel, then `F.linear`
(plain `gemv`: `F.linear` alone). On a CPU
there is nothing to time the kernels with (the
interpreter measures numpy), so it checks each kernel against its reference at small sizes and
measures what `torch.compile` fusion gives the references on this CPU instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import bench
from .common import use_triton
from .gemv import NORM, SWIGLU, gemv, gemv_triton, norm_linear, swiglu_linear
from .rmsnorm import rmsnorm
from .rope import rope
from .softmax import softmax
from .swiglu import swiglu
from .w4a16 import w4a16_linear
from .w8a16 import w8a16_linear


@dataclass
class Case:
    kernel: str
    size: str
    run: object            # run(backend) -> output
    nbytes: int            # bytes moved at least: every input read once, every output written once
    flops: float
    baseline: object = None  # for the quantized matmuls: F.linear of the same layer's unquantized weight
    #                          (bf16 on a GPU, the run's dtype elsewhere)
    inputs: object = tuple   # inputs() -> the tensors for the next call, passed to run and baseline:
    #                          the next copy of a quantized layer (see the module's docstring)


class Rotation:
    """Hands out `copies` clones of some tensors in turn: the next call reads other addresses, so it
    finds nothing of the last one in the L2 cache."""

    def __init__(self, tensors, copies: int):
        self.sets = [tuple(t if t is None else t.clone() for t in tensors) for _ in range(copies)]
        self.i = -1

    def __call__(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def copies_past_l2(nbytes: int, device) -> int:
    """How many copies of `nbytes` fill three times the device's L2 cache (1 off a GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return max(1, -(-3 * l2 // nbytes))


def _qlinear(N, K, bits, group_size, device, dtype):
    from ..quant import QuantConfig, QuantLinear

    lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.float32)
    q = QuantLinear.from_linear(lin, QuantConfig(bits=bits, group_size=group_size, symmetric=True))
    return q, lin.weight.detach().to(dtype)


# the sizes per scale: "gpu" (a 7B-class layer: hidden 4096, MLP 11008; the decode GEMVs at TinyLlama's
# qkv, gate_up, LM head, down and o sizes), "cpu" (64 MB float32 tensors:
# past the caches, timed in seconds), "small" (the interpreter's correctness checks: odd sizes, tails)
SIZES = {
    "gpu": dict(norm=[(4096, 4096), (8192, 8192)], swiglu=[(4096, 4096), (4096, 11008)],
                softmax=[(4096, 4096), (32 * 1024, 1024)], rope=(1, 4096, 32, 8, 128),
                gemv=dict(plain=[(2048, 2048), (11008, 4096)], norm=[(2560, 2048), (11264, 2048), (32000, 2048)],
                          swiglu=[(2048, 5632)]),
                linear=[(11008, 4096), (4096, 11008)], group=128, m4=[1, 8, 512], m8=[1, 8]),
    "cpu": dict(norm=[(4096, 4096)], swiglu=[(4096, 4096)], softmax=[(4096, 4096)], rope=(4, 2048, 16, 4, 64),
                gemv=dict(plain=[(2048, 2048)], norm=[(2560, 2048)], swiglu=[(2048, 5632)]),
                linear=[(4096, 4096)], group=128, m4=[1, 256], m8=[1]),
    "small": dict(norm=[(37, 300)], swiglu=[(37, 300)], softmax=[(37, 300)], rope=(2, 5, 4, 2, 16),
                  gemv=dict(plain=[(37, 100)], norm=[(45, 130)], swiglu=[(19, 140)]),
                  linear=[(100, 192)], group=64, m4=[1, 17], m8=[1, 3]),
}


# every Case's kernel name in cases() (a test keeps the two in step); `--only` keeps those starting with a given name
KERNELS = ("rmsnorm", "rmsnorm+residual", "swiglu", "softmax", "rope q+k", "w4a16 gemv", "w4a16 gemm", "w8a16 gemv",
           "gemv", "gemv+norm", "gemv+swiglu")


def _keep(kernel: str, only: tuple) -> bool:
    return not only or any(kernel.startswith(o) for o in only)


def cases(device="cuda", dtype=torch.bfloat16, scale: str = "gpu") -> list[Case]:
    """The benchmark's kernels and sizes at `scale` (a key of SIZES)."""
    if scale not in SIZES:
        raise ValueError(f"scale must be one of {tuple(SIZES)}, got {scale!r}")
    S = SIZES[scale]
    e = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    out = []
    for R, N in S["norm"]:
        x, w, r = rand(R, N), rand(N), rand(R, N)
        out.append(Case("rmsnorm", f"{R}x{N}", lambda b, x=x, w=w: rmsnorm(x, w, 1e-5, backend=b),
                        2 * R * N * e + N * e, 4 * R * N))
        out.append(Case("rmsnorm+residual", f"{R}x{N}",
                        lambda b, x=x, w=w, r=r: rmsnorm(x, w, 1e-5, residual=r, backend=b),
                        4 * R * N * e + N * e, 5 * R * N))
    for R, N in S["swiglu"]:
        a, c = rand(R, N), rand(R, N)
        out.append(Case("swiglu", f"{R}x{N}", lambda b, a=a, c=c: swiglu(a, c, backend=b), 3 * R * N * e, 5 * R * N))
    for R, N in S["softmax"]:
        x = rand(R, N)
        out.append(Case("softmax", f"{R}x{N}", lambda b, x=x: softmax(x, backend=b), 2 * R * N * e, 5 * R * N))
    B, T, Hq, Hk, D = S["rope"]
    q = rand(B, T, Hq, D).transpose(1, 2)
    k = rand(B, T, Hk, D).transpose(1, 2)
    cos, sin = rand(B, T, D), rand(B, T, D)
    out.append(Case("rope q+k", f"{B}x{T}x({Hq}+{Hk})x{D}", lambda b: rope(q, k, cos, sin, backend=b),
                    2 * (q.numel() + k.numel()) * e + 2 * cos.numel() * e, 6 * (q.numel() + k.numel())))
    for bits, name, fn in ((4, "w4a16", w4a16_linear), (8, "w8a16", w8a16_linear)):
        gsz = S["group"] if bits == 4 else None   # INT4 per group of 128, INT8 per channel
        for N, K in S["linear"]:
            ql, w16 = _qlinear(N, K, bits, gsz, device, dtype)
            packed = ql.qweight.numel() + ql.scales.numel() * 2
            layer = Rotation((ql.qweight, ql.scales, ql.zeros, w16), copies_past_l2(packed, device))
            for M in S["m4" if bits == 4 else "m8"]:
                x = rand(M, K)
                out.append(Case(f"{name} {'gemv' if M <= 8 else 'gemm'}", f"M={M} {K}->{N}",
                                lambda b, qw, sc, z, w, x=x, fn=fn, gsz=gsz: fn(x, qw, sc, z, gsz, backend=b),
                                packed + (M * K + M * N) * e, 2 * M * N * K,
                                baseline=lambda qw, sc, z, w, x=x: F.linear(x, w), inputs=layer))
    out += _gemv_cases(S["gemv"], device, rand, e)
    return out


def _gemv_cases(sizes: dict, device, rand, e: int) -> list[Case]:
    """The decode GEMVs at one row, each layer cycled past the L2 like the quantized ones."""
    out = []
    for kind, shapes in sizes.items():
        for N, K in shapes:
            w, nw = rand(N, K) * K ** -0.5, 1 + 0.1 * rand(K)
            layer = Rotation((w, nw), copies_past_l2(N * K * e, device))
            x, r = rand(1, K), rand(1, K)
            nbytes = (N * K + 2 * K + N) * e      # the weight, x (and up or residual), y
            # "triton": the fused GEMV alone (its best tile; the wrappers would also weigh the separate ops)
            if kind == "plain":
                case = Case("gemv", f"M=1 {K}->{N}",
                            lambda b, w, nw, x=x: gemv_triton(x, w) if b == "triton" else gemv(x, w, backend=b),
                            (N * K + K + N) * e, 2 * N * K, baseline=lambda w, nw, x=x: F.linear(x, w), inputs=layer)
            elif kind == "norm":
                case = Case("gemv+norm", f"M=1 {K}->{N}",
                            lambda b, w, nw, x=x, r=r: gemv_triton(x, w, prologue=NORM, norm_weight=nw, eps=1e-5,
                                                                   residual=r) if b == "triton"
                            else norm_linear(x, nw, 1e-5, w, None, r, backend=b),
                            nbytes + 2 * K * e, 2 * N * K + 5 * K,
                            baseline=lambda w, nw, x=x, r=r: F.linear(rmsnorm(x, nw, 1e-5, r)[0], w), inputs=layer)
            else:
                case = Case("gemv+swiglu", f"M=1 {K}->{N}",
                            lambda b, w, nw, x=x, r=r: gemv_triton(x, w, prologue=SWIGLU, up=r) if b == "triton"
                            else swiglu_linear(x, r, w, backend=b), nbytes, 2 * N * K + 5 * K,
                            baseline=lambda w, nw, x=x, r=r: F.linear(swiglu(x, r), w), inputs=layer)
            out.append(case)
    return out


def check(device="cpu", only: tuple = ()) -> list[dict]:
    """Every kernel (or those `only` names) against its reference at small sizes (the interpreter on a CPU)."""
    rows = []
    for c in cases(device, torch.float32 if device == "cpu" else torch.bfloat16, scale="small"):
        if not _keep(c.kernel, only):
            continue
        args = c.inputs()
        got, want = c.run("triton", *args), c.run("torch", *args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
        rows.append({"kernel": c.kernel, "size": c.size, "max_abs_err": err})
    return rows


def time_cases(device="cuda", warmup: int = 10, repeats: int = 100, compile: bool = True,
               only: tuple = ()) -> dict:
    """Time every case on `device`; on a CPU only the references (eager vs compiled)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    bw = bench.memory_bandwidth(device)
    out = {"device": torch.cuda.get_device_name(device) if gpu else bench.cpu_name(),
           "copy_bandwidth_GBps": bw / 1e9, "torch": torch.__version__, "rows": []}
    all_cases = cases(device, torch.bfloat16 if gpu else torch.float32, scale="gpu" if gpu else "cpu")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for c in all_cases:
        if not _keep(c.kernel, only):
            continue
        t = {}
        timer = bench.time_graph if gpu else bench.time_fn
        if gpu and use_triton(torch.empty(0, device=device), "auto"):
            t["kernel"] = timer(lambda c=c: c.run("triton", *c.inputs()), device=device, warmup=warmup,
                                repeats=repeats).median
        t["eager"] = timer(lambda c=c: c.run("torch", *c.inputs()), device=device, warmup=warmup,
                           repeats=repeats).median
        if compile:   # the inputs are the compiled function's arguments: new copies need no recompiling
            fn = torch.compile(c.run, dynamic=False)
            t["compiled"] = timer(lambda c=c, fn=fn: fn("torch", *c.inputs()), device=device,
                                  warmup=max(warmup, 3), repeats=repeats).median
        if c.baseline is not None:
            t["dense_linear"] = timer(lambda c=c: c.baseline(*c.inputs()), device=device, warmup=warmup,
                                      repeats=repeats).median
        row = {"kernel": c.kernel, "size": c.size, "bytes": c.nbytes, "flops": c.flops,
               **{f"{k}_us": v * 1e6 for k, v in t.items()}}
        best = min(v for k, v in t.items() if k != "dense_linear")   # the fastest way to run the op
        row["GBps"] = c.nbytes / best / 1e9
        row["TFLOPs"] = c.flops / best / 1e12
        row["fraction_of_copy_bw"] = row["GBps"] * 1e9 / bw
        for k in ("eager", "compiled", "dense_linear"):
            if k in t and "kernel" in t:
                row[f"speedup_vs_{k}"] = t[k] / t["kernel"]
        if "compiled" in t:
            row["compiled_vs_eager"] = t["eager"] / t["compiled"]
        out["rows"].append(row)
    return out


def sweep_gemv(device="cuda", shapes=((11008, 4096), (4096, 11008)), ms=(1, 8), repeats: int = 50,
               configs=None) -> dict:
    """Every candidate config on each (N, K) layer and batch M, timed as `time_cases` times the
    kernels (CUDA graph, copies past the L2), beside the dense bf16 `F.linear`: which config wins
    where, and by how much, on this GPU. `pick_config` makes the same choice inside a model. The
    candidates are `w4a16.GEMV_CONFIGS` for one row and `SMALL_BATCH_CONFIGS` (GEMVs and 16-row GEMM
    tiles) for 2-8, as `w4a16_linear` offers them; `configs`: another list."""
    from .w4a16 import GEMV_CONFIGS, SMALL_BATCH_CONFIGS, w4a16_gemm, w4a16_gemv, w4a16_reference

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32   # the interpreter: no bf16
    bw = bench.memory_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else bench.cpu_name()
    out = {"device": name, "copy_bandwidth_GBps": bw / 1e9, "rows": []}
    for N, K in shapes:
        ql, w16 = _qlinear(N, K, 4, 128, device, dtype)
        packed = ql.qweight.numel() + ql.scales.numel() * 2
        layer = Rotation((ql.qweight, ql.scales, ql.zeros, w16), copies_past_l2(packed, device))
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            want = w4a16_reference(x, *layer.sets[0][:3], 128)
            dense = bench.time_graph(lambda x=x, layer=layer: F.linear(x, layer()[3]), device=device,
                                     repeats=repeats).median
            nbytes = packed + (M * K + M * N) * x.element_size()
            for i, c in enumerate(configs or (GEMV_CONFIGS if M == 1 else SMALL_BATCH_CONFIGS)):
                fn = w4a16_gemm if c.get("KERNEL") == "gemm" else w4a16_gemv
                kw = {k: v for k, v in c.items() if k != "KERNEL"}
                try:
                    err = float((fn(x, *layer.sets[0][:3], 128, **kw).float() - want.float()).abs().max())
                    t = bench.time_graph(lambda fn=fn, kw=kw, x=x, layer=layer: fn(x, *layer()[:3], 128, **kw),
                                         device=device, repeats=repeats).median
                except Exception as e:  # noqa: BLE001 - a config this GPU cannot run: say so, go on
                    out["rows"].append({"N": N, "K": K, "M": M, "config": i, **c, "error": f"{type(e).__name__}: {e}"})
                    continue
                out["rows"].append({"N": N, "K": K, "M": M, "config": i, **c, "us": t * 1e6,
                                    "dense_us": dense * 1e6,
                                    "GBps": nbytes / t / 1e9, "fraction_of_copy_bw": nbytes / t / bw,
                                    "speedup_vs_dense_linear": dense / t, "max_abs_err": err})
    return out


def format_sweep(result: dict, top: int = 6) -> str:
    lines = [f"W4A16 GEMV configs on {result['device']} (copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s), "
             f"the {top} fastest per layer and M"]
    keys = sorted({(r["M"], r["K"], r["N"]) for r in result["rows"]})
    for M, K, N in keys:
        rows = sorted((r for r in result["rows"] if (r["M"], r["K"], r["N"]) == (M, K, N) and "us" in r),
                      key=lambda r: r["us"])
        failed = [r for r in result["rows"] if (r["M"], r["K"], r["N"]) == (M, K, N) and "error" in r]
        for r in failed:
            lines.append(f"M={M} {K}->{N}: config {r['config']} failed: {r['error'][:200]}")
        if not rows:
            continue
        lines.append(f"M={M} {K}->{N}: dense bf16 {rows[0]['dense_us']:.1f} us; slowest config {rows[-1]['us']:.1f} us")
        for r in rows[:top]:
            cfg = {k: r[k] for k in ("KERNEL", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "LATE_SUM", "SPLIT_K",
                                     "GROUPED", "WORDS", "PREFETCH", "num_stages") if k in r}
            lines.append(f"  {r['us']:7.1f} us  {r['GBps']:6.0f} GB/s  {r['fraction_of_copy_bw']:.2f} of copy  "
                         f"{r['speedup_vs_dense_linear']:.2f}x dense  err {r['max_abs_err']:.2g}  {cfg}")
    return "\n".join(lines)


def format_rows(result: dict) -> str:
    cols = [("kernel", "{}"), ("size", "{}"), ("kernel_us", "{:.1f}"), ("eager_us", "{:.1f}"),
            ("compiled_us", "{:.1f}"), ("dense_linear_us", "{:.1f}"), ("GBps", "{:.0f}"),
            ("fraction_of_copy_bw", "{:.2f}"), ("speedup_vs_eager", "{:.2f}x"), ("speedup_vs_compiled", "{:.2f}x"),
            ("speedup_vs_dense_linear", "{:.2f}x"), ("compiled_vs_eager", "{:.2f}x")]
    cols = [(k, f) for k, f in cols if any(k in r for r in result["rows"])]
    lines = [" | ".join(k for k, _ in cols)]
    for r in result["rows"]:
        lines.append(" | ".join(f.format(r[k]) if k in r else "-" for k, f in cols))
    head = f"{result['device']}, torch {result['torch']}, copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s"
    return head + "\n" + "\n".join(lines)


def main(device=None, json_path=None, compile: bool = True, only: tuple = (), repeats: int = 100,
         e2e: bool = False, model=None, configs: bool = False, config_rows: tuple = (1, 8), e2e_dtype=None) -> dict:
    """What `llmopt bench kernels` runs; returns the JSON-able result."""
    from ..models import pick_device

    unknown = [o for o in only if not any(k.startswith(o) for k in KERNELS)]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: no such kernel; the kernels are {', '.join(KERNELS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else pick_device(device)
    result = {}
    if device.type != "cuda":
        print("no GPU: kernel timings need one (the interpreter runs numpy). Checking each kernel against its "
              "reference instead, then timing the references on this CPU"
              + (", eager and compiled by torch.compile." if compile else "."))
        result["check"] = check("cpu", only)
        for r in result["check"]:
            print(f"  {r['kernel']:18s} {r['size']:22s} max |kernel - reference| = {r['max_abs_err']:.2e}")
    result.update(time_cases(device, warmup=5 if device.type == "cpu" else 10,
                             repeats=min(repeats, 25) if device.type == "cpu" else repeats, compile=compile, only=only))
    print(format_rows(result))
    if configs and device.type == "cuda":
        result["gemv_configs"] = sweep_gemv(device, ms=config_rows, repeats=repeats)
        print(format_sweep(result["gemv_configs"]))
    if e2e:
        result["end_to_end"] = end_to_end(model, device, dtype=e2e_dtype)
        print(format_e2e(result["end_to_end"]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved {json_path}")
    return result


@torch.no_grad()
def end_to_end(model_name=None, device=None, new_tokens: int = 128, group_size: int = 128, repeats: int = 3,
               dtype=None, bits: tuple = (4, 8), unfused: bool = True) -> dict:
    """Batch-1 greedy decode: the model as loaded (`dtype`; default bf16 on a GPU, float32 on a CPU)
    vs fused, and for each of `bits` the RTN-quantized model (W4: groups of `group_size`; W8: per
    channel) unfused (`QuantLinear`: dequantize + matmul) and fused (`KernelQuantLinear`: the Triton
    kernels on a GPU, PyTorch's weight-only kernels on a CPU). Also the largest logit difference of
    each against the first. `unfused=False` leaves the unfused quantized models out (on a CPU at 1B
    sizes they take seconds a token)."""
    import copy

    from .. import models
    from ..quant import QuantConfig, quantize
    from .fuse import fuse

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, _ = models.load(model_name, dtype=dtype, device=device)
    model.eval()
    ids = bench.random_prompts(model.config.vocab_size, 1, 32, device=device)
    variants = {"as loaded": model, "fused": fuse(copy.deepcopy(model))}
    for b in bits:
        q = quantize(copy.deepcopy(model), QuantConfig(bits=b, group_size=group_size if b == 4 else None))
        if unfused:
            variants[f"w{b} (dequantize + matmul)"] = q
        variants[f"w{b} fused (kernels)"] = fuse(copy.deepcopy(q))
    ref = model(ids).logits.float()
    out = {"model": model_name or models.default_model(), "device": str(device), "dtype": str(dtype),
           "new_tokens": new_tokens, "rows": []}
    for name, m in variants.items():
        r = bench.generation(m, batch_size=1, prompt_len=32, new_tokens=new_tokens, repeats=repeats)
        out["rows"].append({"variant": name, "tok_s": r.tokens_per_s, "ms_per_token": r.tpot_s * 1e3,
                            "weight_MB": bench.weight_bytes(m) / 1e6,
                            "max_logit_diff": float((m(ids).logits.float() - ref).abs().max())})
    base = out["rows"][0]["tok_s"]
    for row in out["rows"]:
        row["speedup"] = row["tok_s"] / base
    return out


def format_e2e(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}), batch 1, {result['new_tokens']} new tokens",
             "variant | tok/s | ms/token | weights MB | speedup | max |logit diff|"]
    for r in result["rows"]:
        lines.append(f"{r['variant']} | {r['tok_s']:.1f} | {r['ms_per_token']:.2f} | {r['weight_MB']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['max_logit_diff']:.3g}")
    return "\n".join(lines)
