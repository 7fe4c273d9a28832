"""Loading models: the bundled one by its short name, a local directory, or a hub id.

`load()` is the one door every notebook and the CLI go through, so device and dtype
choice and the error messages live here once.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import torch

DEFAULT_MODEL = "tinypy"
# Short names -> folder under data/.
BUNDLED = {"tinypy": "tinypy"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def data_dir() -> Path:
    """Where the bundled models live: the repo's `data/` (source or editable install)
    or the copy a regular `pip install .` puts under `<prefix>/share/llmopt`;
    `LLMOPT_DATA_DIR` overrides both."""
    if os.environ.get("LLMOPT_DATA_DIR"):
        return Path(os.environ["LLMOPT_DATA_DIR"])
    candidates = [Path(__file__).resolve().parents[1] / "data",
                  Path(sysconfig.get_path("data")) / "share" / "llmopt",
                  Path(sys.prefix) / "share" / "llmopt"]
    for c in candidates:
        if (c / BUNDLED[DEFAULT_MODEL] / "config.json").exists():
            return c
    return candidates[0]


def bundled_path(name: str = DEFAULT_MODEL) -> Path:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {sorted(BUNDLED)}")
    return data_dir() / BUNDLED[name]


def default_model() -> str:
    """`LLMOPT_MODEL` if set, else the bundled model (the notebooks' parameters cell)."""
    return os.environ.get("LLMOPT_MODEL") or DEFAULT_MODEL


def pick_device(device=None) -> torch.device:
    """cuda, then mps, then cpu; or the one asked for (checked)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU; use device='cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps' asked for, but MPS is not available; use device='cpu'")
    return dev


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 on CUDA, fp16 on MPS, fp32 on CPU (fastest and exact there)."""
    if dtype is None or dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be a float dtype ({sorted(set(_DTYPES))}), got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")


def tiny_config(vocab_size: int = 4096, **overrides):
    """A Llama config with every feature of the bundled model (GQA, RoPE, SwiGLU,
    RMSNorm) that builds in milliseconds: for unit tests."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def bundled_config(vocab_size: int = 4096):
    """The bundled model's architecture: 6.6M parameters with a 4096-token vocabulary."""
    return tiny_config(vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                       rope_theta=10000.0)


def tinyllama_config(vocab_size: int = 32000, **overrides):
    """TinyLlama-1.1B's architecture (22 layers, hidden 2048, 32 query / 4 KV heads)."""
    kw = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048)
    kw.update(overrides)
    return tiny_config(vocab_size, **kw)


# Random-weight models built on the fly with the bundled tokenizer, no download: a tiny one
# for unit tests, and TinyLlama-1.1B's shape for timing on a GPU (speed does not depend on
# the weights; quality numbers of these are meaningless).
RANDOM = {"tiny-random": tiny_config, "tinyllama-1.1b-random": tinyllama_config}


def load_tokenizer(name_or_path=DEFAULT_MODEL):
    from transformers import AutoTokenizer

    path = bundled_path() if name_or_path in RANDOM else _resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(str(path))
    _prepare_tokenizer(tok)
    return tok


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only: batched generate needs left padding


def _resolve(name_or_path) -> Path | str:
    """A Path for local models, the string itself for a hub id."""
    name = str(name_or_path)
    if name in BUNDLED:
        p = bundled_path(name)
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"the bundled model {name!r} is missing from {p}; reinstall llmopt or run "
                f"`llmopt train --out {p}` to rebuild it")
        return p
    p = Path(name).expanduser()
    looks_like_hub_id = name.count("/") == 1 and all(name.split("/")) and not name.startswith((".", "~"))
    if p.exists() or not looks_like_hub_id and ("/" in name or name.startswith((".", "~"))):
        if not p.is_dir():
            raise FileNotFoundError(f"model directory {p} does not exist")
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model directory")
        return p
    if looks_like_hub_id:
        return name
    raise ValueError(f"unknown model {name!r}: use a bundled name {sorted(BUNDLED | RANDOM)}, "
                     "a local Hugging Face directory, or a hub id like 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'")


def load(name_or_path=None, dtype=None, device=None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer: `(model, tokenizer)`, model in eval mode.

    name_or_path: 'tinypy' (the bundled model, the default, or `LLMOPT_MODEL`),
    'tiny-random' (a random 2-layer model for tests), a local directory, or a hub id. A directory
    written by `llmopt.quant.save_quantized` comes back quantized (its own dtype; `dtype` is ignored),
    and one where a factorised model was saved (`model.save_pretrained` after `lowrank.factorize`)
    with its low-rank layers (`lowrank.load_factorized`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    name_or_path = name_or_path or default_model()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if str(name_or_path) in RANDOM:
        tok = load_tokenizer()
        config = RANDOM[str(name_or_path)]()
        if config.vocab_size < len(tok):
            config.vocab_size = len(tok)
        with torch.random.fork_rng(devices=[]):  # the same weights every time; global RNG untouched
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        return model.to(device=dev, dtype=dt).eval(), tok
    where = _resolve(name_or_path)
    lowrank = None
    if isinstance(where, Path):
        keys = set()
        for f in where.glob("*.safetensors"):
            keys |= _check_safetensors(f)
        if (where / "quant_config.json").is_file():
            from .quant.io import load_quantized

            model, tok = load_quantized(where, device=dev)
            if tok is None:
                raise ValueError(f"{where} has no tokenizer: save it with save_quantized(model, tokenizer, path)")
            return model, tok
        lowrank = _lowrank_record(where, keys)
    try:
        tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
        if lowrank:   # transformers alone would leave the factorised projections random
            from .lowrank.io import load_factorized

            model = load_factorized(where, dtype=dt)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dt, trust_remote_code=trust_remote_code)
    except OSError as e:
        if isinstance(where, str):
            raise ValueError(f"could not fetch {where!r} from the Hugging Face hub ({_first_line(e)}); "
                             "are you offline? Use the bundled model or a local directory") from e
        raise ValueError(f"could not load {where}: {_first_line(e)}") from e
    _prepare_tokenizer(tok)
    return model.to(dev).eval(), tok


def _lowrank_record(where: Path, keys: set) -> dict | None:
    """config.json's record of low-rank layers (written by `lowrank.factorize`); a ValueError when
    the tensors hold low-rank factors (`.u.weight` with `.v.weight`) that no record places."""
    from .lowrank.io import CONFIG_KEY

    record = json.loads((where / "config.json").read_text()).get(CONFIG_KEY)
    factors = sorted(k for k in keys if k.endswith(".u.weight") and k[:-len("u.weight")] + "v.weight" in keys)
    if factors and not record:
        raise ValueError(f"{where} holds low-rank factors ({factors[0]}, ...) but its config.json has no "
                         f"{CONFIG_KEY!r} entry saying where they go (saved by an older llmopt?): factorise the "
                         "float model again and save it with save_pretrained")
    return record


def _check_safetensors(f: Path) -> set:
    """Open the header and check the file is as long as the header says: a truncated or
    corrupted file gets a clear message rather than a deep safetensors traceback. Returns the
    names of the tensors it holds."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        ok = f.stat().st_size == 8 + n + end
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{f} is corrupted or truncated (bad safetensors header/size); "
                         "restore it (git checkout / re-download) or retrain the model")
    return set(header) - {"__metadata__"}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
