"""Structured pruning's speed on this machine: the dense model against FFN-pruned copies,
measured in turns (dense, pruned, dense, ...) so slow drifts of a shared machine hit both,
beside the FLOP ceiling `bench.matmul_flops` gives. The table in BENCHMARKS.md comes from here.

    python scripts/bench_structured.py [--ratios 0.25 0.5] [--rounds 3] [--threads 1]
"""
import argparse
import copy
import statistics

import torch

import llmopt
from llmopt import bench, data, models, prune
from llmopt import eval as evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinypy")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = llmopt.load(args.model, dtype=torch.float32)
    calib = data.calibration_batches(tok, 128, 256)
    variants = {"dense": model}
    for r in args.ratios:
        variants[f"ffn -{r:.0%}"] = prune.prune_ffn(copy.deepcopy(model), r, calibration=calib)
    runs = {k: {"prefill_ms": [], "tok_s_b16": [], "tok_s_b1": []} for k in variants}
    for _ in range(args.rounds):  # each round measures every variant once, in turn
        for name, m in variants.items():
            runs[name]["prefill_ms"].append(bench.prefill(m, args.prefill, repeats=5).median * 1e3)
            runs[name]["tok_s_b16"].append(bench.generation(m, 16, 32, 64, repeats=1).tokens_per_s)
            runs[name]["tok_s_b1"].append(bench.generation(m, 1, 32, 64, repeats=1).tokens_per_s)
    L = args.prefill
    dense_pre = bench.matmul_flops(model, L, (L + 1) / 2, logits=1)["total"]
    dense_dec = bench.matmul_flops(model, 16, 64)["total"]
    print(bench.environment())
    print(f"| | params M | perplexity | prefill {L} ms | speedup (FLOP ceiling) | tok/s b=16 | speedup (ceiling) "
          f"| tok/s b=1 | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = {k: {c: statistics.median(v) for c, v in cols.items()} for k, cols in runs.items()}
    for name, m in variants.items():
        ppl = evaluate.perplexity(m, tokenizer=tok, split="test", max_tokens=args.ppl_tokens, progress=False)
        pre_c = dense_pre / bench.matmul_flops(m, L, (L + 1) / 2, logits=1)["total"]
        dec_c = dense_dec / bench.matmul_flops(m, 16, 64)["total"]
        d, r = med["dense"], med[name]
        print(f"| {name} | {models.param_count(m) / 1e6:.2f} | {ppl:.3f} | {r['prefill_ms']:.1f} | "
              f"{d['prefill_ms'] / r['prefill_ms']:.2f}x ({pre_c:.2f}x) | {r['tok_s_b16']:.0f} | "
              f"{r['tok_s_b16'] / d['tok_s_b16']:.2f}x ({dec_c:.2f}x) | {r['tok_s_b1']:.0f} | "
              f"{r['tok_s_b1'] / d['tok_s_b1']:.2f}x |")
    print("every run (medians above):", {k: {c: [round(x, 1) for x in v] for c, v in cols.items()}
                                          for k, cols in runs.items()})


if __name__ == "__main__":
    main()
