"""Smaller models against the dense one on this machine: FFN-pruned copies (lesson 04), a shallower
student (lesson 05) and low-rank factorisations (lesson 06). The variants are measured in turns
(dense, then each variant, round after round) so slow drifts of a shared machine hit them all,
beside the FLOP ceiling `bench.matmul_flops` gives. BENCHMARKS.md's speed tables come from here.

    python scripts/bench_smaller.py [--variants ffn:0.25 ffn:0.5 layers:3 lowrank:0.5]
                                    [--rounds 5] [--threads 1] [--no-ppl]
    python scripts/bench_smaller.py --linear     # one linear's time against its rank (lesson 06)

Variants: ffn:R (prune_ffn, R of every MLP's channels removed, calibrated), layers:N (a student with N
of the teacher's layers, init_from_teacher: its speed is that of any trained student of that shape,
its perplexity untrained, so not printed), lowrank:R (whitened factorisation at parameter ratio R).
"""
import argparse
import copy
import statistics

import torch

import llmopt
from llmopt import bench, data, distill, lowrank, models, prune
from llmopt import eval as evaluate


def build(spec: str, model, calib):
    """One variant from its spec: (model, whether its perplexity means anything)."""
    kind, _, value = spec.partition(":")
    if kind == "ffn":
        return prune.prune_ffn(copy.deepcopy(model), float(value), calibration=calib), True
    if kind == "layers":
        cfg = distill.student_config(model.config, num_hidden_layers=int(value))
        return distill.init_from_teacher(model, cfg), False
    if kind == "lowrank":
        return lowrank.factorize(copy.deepcopy(model), "whitened", ratio=float(value), calibration=calib), True
    raise ValueError(f"unknown variant {spec!r}: use ffn:R, layers:N or lowrank:R")


def linear_ranks(repeats: int = 20):
    """Where low rank stops paying: one linear of the bundled model's MLP shape (768 x 256) and of
    TinyLlama-1.1B's (5632 x 2048), dense against its factorisations at ranks around the break-even."""
    print("| shape | tokens | dense ms | " + " | ".join(f"{f:g} x break-even" for f in FRACTIONS) + " |")
    print("|---|---|---|" + "---|" * len(FRACTIONS))
    for m, n in ((768, 256), (5632, 2048)):
        be = lowrank.break_even_rank(m, n)
        ranks = [max(1, min(min(m, n), round(f * be))) for f in FRACTIONS]
        for tokens in (1, 16, 512):
            rows = lowrank.linear_times(m, n, ranks, tokens=tokens, repeats=repeats)
            print(f"| {m}x{n} (break-even rank {be:.0f}) | {tokens} | {rows[0]['ms']:.3f} | " +
                  " | ".join(f"{r['speedup']:.2f}x" for r in rows[1:]) + " |")


FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinypy")
    ap.add_argument("--variants", nargs="+", default=["ffn:0.25", "ffn:0.5"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--no-ppl", action="store_true", help="speed only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--linear", action="store_true", help="only the per-linear time against rank")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.linear:
        print(bench.environment())
        return linear_ranks()

    model, tok = llmopt.load(args.model, dtype=torch.float32)
    calib = data.calibration_batches(tok, 128, 256)
    variants, scored = {"dense": model}, {"dense": True}
    for spec in args.variants:
        variants[spec], scored[spec] = build(spec, model, calib)
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
        ppl = "-"
        if scored[name] and not args.no_ppl:
            score = evaluate.perplexity(m, tokenizer=tok, split="test", max_tokens=args.ppl_tokens, progress=False)
            ppl = f"{score:.3f}"
        pre_c = dense_pre / bench.matmul_flops(m, L, (L + 1) / 2, logits=1)["total"]
        dec_c = dense_dec / bench.matmul_flops(m, 16, 64)["total"]
        d, r = med["dense"], med[name]
        print(f"| {name} | {models.param_count(m) / 1e6:.2f} | {ppl} | {r['prefill_ms']:.1f} | "
              f"{d['prefill_ms'] / r['prefill_ms']:.2f}x ({pre_c:.2f}x) | {r['tok_s_b16']:.0f} | "
              f"{r['tok_s_b16'] / d['tok_s_b16']:.2f}x ({dec_c:.2f}x) | {r['tok_s_b1']:.0f} | "
              f"{r['tok_s_b1'] / d['tok_s_b1']:.2f}x |")
    print("every run (medians above):", {k: {c: [round(x, 1) for x in v] for c, v in cols.items()}
                                          for k, cols in runs.items()})


if __name__ == "__main__":
    main()
