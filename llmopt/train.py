"""One language-model training loop, and the recipe that builds the bundled model.

`train()` is the loop every lesson reuses (the bundled model, distillation, QAT and
recovery fine-tunes pass their own `loss_fn`); `build_bundled()` is the recipe:
tokenizer -> model -> train -> evaluate -> save as bf16 safetensors with a record.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import bench, data, models
from . import eval as evaluate


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    autocast: str = "auto"  # "bf16", "none" or "auto" (bf16 where the device computes it fast): fp32 master weights
    seed: int = 1337
    eval_every: int = 200
    eval_tokens: int = 32768
    log_every: int = 10
    threads: int | None = None

    def __post_init__(self):
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'none', got {self.autocast!r}")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def fast_bf16(device) -> bool:
    """Whether `device` computes bf16 fast: a GPU that supports it, or a CPU with bf16 or AVX-512
    instructions (oneDNN's test). On a 2-core AVX2-only CPU (an AMD EPYC, Zen 3) a training step's
    backward pass ran 26x slower under bf16 autocast than in plain fp32 (BENCHMARKS.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def use_autocast(cfg: TrainConfig, device) -> bool:
    """Resolve `cfg.autocast` for `device`: "auto" means bf16 where `fast_bf16(device)`."""
    return cfg.autocast == "bf16" or (cfg.autocast == "auto" and fast_bf16(device))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def lm_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@dataclass
class TrainLog:
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    eval_loss: list = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0


def train(model, train_stream, cfg: TrainConfig, val_stream=None, loss_fn=lm_loss, params=None,
          progress: bool = True) -> TrainLog:
    """Train `model` on random windows of `train_stream`; returns the loss history."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    batches = data.random_batches(train_stream, cfg.batch_size, cfg.seq_len, g)
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no decay on norms and biases
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    use_amp = use_autocast(cfg, device)
    log, t0 = TrainLog(), time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = (t.to(device) for t in next(batches))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(model, x, y)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.tokens_seen += x.numel()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.steps.append(step)
            log.loss.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if val_stream is not None and (step % cfg.eval_every == 0 or step == cfg.steps - 1):
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                nats, n = evaluate.nll(model, val_stream[: cfg.eval_tokens], cfg.seq_len, progress=False)
            model.train()
            log.eval_steps.append(step)
            log.eval_loss.append(nats / n)
    model.eval()
    log.seconds = time.perf_counter() - t0
    return log


def finetune(model, tokenizer, steps: int = 200, lr: float = 2e-4, batch_size: int = 8, seq_len: int = 512,
             warmup: int | None = None, loss_fn=lm_loss, seed: int = 0, progress: bool = True,
             **train_overrides) -> TrainLog:
    """A short fine-tune of an already trained model on the TRAIN split (QAT, recovery after
    pruning): `train()` with a small learning rate, a warm-up of a tenth of the steps and no
    weight decay, which would pull weights (and learned scales) toward 0. Other `TrainConfig`
    fields (autocast, log_every, threads, ...) pass through."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    known = set(TrainConfig.__dataclass_fields__)
    if set(train_overrides) - known:
        raise ValueError(f"unknown TrainConfig fields {sorted(set(train_overrides) - known)}; known: {sorted(known)}")
    kw = dict(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed, weight_decay=0.0,
              warmup=max(1, steps // 10) if warmup is None else warmup)
    cfg = TrainConfig(**{**kw, **train_overrides})
    return train(model, data.token_stream("train", tokenizer), cfg, loss_fn=loss_fn, progress=progress)


def plot_log(log: TrainLog, path: Path, title: str = "training loss"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(log.steps, log.loss, label="train (one batch)", lw=0.8)
    if log.eval_steps:
        ax.plot(log.eval_steps, log.eval_loss, "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_bundled(out_dir, cfg: TrainConfig | None = None, vocab_size: int = 4096, tiny: bool = False,
                  progress: bool = True, ppl_tokens: int | None = None) -> dict:
    """The recipe for the bundled model. Writes a HF model folder plus `training_record.json`
    and `loss_curve.png` to `out_dir`; returns the record. The perplexities are measured on the
    whole validation and test splits, or on their first `ppl_tokens` tokens."""
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = data.train_tokenizer(vocab_size)
    train_stream = data.token_stream("train", tok)
    val_stream = data.token_stream("validation", tok)
    test_stream = data.token_stream("test", tok)
    torch.manual_seed(cfg.seed)
    config = (models.tiny_config if tiny else models.bundled_config)(len(tok))
    model = LlamaForCausalLM(config)
    log = train(model, train_stream, cfg, val_stream=val_stream, progress=progress)

    model = model.to(torch.bfloat16)  # what ships; evaluate exactly that (in fp32 compute)
    model.float()
    ppl = {s: evaluate.perplexity(model, st, seq_len=cfg.seq_len, max_tokens=ppl_tokens,
                                 progress=progress)
           for s, st in (("validation", val_stream), ("test", test_stream))}
    prompt = "def fibonacci(n):"
    ids = tok(prompt, return_tensors="pt").input_ids
    sample = tok.decode(model.generate(ids, max_new_tokens=60, do_sample=False,
                                       pad_token_id=tok.pad_token_id)[0], skip_special_tokens=True)

    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_new_tokens=128)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    plot_log(log, out / "loss_curve.png", f"{out.name}: {models.param_count(model)/1e6:.1f}M params")
    record = {
        "model": out.name,
        "parameters": models.param_count(model),
        "architecture": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
        "corpus": data.corpus_id(),
        "split_tokens": {"train": train_stream.numel(), "validation": val_stream.numel(),
                         "test": test_stream.numel()},
        "recipe": {**asdict(cfg), "autocast": "bf16" if use_autocast(cfg, "cpu") else "none"},
        "tokens_seen": log.tokens_seen,
        "train_seconds": round(log.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "perplexity_bf16_weights": {k: round(v, 3) for k, v in ppl.items()},
        "perplexity_note": f"back-to-back windows of {cfg.seq_len} tokens (llmopt.eval.perplexity defaults)"
                           + (f", the first {ppl_tokens:,} tokens of each split" if ppl_tokens else ""),
        "sample": {"prompt": prompt, "greedy_60_tokens": sample},
        "machine": {"platform": platform.platform(), "processor": bench.cpu_name(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "loss_curve": {"steps": log.steps, "train": [round(v, 4) for v in log.loss],
                       "eval_steps": log.eval_steps, "validation": [round(v, 4) for v in log.eval_loss]},
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(model_card(record))
    return record


def model_card(record: dict) -> str:
    """The Hugging Face model card (README.md) written beside the weights."""
    a, r, m = record["architecture"], record["recipe"], record["machine"]
    ppl = record["perplexity_bf16_weights"]
    return f"""# {record['model']}

A {record['parameters'] / 1e6:.2f}M-parameter Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention:
{a['num_attention_heads']} query heads, {a['num_key_value_heads']} key/value heads) trained from scratch by
`llmopt train` on the Python standard library ({record['corpus']}), for the course
*Tiny Transformers, Mighty Performance*. Load it with `llmopt.load()` or plain
`AutoModelForCausalLM.from_pretrained` on this folder.

| | |
|---|---|
| layers x hidden x MLP | {a['num_hidden_layers']} x {a['hidden_size']} x {a['intermediate_size']} |
| vocabulary | {a['vocab_size']} (byte-level BPE on the train split) |
| context | {a['max_position_embeddings']} positions (trained on windows of {r['seq_len']}) |
| training | {r['steps']} steps x {r['batch_size']} x {r['seq_len']} tokens = {record['tokens_seen']:,} tokens, \
AdamW lr {r['lr']}, seed {r['seed']}, {record['train_seconds'] / 60:.1f} min |
| machine | {m['processor']}, {m['threads']} threads, torch {m['torch']} |
| perplexity (bf16 weights) | validation {ppl['validation']:.2f}, test {ppl['test']:.2f} |

Greedy from `{record['sample']['prompt']}`:

```python
{record['sample']['greedy_60_tokens']}
```

The loss curve is `loss_curve.png`; the full record `training_record.json`.
"""
