"""Timing the dispatch paths on one random MoE layer problem, every path on the same inputs."""
from __future__ import annotations

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
