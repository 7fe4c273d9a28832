"""Merged projections (`kernels.fuse(model, merge=True)`) against separate ones, one decoder layer of
the bundled model at batch-1 decode (one token), on this machine's CPU: q/k/v as one matmul instead of
three, gate/up as one instead of two. Median of 5 runs of 20,000 calls each.

    python scripts/bench_merge.py
"""
import copy
import statistics
import time

import torch

import llmopt
from llmopt import kernels


def per_call_us(fn, calls: int = 20_000, runs: int = 5) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main():
    model, _ = llmopt.load(None, device="cpu", dtype=torch.float32)
    model.eval()
    cfg = model.config
    separate = kernels.fuse(copy.deepcopy(model)).model.layers[0]
    merged = kernels.fuse(copy.deepcopy(model), merge=True).model.layers[0]
    x = torch.randn(1, 1, cfg.hidden_size)
    print(f"{torch.get_num_threads()} threads, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, "
          f"{cfg.num_attention_heads} q heads / {cfg.num_key_value_heads} kv heads, float32, one token")
    with torch.inference_mode():
        a = per_call_us(lambda: separate.self_attn.qkv(x))
        b = per_call_us(lambda: merged.self_attn.qkv(x))
        print(f"q, k, v projections: separate {a:.1f} us, merged {b:.1f} us ({a / b:.2f}x)")
        a, b = per_call_us(lambda: separate.mlp(x)), per_call_us(lambda: merged.mlp(x))
        print(f"MLP (gate, up, SwiGLU, down): separate {a:.1f} us, merged {b:.1f} us ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
