"""Timing the dispatch paths on one random MoE layer problem, every path on the same inputs."""
from __future__ import annotations

import copy
import itertools

import torch

from .. import bench
from .dispatch import get_dispatch
from .routing import apply_capacity, route


def random_problem(tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int,
                   device="cpu", dtype=torch.float32, seed: int = 0, skew: float = 0.0, only=None,
                   capacity_factor: float | None = None):
    """Inputs for a dispatch call: (x, experts, weights, gate_up, down), routed by a random router.

    skew > 0 adds skew * log(1/(i+1)) to expert i's logits so the load is uneven, as an untrained
    or collapsing router makes it; `only` (a list of experts) routes to those alone, leaving the
    others without tokens; `capacity_factor` drops the assignments over capacity (index E)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
    if skew:
        logits = logits - skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    if only is not None:
        logits[:, [e for e in range(num_experts) if e not in only]] = float("-inf")
    r = apply_capacity(route(logits, top_k), capacity_factor)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, intermediate, generator=g) / intermediate ** 0.5
    to = dict(device=device, dtype=dtype)
    return x.to(**to), r.experts.to(device), r.weights.to(**to), gate_up.to(**to), down.to(**to)


@torch.inference_mode()
def dispatch_times(tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int,
                   paths=("dense", "loop", "sorted"), device="cpu", dtype=torch.float32,
                   warmup: int = 2, repeats: int = 5, skew: float = 0.0) -> dict[str, float]:
    """Median seconds of one MoE layer's expert computation by each dispatch path (routing excluded:
    it is the same for all). Also checks the paths agree with the first one, so a fast wrong path
    cannot win."""
    args = random_problem(tokens, hidden, intermediate, num_experts, top_k, device, dtype, skew=skew)
    times, ref = {}, None
    tol = 1e-3 if dtype == torch.float32 else 5e-2  # bf16/fp16 keep ~3 significant digits
    for name in paths:
        fn = get_dispatch(name)
        out = fn(*args)
        if ref is None:
            ref = out
        elif not torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol):
            raise AssertionError(f"dispatch {name!r} disagrees with {paths[0]!r}: "
                                 f"max |diff| {(out.float() - ref.float()).abs().max().item():.3g}")
        times[name] = bench.time_fn(lambda fn=fn: fn(*args), device=device, warmup=warmup, repeats=repeats).median
    return times


@torch.inference_mode()
def model_dispatch_times(model, batch_size: int = 8, seq_len: int = 512, paths=("dense", "loop", "sorted"),
                         warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one forward pass of a whole MoE model over batch_size x seq_len tokens:
    first with its stock `transformers` MoE blocks ("transformers", if it still has them), then
    swapped for `MoEFeedForward` with each dispatch path. The model is left on the last path.
    Checks every path's logits against the first measured, so a fast wrong path cannot win."""
    from .layer import is_hf_moe_block, use_llmopt_moe

    ids = bench.random_prompts(model.config.vocab_size, 2, 64, device=next(model.parameters()).device)
    times, ref = {}, None

    def run(name):
        nonlocal ref
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if ref is None:
            ref = logits
        elif not torch.allclose(logits, ref, rtol=1e-3, atol=1e-3):
            raise AssertionError(f"{name!r} logits differ from the first path's by "
                                 f"{(logits - ref).abs().max().item():.3g}")
        times[name] = bench.prefill(model, seq_len, batch_size, warmup=warmup, repeats=repeats).median

    if any(is_hf_moe_block(m) for m in model.modules()):
        run("transformers")
    for name in paths:
        use_llmopt_moe(model, name)
        run(name)
    return times


@torch.inference_mode()
def expert_decode_times(tokens: int = 1, hidden: int = 4096, intermediate: int = 14336, num_experts: int = 8,
                        top_k: int = 2, group_size: int = 128, device="cuda", dtype=torch.bfloat16,
                        rotate: int = 4, warmup: int = 3, repeats: int = 20, backend: str = "auto") -> dict:
    """One MoE layer's experts at decode (a few tokens), float against 4 bits (round to nearest, groups of
    `group_size`), each way of running them on the same inputs (Mixtral-8x7B's layer by default):

      float sorted / float triton      lesson 07's dispatch paths on the float experts;
      W4 QuantExperts                  dequantize the hit experts, then sorted dispatch (lesson 07);
      W4 GEMV loop                     one W4A16 GEMV per hit expert and matrix (`KernelQuantLinear`s);
      W4 grouped kernels               `KernelQuantExperts`: two launches over every hit expert;
      W4 CPU kernels                   `KernelQuantExperts` on a CPU (backend "auto", decode rows): PyTorch's
                                       weight-only kernel per hit expert and matrix (`kernels.cpu`).

    Returns {"times": {way: seconds}, "bytes": {way: bytes the hit experts hold}, "hit": experts hit}.
    The calls cycle through `rotate` routings that hit different experts, so each call reads its
    weights from memory, not from the cache the previous call filled. Every way is checked against
    the first (float sorted) so a fast wrong one cannot win. On a CPU pass small sizes."""
    from ..kernels.qlinear import KernelQuantExperts, KernelQuantLinear
    from ..quant import QuantConfig
    from ..quant.experts import QuantExperts
    from .dispatch import sorted_dispatch
    from .layer import Experts

    with torch.device(device):
        float_experts = Experts(num_experts, hidden, intermediate).to(dtype)
    q = QuantExperts.from_experts(float_experts, QuantConfig(bits=4, group_size=group_size))
    dq_gate_up, dq_down = q.stacked(dtype)             # what every 4-bit way computes with
    gemv = copy.deepcopy(q)
    for mats in (gemv.gate_up_proj, gemv.down_proj):
        for e in range(num_experts):
            mats[e] = KernelQuantLinear.from_quant_linear(mats[e], backend)
    grouped = KernelQuantExperts.from_quant_experts(q, backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    routings = []
    for r in range(rotate):   # top_k experts per token, a different set each time round
        experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
        experts = (experts + r * top_k) % num_experts
        weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
        routings.append((experts.to(device), weights.to(device, dtype)))
    ways = {
        "float sorted": lambda ex, w: sorted_dispatch(x, ex, w, float_experts.gate_up_proj, float_experts.down_proj),
        "W4 QuantExperts": lambda ex, w: q(x, ex, w),
        "W4 GEMV loop": lambda ex, w: gemv(x, ex, w),
    }
    on_cpu = grouped.cpu_kernel and backend == "auto" and torch.device(device).type == "cpu"
    ways["W4 CPU kernels" if on_cpu else "W4 grouped kernels"] = lambda ex, w: grouped(x, ex, w)
    if torch.device(device).type == "cuda":
        from .triton_moe import triton_dispatch

        ways["float triton"] = lambda ex, w: triton_dispatch(x, ex, w, float_experts.gate_up_proj,
                                                             float_experts.down_proj)
    tol = 1e-4 if dtype == torch.float32 else 2e-2   # relative error of the whole output (bf16: ~3 digits)
    times, hit = {}, len(torch.unique(routings[0][0]))
    for name, fn in ways.items():
        ex, w = routings[0]
        want = sorted_dispatch(x, ex, w, float_experts.gate_up_proj if name.startswith("float") else dq_gate_up,
                               float_experts.down_proj if name.startswith("float") else dq_down)
        got = fn(ex, w)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not err < tol:   # (NaN fails too)
            raise AssertionError(f"{name!r} disagrees with its reference: relative error {err:.3g}")
        turns = itertools.cycle(routings)
        times[name] = bench.time_fn(lambda fn=fn, turns=turns: fn(*next(turns)), device=device, warmup=warmup,
                                    repeats=repeats).median
    float_bytes = 3 * hidden * intermediate * torch.empty((), dtype=dtype).element_size()
    # the bytes a call reads: on a CPU the kernels read their own copies (`unread_bytes`: what they leave)
    w4_bytes = (sum(b.numel() * b.element_size() for b in grouped.buffers()) - grouped.unread_bytes()) // num_experts
    return {"times": times, "hit": hit,
            "bytes": {name: hit * (float_bytes if name.startswith("float") else w4_bytes) for name in times}}
