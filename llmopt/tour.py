"""`llmopt tour`: the baseline, measured, then one row per technique as lessons add them.

`baseline()` is also what notebook 00 calls, so the notebook, the tour and the README
all show numbers from the same code.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from . import bench, models
from . import eval as evaluate
from .quant import bnb
from .report import Report, plot_roofline


@dataclass
class TourConfig:
    prompt_len: int = 32
    new_tokens: int = 64
    big_batch: int = 16
    ppl_tokens: int | None = None  # None: the whole test split
    repeats: int = 3
    calib_samples: int = 128       # PTQ and pruning calibration: windows of the train split
    calib_len: int = 256
    train_steps: int = 200         # pruning's recovery, the distilled student, the upcycled MoE (0: no such rows)

    @classmethod
    def smoke(cls):
        return cls(prompt_len=16, new_tokens=16, big_batch=4, ppl_tokens=4096, repeats=1, calib_samples=16,
                   calib_len=128, train_steps=2)


def measure(model, tokenizer, cfg: TourConfig, bandwidth: float | None = None,
            progress: bool = True, generate_fn=None, perplexity: float | None = None) -> tuple[dict, dict]:
    """One comparison row (size, perplexity, latency and throughput, memory, share of the
    roofline) and the raw measurements behind it (timings with their spread, the roofline).
    `generate_fn` times another generation path (the serving engine) on the same harness;
    `perplexity` reuses a known value for the same weights."""
    ppl = perplexity if perplexity is not None else evaluate.perplexity(
        model, tokenizer=tokenizer, split="test", max_tokens=cfg.ppl_tokens, progress=progress)
    b1 = bench.generation(model, 1, cfg.prompt_len, cfg.new_tokens, repeats=cfg.repeats, generate_fn=generate_fn)
    bb = bench.generation(model, cfg.big_batch, cfg.prompt_len, cfg.new_tokens, repeats=cfg.repeats,
                          generate_fn=generate_fn)
    # TPOT is (whole run - 1-token run) / (tokens - 1); with 1 repeat on a busy machine noise can make it
    # <= 0: then the whole run's time per token (prefill included, an upper bound) stands in for it
    roof = bench.decode_roofline(model, b1.tpot_s if b1.tpot_s > 0 else b1.total_s / b1.new_tokens, bandwidth)
    row = {
        "size_mb": bench.model_size_bytes(model) / 1e6,
        "perplexity": ppl,
        "tok_s_b1": b1.tokens_per_s,
        "ttft_ms": b1.ttft_s * 1e3,
        "tpot_ms": b1.tpot_s * 1e3,
        f"tok_s_b{cfg.big_batch}": bb.tokens_per_s,
        f"req_s_b{cfg.big_batch}": bb.requests_per_s,
        "peak_mem_mb": max(b1.peak_memory_bytes, bb.peak_memory_bytes) / 1e6,
        "roofline_pct": 100 * roof.fraction_of_floor,
        "joules_per_tok": b1.joules_per_token,
    }
    return row, {"batch_1": b1, f"batch_{cfg.big_batch}": bb, "roofline": roof}


def baseline(model_name=None, cfg: TourConfig | None = None, dtype=None, device=None,
             progress: bool = True) -> tuple[Report, dict]:
    """Load a model and measure it; returns the report and the raw measurements."""
    cfg = cfg or TourConfig()
    model, tok = models.load(model_name, dtype=dtype, device=device)
    dev = next(model.parameters()).device
    bw = bench.memory_bandwidth(dev)
    report = Report(title=f"llmopt tour: {model_name or models.default_model()} on {dev.type}",
                    env=bench.environment())
    row, raw = measure(model, tok, cfg, bw, progress)
    method = f"baseline {str(model.dtype).removeprefix('torch.')}"
    report.add(method, **row)
    report.details[method] = {k: asdict(v) for k, v in raw.items()}  # every run's time, in the JSON
    roof = raw["roofline"]
    report.notes.append(
        f"roofline: {roof.weight_bytes/1e6:.1f} MB of weights per decode step / {bw/1e9:.1f} GB/s "
        f"measured copy bandwidth = {roof.floor_tokens_per_s:,.0f} tok/s floor; measured "
        f"{roof.measured_tokens_per_s:,.0f} tok/s at batch 1")
    return report, {"bandwidth": bw, "roofline": roof, "model": model, "tokenizer": tok}


def w4_group_size(model) -> int | None:
    """The 4-bit rows' group: the largest of 128, 64 and 32 that divides every decoder linear's
    in_features (128 on Llama-sized models, 64 on tiny-random), else None (a scale per output channel)."""
    from .quant import calibrate

    ins = {lin.in_features for layer in calibrate.decoder_layers(model) for lin in calibrate.linears(layer).values()}
    return next((g for g in (128, 64, 32) if all(k % g == 0 for k in ins)), None)


def techniques(tokenizer=None, cfg: TourConfig | None = None, model_name=None, base_dtype=None,
               group_size: int | None = 128) -> list:
    """(row name, function that turns a copy of the float model into the candidate).
    Each lesson adds its methods here, so `llmopt tour` grows a row per technique.
    `base_dtype`: the float model's dtype; the "bfloat16" row is left out when it is bfloat16.
    `group_size`: the 4-bit rows' (`w4_group_size(model)`; None: per output channel)."""
    import torch

    from . import distill, lowrank, moe, prune, train
    from .data import calibration_batches
    from .kernels import fuse
    from .quant import QuantConfig, bnb, quantize

    cfg = cfg or TourConfig()
    calib = []  # made once, on first use, and shared by the calibrated methods

    def calibrated(qcfg=None, then=quantize):
        """A maker that calls then(model, qcfg, calibration) (or then(model, calibration))."""
        def make(model):
            if not calib:
                calib.append(calibration_batches(tokenizer, cfg.calib_samples, cfg.calib_len))
            return then(model, calib[0]) if qcfg is None else then(model, qcfg, calib[0])
        return make

    def ffn_recovered(model, calibration):
        prune.prune_ffn(model, 0.25, calibration)
        prune.recover(model, tokenizer, steps=cfg.train_steps, progress=False)
        return model

    def distilled_student(teacher):  # lesson 05: half the layers, from the teacher's, then distilled
        student = distill.init_from_teacher(teacher, distill.student_config(
            teacher.config, num_hidden_layers=max(1, teacher.config.num_hidden_layers // 2)))
        train.finetune(student, tokenizer, steps=cfg.train_steps, lr=1e-3, progress=False,
                       loss_fn=distill.distill_loss_fn(teacher, temperature=1.0, alpha=0.9))
        return student.eval()

    def upcycled(model):  # lesson 07: 8 copies of every FFN, top-2, then fine-tuned with the balancing loss
        big = moe.upcycle(model, num_experts=8, top_k=2)
        train.finetune(big, tokenizer, steps=cfg.train_steps, progress=False, loss_fn=moe.moe_lm_loss())
        return big.eval()

    trained = [
        (f"ffn -25% + {cfg.train_steps}-step recovery", calibrated(then=ffn_recovered)),
        (f"student, half the layers + {cfg.train_steps}-step distillation", distilled_student),
        (f"moe 8x top-2 upcycled + {cfg.train_steps} steps", upcycled),
    ] if cfg.train_steps else []

    g = f"g{group_size}" if group_size else "per-channel"
    w4 = []  # the same storage (4-bit codes, a scale per group of inputs) with and without zero points
    for sym, label in ((True, "symmetric"), (False, "zero-point")):
        kw = dict(bits=4, group_size=group_size, symmetric=sym)
        w4 += [(f"rtn w4 {g} {label}", lambda m, kw=kw: quantize(m, QuantConfig(**kw))),
               (f"gptq w4 {g} {label}", calibrated(QuantConfig(**kw, method="gptq", act_order=True))),
               (f"awq w4 {g} {label}", calibrated(QuantConfig(**kw, method="awq")))]

    # lesson 08: quantized in bfloat16, then fused (PyTorch's weight-only kernels on a CPU, Triton's on a GPU)
    def kernels_bf16(qcfg):
        return lambda m: fuse(quantize(m.to(torch.bfloat16), qcfg), merge=True)

    bf16 = ([] if base_dtype == torch.bfloat16 else [("bfloat16", lambda m: m.to(torch.bfloat16))]) + [
        ("bfloat16 + rtn w8 per-channel, fused", kernels_bf16(QuantConfig(bits=8))),
        (f"bfloat16 + rtn w4 {g} symmetric, fused", kernels_bf16(QuantConfig(bits=4, group_size=group_size))),
    ]
    return [
        ("rtn w8 per-channel", lambda m: quantize(m, QuantConfig(bits=8))),
        *w4,
        ("nf4 double-quant", lambda m: quantize(m, QuantConfig(bits=4, method="nf4", double_quant=True))),
        ("smoothquant w8a8", calibrated(QuantConfig(bits=8, method="smoothquant"))),
        # lesson 04: zeros in dense tensors (same size and speed here; the 2:4 kernel is a GPU's)...
        ("magnitude 50%", lambda m: prune.prune(m, "magnitude", 0.5)),
        ("wanda 50%", calibrated(then=lambda m, c: prune.prune(m, "wanda", 0.5, c))),
        ("sparsegpt 50%", calibrated(then=lambda m, c: prune.prune(m, "sparsegpt", 0.5, c))),
        ("sparsegpt 2:4", calibrated(then=lambda m, c: prune.prune(m, "sparsegpt", calibration=c, nm=(2, 4)))),
        # ...and a smaller model: a quarter of every MLP's channels removed
        ("ffn -25%", calibrated(then=lambda m, c: prune.prune_ffn(m, 0.25, c))),
        # lesson 06: every decoder linear as two thin factors holding half its weights
        ("low-rank whitened 50%", calibrated(then=lambda m, c: lowrank.factorize(m, "whitened", ratio=0.5,
                                                                                   calibration=c))),
    ] + trained + bf16 + ([  # bitsandbytes loads the model itself, from its folder
        ("bnb nf4 double-quant", lambda m: bnb.load(model_name, "nf4", double_quant=True, compute_dtype=m.dtype,
                                                    device=m.device)[0]),
        ("bnb llm.int8", lambda m: bnb.load(model_name, "int8", device=m.device)[0]),
    ] if bnb.available() and str(model_name) not in models.RANDOM else [])   # a random model has no checkpoint


def tour(model_name=None, out_dir="tour_results", smoke: bool = False, progress: bool = True) -> Report:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TourConfig.smoke() if smoke else TourConfig()
    report, raw = baseline(model_name, cfg, progress=progress)
    roof = raw["roofline"]
    for name, make in techniques(raw["tokenizer"], cfg, model_name or models.default_model(), raw["model"].dtype,
                                 w4_group_size(raw["model"])):
        candidate = make(copy.deepcopy(raw["model"]))
        row, details = measure(candidate, raw["tokenizer"], cfg, raw["bandwidth"], progress)
        row["size_mb"] += bnb.quant_state_bytes(candidate) / 1e6  # 0 unless bitsandbytes holds a quant_state
        report.add(name, **row)
        report.details[name] = {k: asdict(v) for k, v in details.items()}
        del candidate
    # lessons 09-10: the same float model served by the llmopt engine (paged KV cache, continuous
    # batching; no prefix caching, since the harness repeats the same prompts)
    from .serving import LLMEngine, generate_fn

    engine = LLMEngine(raw["model"], raw["tokenizer"], max_num_seqs=cfg.big_batch, enable_prefix_caching=False)
    name = "llmopt engine (paged KV, continuous batching)"
    row, details = measure(raw["model"], raw["tokenizer"], cfg, raw["bandwidth"], progress,
                           generate_fn=generate_fn(engine), perplexity=report.rows[0]["perplexity"])
    report.add(name, **row)
    report.details[name] = {k: asdict(v) for k, v in details.items()}
    fig = plot_roofline({m["method"]: m["tok_s_b1"] for m in report.rows}, roof.floor_tokens_per_s,
                        path=out / "roofline.png")
    import matplotlib.pyplot as plt

    plt.close(fig)  # a terminal command keeps no figures open
    report.to_json(out / "results.json")
    return report
