"""When does low rank pay in time? One dense linear against its factorisations, rank by rank.

A token costs out*in multiply-adds in the dense layer and r*(out + in) in the factorised one,
so by arithmetic the factors win below the break-even rank out*in/(out + in). The clock adds
what arithmetic leaves out: two matmuls launch twice and write an (tokens x r) intermediate,
and thin matmuls use the hardware worse than one fat one. The crossover is measured here, with
`bench.time_fn` like every number in the course.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import bench
from .factor import break_even_rank, check_rank, lowrank_params
from .linear import LowRankLinear


@torch.inference_mode()
def linear_times(out_features: int, in_features: int, ranks, tokens: int = 1, device="cpu",
                 dtype=torch.float32, warmup: int = 3, repeats: int = 10) -> list[dict]:
    """Median time of y = x W^T (rank None) and of each rank's x V^T U^T, for `tokens` rows of x.

    Rows: {"rank", "ms", "params", "speedup"} (speedup: dense time / this time); random weights,
    since the time does not depend on their values."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    ranks = [check_rank(r, out_features, in_features) for r in ranks]
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g).to(device, dtype)
    dense = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    t_dense = bench.time_fn(lambda: dense(x), device=device, warmup=warmup, repeats=repeats).median
    rows = [{"rank": None, "ms": t_dense * 1e3, "params": out_features * in_features, "speedup": 1.0}]
    for r in ranks:
        layer = LowRankLinear(in_features, out_features, r, bias=False, device=device, dtype=dtype)
        t = bench.time_fn(lambda layer=layer: layer(x), device=device, warmup=warmup, repeats=repeats).median
        rows.append({"rank": r, "ms": t * 1e3, "params": lowrank_params(out_features, in_features, r),
                     "speedup": t_dense / t})
    return rows


def rank_grid(out_features: int, in_features: int,
              fractions=(0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)) -> list[int]:
    """Ranks at these fractions of the break-even rank (capped at min(out, in)), for a
    time-vs-rank plot that shows both sides of the break-even."""
    top, be = min(out_features, in_features), break_even_rank(out_features, in_features)
    return sorted({max(1, min(top, round(f * be))) for f in fractions})


@torch.inference_mode()
def model_times(model, prefill_tokens: int = 512, prompt_len: int = 32, new_tokens: int = 64,
                big_batch: int = 16, warmup: int = 1, repeats: int = 3) -> dict:
    """What a factorisation changes in a model's speed, as one comparison row: the median time of one
    forward pass over `prefill_tokens` tokens (compute-bound: FLOPs matter) and greedy generation
    throughput at batch 1 (memory-bound: bytes read per token matter) and at `big_batch`."""
    prefill = bench.prefill(model, prefill_tokens, warmup=warmup, repeats=repeats)
    b1 = bench.generation(model, 1, prompt_len, new_tokens, warmup=warmup, repeats=repeats)
    bb = bench.generation(model, big_batch, prompt_len, new_tokens, warmup=warmup, repeats=repeats)
    return {"prefill_ms": prefill.median * 1e3, "tok_s_b1": b1.tokens_per_s, "tpot_ms": b1.tpot_s * 1e3,
            f"tok_s_b{big_batch}": bb.tokens_per_s}
