"""Lesson 07's measurements: MoE dispatch paths, MoE-shaped transformers models, sparse upcycling,
the upcycled model quantized with its experts.
BENCHMARKS.md's MoE tables come from here.

    python scripts/bench_moe.py dispatch [--tokens 16 128 1024 4096]
    python scripts/bench_moe.py models
    python scripts/bench_moe.py upcycle [--steps 200] [--out moe_results]
    python scripts/bench_moe.py quantize [--steps 200] [--out moe_results]
    python scripts/bench_moe.py decode [--dtype bfloat16]      # the upcycled model quantized, fused or not
    python scripts/bench_moe.py kernels [--tokens 1 4 16]      # the experts at decode, float vs W4 (a GPU's sizes
                                                                # there; on a CPU the bundled model's, --dtype)
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch

import llmopt
from llmopt import bench, data, moe, train
from llmopt import eval as evaluate

SHAPES = {"8 experts top-2, I=768 (Mixtral-like)": (8, 2, 768),
          "64 experts top-8, I=96 (fine-grained, Qwen/DeepSeek-like)": (64, 8, 96)}


def gemm_rate(hidden, device, dtype, rows=4096, cols=768, repeats=7):
    """FLOP/s of one large matmul on this device: the ceiling any dispatch path can reach."""
    a, w = torch.randn(rows, hidden, device=device, dtype=dtype), torch.randn(cols, hidden, device=device, dtype=dtype)
    t = bench.time_fn(lambda: torch.nn.functional.linear(a, w), device=device, repeats=repeats).median
    return 2 * rows * hidden * cols / t


def dispatch(args):
    paths = ("dense", "loop", "sorted") + (("triton",) if args.device == "cuda" else ())
    peak = gemm_rate(args.hidden, args.device, args.dtype)
    print(bench.environment())
    print(f"one 4096x{args.hidden}x768 {args.dtype} matmul on {args.device}: {peak / 1e9:.0f} GFLOP/s")
    print("| shape | tokens | " + " | ".join(f"{p} ms" for p in paths) +
          " | sorted vs dense | sorted vs loop | best vs loop | loop GFLOP/s |")
    print("|---|---|" + "---|" * (len(paths) + 4))
    rows = []
    for label, (E, k, inter) in SHAPES.items():
        for T in args.tokens:
            t = moe.dispatch_times(T, args.hidden, inter, E, k, paths=paths, device=args.device, dtype=args.dtype,
                                   repeats=args.repeats)
            flops = 2 * T * k * 3 * args.hidden * inter
            rows.append(dict(shape=label, tokens=T, **{n: v * 1e3 for n, v in t.items()}))
            print(f"| {label} | {T} | " + " | ".join(f"{t[p] * 1e3:.2f}" for p in paths) +
                  f" | {t['dense'] / t['sorted']:.2f}x | {t['loop'] / t['sorted']:.2f}x | "
                  f"{t['loop'] / min(t[p] for p in paths if p != 'loop'):.2f}x | {flops / t['loop'] / 1e9:.0f} |")
    return rows


def models(args):
    """Stock transformers MoE models (random weights, small configs) with every dispatch path."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=1024)
    configs = {
        "Mixtral-shaped (8 experts top-2, I=768)": MixtralForCausalLM(MixtralConfig(
            **common, intermediate_size=768, num_local_experts=8, num_experts_per_tok=2)),
        "Qwen3-MoE-shaped (64 experts top-8, I=96)": Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **common, intermediate_size=768, moe_intermediate_size=96, head_dim=32, num_experts=64,
            num_experts_per_tok=8, norm_topk_prob=True)),
    }
    print(f"| model | total / active params | prefill {args.batch}x{args.seq} ms: transformers | dense | loop "
          "| sorted | (triton on a GPU) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label, model in configs.items():
        torch.manual_seed(0)
        model.to(args.device, args.dtype).eval()
        with torch.no_grad():  # Qwen3-MoE zero-initialises its routers: give them something to say
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(std=0.02)
        paths = ("dense", "loop", "sorted") + (("triton",) if args.device == "cuda" else ())
        t = moe.model_dispatch_times(model, args.batch, args.seq, paths=paths, repeats=args.repeats)
        pc = moe.param_counts(model)
        rows.append(dict(model=label, **pc, **{n: v * 1e3 for n, v in t.items()}))
        print(f"| {label} | {pc['total'] / 1e6:.1f}M / {pc['active'] / 1e6:.1f}M | " +
              " | ".join(f"{v * 1e3:.0f}" for v in t.values()) + " |")
    return rows


def upcycle(args):
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = llmopt.load(args.model, dtype=torch.float32)
    probe = data.calibration_batches(tok, 16, 512, seed=1)  # train-split windows for the load histograms
    variants, loads, logs = {"dense": dense}, {}, {}

    def fine_tune(name, model, loss_fn):
        t0 = time.perf_counter()
        logs[name] = train.finetune(model, tok, steps=args.steps, lr=args.lr, loss_fn=loss_fn, progress=False)
        print(f"{name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s, last loss {logs[name].loss[-1]:.3f}")
        variants[name] = model.eval()

    fine_tune(f"dense + {args.steps} steps", copy.deepcopy(dense), train.lm_loss)
    start = moe.upcycle(dense, args.experts, args.top_k).eval()
    name = f"upcycled {args.experts}x top-{args.top_k}, no training"
    variants[name], loads[name] = start, moe.expert_loads(start, probe)
    for label, coef in (("no balancing loss", 0.0), (f"balancing loss {args.balance}", args.balance)):
        name = f"upcycled + {args.steps} steps, {label}"
        fine_tune(name, moe.upcycle(dense, args.experts, args.top_k).train(), moe.moe_lm_loss(coef, args.z))
        loads[name] = moe.expert_loads(variants[name], probe)

    print(bench.environment())
    print("| model | params total / active | GFLOP per token | perplexity | prefill 512 ms | tok/s b=16 | "
          "tok/s b=1 | expert load max/mean |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name, m in variants.items():
        pc = moe.param_counts(m)
        ppl = evaluate.perplexity(m, tokenizer=tok, split="test", max_tokens=args.ppl_tokens, progress=False)
        pre = bench.prefill(m, 512, repeats=5).median
        b16 = bench.generation(m, 16, 32, 64, repeats=3).tokens_per_s
        b1 = bench.generation(m, 1, 32, 64, repeats=3).tokens_per_s
        imb = moe.load_imbalance(loads[name]) if name in loads else None
        rows.append(dict(model=name, **pc, gflop_per_token=moe.flops_per_token(m) / 1e9, perplexity=ppl,
                         prefill_ms=pre * 1e3, tok_s_b16=b16, tok_s_b1=b1, load_max_over_mean=imb))
        print(f"| {name} | {pc['total'] / 1e6:.2f}M / {pc['active'] / 1e6:.2f}M | {rows[-1]['gflop_per_token']:.4f} | "
              f"{ppl:.3f} | {pre * 1e3:.1f} | {b16:.0f} | {b1:.0f} | {'-' if imb is None else f'{imb:.2f}'} |")

    fig, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 3.2), sharey=True)
    for ax, (name, c) in zip(axes, loads.items()):
        share = (c.float() / c.sum(-1, keepdim=True)).numpy()
        for layer, s in enumerate(share):
            ax.plot(range(len(s)), sorted(s, reverse=True), marker="o", ms=3, lw=1, label=f"layer {layer}")
        ax.axhline(1 / c.shape[1], color="k", ls=":", lw=1)
        ax.set(title=name, xlabel="expert (busiest first)")
    axes[0].set_ylabel("share of assignments")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=120)
    (out / "upcycle.json").write_text(json.dumps({"rows": rows, "loads": {k: v.tolist() for k, v in loads.items()},
                                                  "loss": {k: v.loss for k, v in logs.items()}}, indent=1))
    return rows


def quantize(args):
    """The dense model and its upcycled MoE, fine-tuned as `upcycle` does (the MoE with the balancing
    loss), then quantized with `llmopt.quant.quantize`, experts included: size, bytes one batch-1 decode
    step reads, perplexity, decode speed."""
    from llmopt.quant import QuantConfig
    from llmopt.quant import quantize as quantize_model
    from llmopt.quant.linear import CALIBRATED

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = llmopt.load(args.model, dtype=torch.float32)
    calib = data.calibration_batches(tok, args.calib, 256)
    moe_name = f"upcycled {args.experts}x top-{args.top_k}"
    tuned = {}
    for name, model, loss_fn in (("dense", copy.deepcopy(dense), train.lm_loss),
                                 (moe_name, moe.upcycle(dense, args.experts, args.top_k).train(),
                                  moe.moe_lm_loss(args.balance, args.z))):
        t0 = time.perf_counter()
        train.finetune(model, tok, steps=args.steps, lr=args.lr, loss_fn=loss_fn, progress=False)
        print(f"{name}: {args.steps} steps in {time.perf_counter() - t0:.0f} s")
        tuned[name] = model.eval()
    configs = {"float32": None, "W8 RTN per channel": QuantConfig(bits=8),
               "W4 RTN g32": QuantConfig(bits=4, group_size=32),
               "W4 GPTQ g32": QuantConfig(bits=4, group_size=32, method="gptq"),
               "W4 AWQ g32": QuantConfig(bits=4, group_size=32, method="awq"),
               "NF4 (blocks of 64)": QuantConfig(bits=4, method="nf4"),
               "W8A8 SmoothQuant": QuantConfig(bits=8, method="smoothquant")}
    print(bench.environment())
    print(f"| model (+ {args.steps} steps) | weights | size MB | read per token MB | perplexity | tok/s b=1 | "
          "quantize s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for base_name, base in tuned.items():
        for qname, cfg in configs.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                m = base if cfg is None else quantize_model(copy.deepcopy(base), cfg,
                                                            calib if cfg.method in CALIBRATED else None)
            took = time.perf_counter() - t0
            ppl = evaluate.perplexity(m, tokenizer=tok, split="test", max_tokens=args.ppl_tokens, progress=False)
            b1 = bench.generation(m, 1, 32, 64, repeats=3).tokens_per_s
            rows.append(dict(model=base_name, weights=qname, size_mb=bench.model_size_bytes(m) / 1e6,
                             read_mb=bench.weight_bytes(m) / 1e6, perplexity=ppl, tok_s_b1=b1,
                             quantize_s=None if cfg is None else took))
            r = rows[-1]
            print(f"| {base_name} | {qname} | {r['size_mb']:.2f} | {r['read_mb']:.2f} | {ppl:.3f} | {b1:.0f} | "
                  f"{'-' if cfg is None else f'{took:.1f}'} |", flush=True)
    (out / "quantize.json").write_text(json.dumps(rows, indent=1))
    return rows


def decode(args):
    """Batch-1 greedy decode of the upcycled bundled model (not fine-tuned: the speed does not depend on
    it) in `--dtype`: float, and W8 per channel / W4 in groups of 128 (round to nearest, experts
    included) unfused (dequantize + matmul) and fused (`kernels.fuse`: on a CPU PyTorch's weight-only
    kernels, per hit expert in the MoE layers), with the bytes a step reads and the largest logit
    difference of each fused model from its unfused one on two tokens."""
    from llmopt import kernels as kernel_lib
    from llmopt.quant import QuantConfig
    from llmopt.quant import quantize as quantize_model

    dense, _ = llmopt.load(args.model, dtype=torch.float32)
    model = moe.upcycle(dense, args.experts, args.top_k).to(args.device, args.dtype).eval()
    ids = bench.random_prompts(model.config.vocab_size, 1, 32, device=args.device)
    print(bench.environment())
    print(f"{args.model} upcycled {args.experts}x top-{args.top_k}, {args.dtype}, batch 1, 32-token prompt, "
          "64 new tokens")
    print("| weights | tok/s b=1 | MB read per token | max logit diff, fused vs unfused |")
    print("|---|---|---|---|")
    rows = []
    with torch.no_grad():
        variants = [("float", model, None)]
        for name, cfg in (("W8 per channel", QuantConfig(bits=8)), ("W4 g128", QuantConfig(bits=4, group_size=128))):
            q = quantize_model(copy.deepcopy(model), cfg)
            variants += [(name, q, None), (f"{name}, fused", kernel_lib.fuse(copy.deepcopy(q)), q)]
        for name, m, unfused in variants:
            tok_s = bench.generation(m, 1, 32, 64, repeats=args.repeats).tokens_per_s
            two = ids[:, :2]   # two rows: a decode step's size, where the fused kernels run in either dtype
            diff = None if unfused is None else (m(two).logits.float() - unfused(two).logits.float()).abs().max().item()
            rows.append(dict(weights=name, tok_s_b1=tok_s, read_mb=bench.weight_bytes(m) / 1e6, max_logit_diff=diff))
            print(f"| {name} | {tok_s:.1f} | {rows[-1]['read_mb']:.2f} | {'-' if diff is None else f'{diff:.3g}'} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": bench.environment(), "dtype": str(args.dtype), "rows": rows},
                                              indent=2))
    return rows


def kernels(args):
    """One Mixtral-8x7B-shaped MoE layer's experts at decode: float against W4 (RTN, groups of 128), run four
    or five ways (`moe.speed.expert_decode_times`); GB/s of the hit experts' bytes against a copy's."""
    H, inter = (4096, 14336) if args.device == "cuda" else (256, 768)
    peak = bench.memory_bandwidth(args.device)
    print(bench.environment())
    print(f"experts {args.experts} x (H={H}, I={inter}), top-{args.top_k}, {args.dtype}; copy bandwidth "
          f"{peak / 1e9:.0f} GB/s")
    print("| tokens | experts hit | way | us | MB read | GB/s | of copy | vs float sorted |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for T in args.tokens:
        r = moe.speed.expert_decode_times(T, H, inter, args.experts, args.top_k, device=args.device, dtype=args.dtype,
                                          repeats=args.repeats)
        base = r["times"]["float sorted"]
        for way, t in r["times"].items():
            rate = r["bytes"][way] / t
            rows.append(dict(tokens=T, hit=r["hit"], way=way, us=t * 1e6, mb=r["bytes"][way] / 1e6, gbps=rate / 1e9))
            print(f"| {T} | {r['hit']} | {way} | {t * 1e6:.0f} | {r['bytes'][way] / 1e6:.1f} | {rate / 1e9:.0f} | "
                  f"{rate / peak:.0%} | {base / t:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": bench.environment(), "copy_gbps": peak / 1e9, "rows": rows},
                                              indent=2))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["dispatch", "models", "upcycle", "quantize", "decode", "kernels"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 1024, 4096])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--model", default="tinypy")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--balance", type=float, default=0.01)
    ap.add_argument("--z", type=float, default=0.001)
    ap.add_argument("--calib", type=int, default=32, help="quantize: calibration windows of 256 tokens")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--out", default="moe_results")
    ap.add_argument("--json", default=None, help="decode, kernels: write the rows here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="dispatch, decode, kernels: default bfloat16 on a GPU, float32 on a CPU")
    args = ap.parse_args()
    default = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.dtype = getattr(torch, args.dtype) if args.dtype else default
    if args.threads:
        torch.set_num_threads(args.threads)
    run = {"dispatch": dispatch, "models": models, "upcycle": upcycle, "quantize": quantize, "decode": decode,
           "kernels": kernels}
    run[args.what](args)


if __name__ == "__main__":
    main()
