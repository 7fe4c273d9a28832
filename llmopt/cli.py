"""The `llmopt` command: `llmopt tour` (measure a model), `llmopt train` (the bundled model) and
`llmopt bench kernels` (the Triton kernels of lesson 08), `llmopt bench serve` and `llmopt bench decode` (the
engine, lessons 09-10),
`llmopt serve` (an OpenAI-compatible server), `llmopt bench http` (that server under concurrent clients) and
`llmopt export onnx` (for onnxruntime and Transformers.js).

Bad arguments and load errors print one line (`llmopt: error: ...`) and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _need_extra(extra: str, *modules: str) -> None:
    """A one-line error naming the pip extra to install, rather than an ImportError later."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed: this command needs llmopt's {extra!r} extra, "
                         f"pip install \"llmopt[{extra}]\"")


def _check_output(option: str, path) -> None:
    """An output file's folder must exist: checked before a run, not after it."""
    if path is not None and not Path(path).expanduser().parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {Path(path).expanduser().parent} does not exist")


def _train(args):
    from . import train

    cfg = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr=args.lr, seed=args.seed, autocast=args.autocast)
    if args.ppl_tokens is not None and args.ppl_tokens < 2:
        raise ValueError(f"--ppl-tokens must be >= 2, got {args.ppl_tokens}")
    out = args.out
    record = train.build_bundled(out, cfg, vocab_size=args.vocab_size, tiny=args.tiny, ppl_tokens=args.ppl_tokens)
    print(f"saved {out}: {record['parameters']/1e6:.2f}M params, {record['tokens_seen']:,} tokens, "
          f"{record['train_seconds']/60:.1f} min; perplexity {record['perplexity_bf16_weights']}")
    print(record["sample"]["greedy_60_tokens"])


def _tour(args):
    from .tour import tour

    report = tour(args.model, args.out, smoke=args.smoke or os.environ.get("LLMOPT_SMOKE") == "1")
    print(report)
    print(f"saved {Path(args.out) / 'results.json'} and {Path(args.out) / 'roofline.png'}")


def _bench(args):
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device is not None:
        if args.what in ("http", "weight-only"):
            raise ValueError(f"--device is for bench kernels, serve and decode; bench {args.what} runs "
                             + ("on the CPU (PyTorch's CPU kernels)" if args.what == "weight-only" else
                                "the server on its default device (cuda if present, else cpu)"))
        from .models import pick_device

        pick_device(args.device)   # a clear error now, before any model is loaded
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.what == "kernels":
        from .kernels.bench import main

        main(args.device, args.json, compile=not args.no_compile, only=tuple(args.only), repeats=args.repeats or 100,
             e2e=args.e2e, model=args.model, configs=args.configs, config_rows=tuple(args.config_rows),
             e2e_dtype=None if args.dtype == "auto" else args.dtype)
    elif args.what == "weight-only":
        import torch

        from .kernels.cpu import main

        dtypes = ("float32", "bfloat16") if args.dtype == "auto" else (args.dtype,)
        main(args.json, copies=args.copies, rows=tuple(args.rows), dtypes=tuple(getattr(torch, d) for d in dtypes))
    elif args.what == "decode":
        from .serving.bench import decode_main

        decode_main(args.model, batch_sizes=tuple(args.batch_sizes), new_tokens=args.new_tokens, json_path=args.json,
                    repeats=args.repeats or 10, systems=tuple(args.variants), device=args.device,
                    scheduler_steps=args.scheduler_steps, dtype=None if args.dtype == "auto" else args.dtype)
    elif args.what == "http":
        _need_extra("serve", "fastapi", "uvicorn")   # the server it starts
        from .serving.http_bench import main

        if args.requests < 1 or args.concurrency < 1:
            raise ValueError("--requests and --concurrency must be >= 1")
        if not args.time_limit > 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
        main(args.model, n=args.requests, concurrency=args.concurrency, json_path=args.json, threads=args.threads,
             stream=not args.no_stream, engine_thread=args.engine_thread, repeats=args.repeats or 3,
             time_limit=args.time_limit)
    else:
        from .serving.bench import main

        if args.requests < 1 or args.batch_size < 1:
            raise ValueError("--requests and --batch-size must be >= 1")
        if args.kv_cache_mb is not None and args.kv_cache_mb <= 0:
            raise ValueError(f"--kv-cache-mb must be > 0, got {args.kv_cache_mb}")
        if args.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
        if args.shared_prefix < 0:
            raise ValueError(f"--shared-prefix must be >= 0 tokens, got {args.shared_prefix}")
        main(args.model, n=args.requests, batch_size=args.batch_size, json_path=args.json, plot_path=args.plot,
             shared_prefix=args.shared_prefix, systems=tuple(args.systems), block_size=args.block_size,
             repeats=args.repeats or 1, device=args.device,
             kv_cache_memory=None if args.kv_cache_mb is None else int(args.kv_cache_mb * 2**20))


def _export(args):
    if args.new_tokens < 2:   # the first token's time is the prompt's: the decode speed needs a second one
        raise ValueError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    _need_extra("export", "onnx", "onnxruntime", *(["onnx_ir"] if "q4" in args.quantize else []))
    from .export.onnx import export_onnx, format_export, measure_export
    from .models import default_model

    files = export_onnx(args.model, args.out, quantize=tuple(q for q in args.quantize if q != "none"))
    print(format_export(measure_export(files, args.model or default_model(), new_tokens=args.new_tokens)))
    print(f"saved {args.out} (load it in Transformers.js with env.localModelPath and dtype fp32 / q8 / q4)")


def _serve(args):
    _need_extra("serve", "fastapi", "uvicorn")
    from .serving.server import serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for name in ("threads", "max_num_seqs", "num_scheduler_steps", "max_queue"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    spec = None
    if args.speculative_config is not None:
        import json

        from .serving.speculative import SpeculativeConfig

        try:
            spec = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config must be JSON, such as '{{\"model\": \"tinypy\"}}': {e}") from None
        SpeculativeConfig.of(spec)   # its errors now, not in the engine's process
    compilation = args.compilation_config
    if compilation is not None:
        import json

        from .serving.runner import compilation_level

        try:
            compilation = json.loads(compilation)
        except json.JSONDecodeError:
            raise ValueError(f"--compilation-config must be a level (0-3) or JSON such as '{{\"level\": 3}}', "
                             f"got {compilation!r}") from None
        compilation_level(compilation)
    serve(args.model, host=args.host, port=args.port, max_queue=args.max_queue, request_timeout=args.request_timeout,
          threads=args.threads, engine_process=not args.engine_thread, fuse=args.fuse,
          served_model_name=args.served_model_name, max_num_seqs=args.max_num_seqs,
          num_scheduler_steps=args.num_scheduler_steps, kv_cache_dtype=args.kv_cache_dtype, speculative_config=spec,
          compilation_config=compilation)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmopt", description="Tiny Transformers, Mighty Performance")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("tour", help="measure the baseline (and each technique) on a model")
    t.add_argument("--model", default=None, help="bundled name, local directory or hub id "
                   "(default: $LLMOPT_MODEL or the bundled model)")
    t.add_argument("--out", default="tour_results", help="folder for results.json and plots")
    t.add_argument("--smoke", action="store_true", help="tiny sizes and 1 repeat, for CI (also LLMOPT_SMOKE=1)")
    t.set_defaults(func=_tour)

    t = sub.add_parser("train", help="train the bundled model from scratch (the recipe in data/)")
    t.add_argument("--out", required=True,
                   help="output folder (data/tinypy replaces the bundled model)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                   help="bf16 autocast; auto: where the device computes bf16 fast (the bundled model: bf16)")
    t.add_argument("--tiny", action="store_true", help="the 2-layer test architecture")
    t.add_argument("--ppl-tokens", type=int, default=None, help="measure the final perplexities on this many "
                   "tokens of each split (default: the whole validation and test splits, minutes on a CPU)")
    t.set_defaults(func=_train)

    t = sub.add_parser("bench", help="benchmarks: `kernels` times the Triton kernels (lesson 08), `weight-only` "
                       "PyTorch's INT8/INT4 CPU kernels, `serve` the engine against HF generate (lessons 09-10), "
                       "`decode` the engine's decode speed (CUDA graphs, W4 + fused kernels) against HF generate and "
                       "the bandwidth floor, `http` `llmopt serve`")
    t.add_argument("what", choices=["kernels", "serve", "decode", "http", "weight-only"],
                   help="weight-only: PyTorch's INT8/INT4 CPU kernels vs the float layer and dequantize + matmul")
    t.add_argument("--device", default=None, help="kernels, serve, decode: cpu, cuda[:N] or mps (default: cuda if "
                   "present, else cpu; kernels on a CPU: correctness checks and the references' timings only)")
    t.add_argument("--json", default=None, help="also write the results to this JSON file")
    t.add_argument("--only", nargs="*", default=[], help="kernels: the kernels to keep, by the start of their "
                   "names (rmsnorm, swiglu, softmax, rope, w4a16, w8a16, gemv)")
    t.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (kernels: default 100, at "
                   "most 25 on a CPU; decode: 10; http: 3, each run of the workload over HTTP followed by one "
                   "in-process; serve: 1, the systems interleaved)")
    t.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    t.add_argument("--copies", type=int, default=1, help="weight-only: cycle through this many copies of each "
                   "layer's weights, so they come from memory rather than the caches, as in a model's decode step")
    t.add_argument("--e2e", action="store_true", help="also decode with the fused model and the W4 and W8 models, "
                   "unfused and fused")
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="kernels --e2e and decode: the model's dtype (auto: bfloat16 on a GPU, float32 on a CPU; "
                   "on a CPU PyTorch's weight-only kernels behind the W4 variants are fast in bfloat16); "
                   "weight-only: the one dtype to time (auto: float32 and bfloat16)")
    t.add_argument("--configs", action="store_true", help="kernels, on a GPU: also time every W4A16 GEMV "
                   "candidate config on the 7B-class layers")
    t.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="weight-only: rows of x (tokens) to time")
    t.add_argument("--config-rows", type=int, nargs="+", default=[1, 8], help="kernels --configs: the batch "
                   "sizes (rows) to sweep (default: 1 8)")
    t.add_argument("--model", default=None, help="kernels --e2e, serve, decode and http: the model (default: the "
                   "bundled one; tinyllama-1.1b-random for a 1.1B-shaped random model)")
    t.add_argument("--requests", type=int, default=64, help="serve: number of requests")
    t.add_argument("--batch-size", type=int, default=16, help="serve: HF static batch size")
    t.add_argument("--concurrency", type=int, default=32, help="http: concurrent clients")
    t.add_argument("--no-stream", action="store_true", help="http: one JSON answer per request, not SSE")
    t.add_argument("--threads", type=int, default=None, help="http: the server's CPU threads (default: one per core)")
    t.add_argument("--time-limit", type=float, default=600, help="http: seconds each run may take; requests not "
                   "answered by then count as lost")
    t.add_argument("--engine-thread", action="store_true", help="http: the server runs its engine in a thread, "
                   "not in a process of its own")
    t.add_argument("--shared-prefix", type=int, default=0, help="serve: tokens of system prompt all requests share")
    t.add_argument("--systems", nargs="+", default=["single", "static", "engine"],
                   choices=["single", "static", "engine", "engine-no-prefix-cache", "engine-multistep", "engine-fp8",
                            "engine-compiled"],
                   help="serve: which servers to run (engine-multistep: num_scheduler_steps=8; engine-fp8: "
                   "kv_cache_dtype='fp8'; engine-compiled: compilation_config=3, its first run compiling)")
    t.add_argument("--kv-cache-mb", type=float, default=None, help="serve: the engines' KV cache in MB (default: "
                   "room for every sequence); a small one shows what an FP8 cache's 2-4x the tokens buy")
    t.add_argument("--block-size", type=int, default=16, help="serve: KV block size of the engine")
    t.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="decode: batch sizes")
    t.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per sequence")
    t.add_argument("--variants", nargs="+", default=["hf", "eager", "graphs", "fused", "w4-fused"],
                   choices=["hf", "eager", "graphs", "graphs-multistep", "compiled", "compiled-multistep", "fused",
                            "merged", "multistep", "gemv", "gemv-multistep", "gemv-pdl", "gemv-multistep-pdl",
                            "w4-fused", "w4-merged", "w4-multistep", "w4-compiled"],
                   help="decode: what to run (merged: fuse(merge=True), q/k/v and gate/up as one matmul each; "
                   "gemv: fuse(gemv=True), the norms and the SwiGLU inside the decode matmuls; "
                   "*-pdl: with programmatic dependent launch (Hopper); compiled: the decode step by torch.compile "
                   "(w4-compiled: the W4 multistep one's); "
                   "*multistep: also multi-step decoding, --scheduler-steps tokens per host sync)")
    t.add_argument("--scheduler-steps", type=int, default=8, help="decode: num_scheduler_steps of the multistep "
                   "variants")
    t.add_argument("--plot", default=None, help="serve: write the plot here")
    t.set_defaults(func=_bench)

    t = sub.add_parser("export", help="export a model for other runtimes: `onnx` for onnxruntime and "
                       "Transformers.js (browser, Node), fp32 and int8 / 4-bit quantized (lesson 11)")
    t.add_argument("what", choices=["onnx"])
    t.add_argument("--model", default=None, help="default: the bundled model")
    t.add_argument("--out", default="onnx_export", help="folder to write (Transformers.js' layout)")
    t.add_argument("--quantize", nargs="*", default=["q8", "q4"], choices=["q8", "q4", "none"],
                   help="quantized variants to add beside the fp32 file")
    t.add_argument("--new-tokens", type=int, default=64, help="tokens generated to time each file (>= 2)")
    t.set_defaults(func=_export)

    t = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the engine (lesson 11)")
    t.add_argument("--model", default=None, help="bundled name, local directory (one written by "
                   "llmopt.quant.save_quantized too) or hub id")
    t.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    t.add_argument("--fuse", nargs="?", const="plain", default=None, choices=["plain", "merge", "gemv"],
                   help="swap in the fused modules of lesson 08 (Triton kernels on a GPU, their PyTorch references on "
                   "a CPU); merge: also q/k/v and gate/up as one matmul each; gemv: merged, and the norms and the "
                   "SwiGLU inside the decode matmuls")
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("--max-num-seqs", type=int, default=64, help="sequences the engine runs at once")
    t.add_argument("--num-scheduler-steps", type=int, default=1, help="greedy decode steps per host sync "
                   "(multi-step decoding, lesson 10); streams then get up to this many tokens at a time")
    t.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="the KV cache's dtype (vLLM's flag): fp8 holds 2x the tokens of bf16 in the same memory "
                   "(lesson 09)")
    t.add_argument("--speculative-config", default=None, help="speculative decoding, as JSON (vLLM's flag): "
                   "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' or a draft model, "
                   "'{\"model\": \"NAME\", \"num_speculative_tokens\": 4}' (lesson 10)")
    t.add_argument("--compilation-config", "-O", default=None, help="vLLM's flag: a level (0: none; 1-3: the "
                   "decode step by torch.compile, one compile per batch size as it first comes) or JSON, "
                   "'{\"level\": 3}' (lesson 10)")
    t.add_argument("--max-queue", type=int, default=256, help="requests held at once; more get 429")
    t.add_argument("--request-timeout", type=float, default=600, help="seconds before a request gets 504")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for the model's math (default: "
                   "PyTorch's, one per core); fewer leave cores to the HTTP layer on a small CPU")
    t.add_argument("--engine-thread", action="store_true", help="run the engine in a thread of the server's "
                   "process (default: a process of its own, so the two Pythons do not share one lock)")
    t.set_defaults(func=_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:   # bad input, a missing or existing file, a folder not writable
        print(f"llmopt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
