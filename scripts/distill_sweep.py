"""Lesson 05's distillation at other temperatures and weights: the same 3-layer student (three of the
teacher's layers), the same batches and steps as the lesson's section 4, one run per (T, alpha), and
the test perplexity of each, beside hard labels (alpha = 0). The lesson quotes this run's output.

    python scripts/distill_sweep.py [--runs 1:0.9 2:0.9 4:0.9 1:0.5 1:1] [--steps 200] [--kind forward]

Each run is "T:alpha"; alpha 0 is plain training on the labels (T then does nothing). Perplexities do
not depend on the machine's load; the seconds printed do.
"""
import argparse
import copy
import time

import torch

import llmopt
from llmopt import data
from llmopt import eval as evaluate
from llmopt.distill import distill, init_from_teacher, student_config
from llmopt.train import TrainConfig, train


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["0:0", "1:0.9", "2:0.9", "4:0.9", "1:0.5", "1:1"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--kind", default="forward", choices=["forward", "reverse"])
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    teacher, tokenizer = llmopt.load("tinypy", device=torch.device("cpu"), dtype=torch.float32)

    def ppl(m):
        return evaluate.perplexity(m, tokenizer=tokenizer, split="test", progress=False)

    student0 = init_from_teacher(teacher, student_config(teacher.config, num_hidden_layers=args.layers))
    cfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=512, lr=1e-3, warmup=max(1, args.steps // 10),
                      eval_every=args.steps, eval_tokens=32768, log_every=args.steps)
    train_stream = data.token_stream("train", tokenizer)
    val_stream = data.token_stream("validation", tokenizer)
    print(f"teacher test perplexity {ppl(teacher):.3f}; student before training {ppl(student0):.3f}; "
          f"{args.steps} steps of 8x512 tokens, lr 1e-3, {args.kind} KL, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'T':>4} {'alpha':>6} {'test ppl':>9} {'val loss':>9} {'seconds':>8}")
    for run in args.runs:
        T, alpha = (float(v) for v in run.split(":"))
        student = copy.deepcopy(student0)
        t0 = time.perf_counter()
        if alpha == 0:
            log = train(student, train_stream, cfg, val_stream=val_stream, progress=False)
        else:
            log = distill(teacher, student, train_stream, cfg, temperature=T, alpha=alpha, kind=args.kind,
                          val_stream=val_stream, progress=False)
        seconds = time.perf_counter() - t0
        label = f"{T:4g}" if alpha else "   -"
        print(f"{label} {alpha:6g} {ppl(student):9.3f} {log.eval_loss[-1]:9.4f} {seconds:8.0f}", flush=True)


if __name__ == "__main__":
    main()
