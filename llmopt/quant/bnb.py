"""The bitsandbytes flow: the way most people quantize a Hugging Face model, for comparison.

`load(..., mode="nf4")` is QLoRA's recipe as one `from_pretrained` call (4-bit NF4, optionally
double-quantized, compute in `compute_dtype`); `mode="int8"` is LLM.int8() (8-bit rows plus
outlier columns kept in fp16). bitsandbytes is optional: it is imported only here, lazily,
and `available()` says whether it is installed. It runs NF4 and LLM.int8 on a CPU too.

`nf4_reference` and `codebook` expose bitsandbytes' own NF4 so that llmopt's `NF4Linear`
(llmopt/quant/nf4.py) can be checked against it value by value.
"""
from __future__ import annotations

import logging

import torch

from .. import models

MODES = ("nf4", "fp4", "int8")
INSTALL = "pip install bitsandbytes"


def available() -> bool:
    """Whether bitsandbytes imports (installed, and its native library loads)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library raising at import
        return False
    return True


def _bnb():
    try:
        import bitsandbytes
    except Exception as e:
        raise ValueError(f"bitsandbytes is not available ({type(e).__name__}: {e}); install it with "
                         f"`{INSTALL}`") from e
    return bitsandbytes


def load(name_or_path="tinypy", mode: str = "nf4", double_quant: bool = True,
         compute_dtype: torch.dtype = torch.float32, device=None):
    """Load a causal LM quantized by bitsandbytes as it loads: `(model, tokenizer)`.

    mode: "nf4" / "fp4" (4-bit weights, per-64 absmax; `double_quant` 8-bit-quantizes the
    absmax as QLoRA does) or "int8" (LLM.int8). Linear layers are replaced, `lm_head` and the
    embeddings stay in `compute_dtype`. device: None picks cuda, then mps, then cpu.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a float torch.dtype (torch.float32, torch.bfloat16, "
                         f"torch.float16), got {compute_dtype!r}")
    _bnb()
    name = str(name_or_path)
    if name in models.RANDOM:
        raise ValueError(f"{name!r} is built in memory, not read from a checkpoint, so bitsandbytes cannot "
                         "quantize it at load time; use a saved model directory, the bundled 'tinypy', or "
                         "llmopt.quant.quantize(model, QuantConfig(bits=4, method='nf4')) on the loaded model")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dev = models.pick_device(device)
    if mode == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
        if compute_dtype != torch.float16:
            # LLM.int8 casts its inputs to fp16 and logs that on every forward: once is enough.
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                                  bnb_4bit_use_double_quant=bool(double_quant),
                                  bnb_4bit_compute_dtype=compute_dtype)
    where = models._resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), quantization_config=qcfg, dtype=compute_dtype,
                                                     device_map={"": str(dev)})
    except OSError as e:
        raise ValueError(f"could not load {where}: {models._first_line(e)}") from e
    return model.eval(), models.load_tokenizer(name_or_path)


def codebook() -> torch.Tensor:
    """bitsandbytes' 16 NF4 values (float32, sorted, in [-1, 1])."""
    _bnb()
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").float()


def nf4_reference(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> torch.Tensor:
    """Quantize `w` with bitsandbytes' own NF4 (`quantize_4bit`, `compress_statistics` =
    double_quant) and dequantize it back: the float32 weight bitsandbytes would compute with."""
    _bnb()
    from bitsandbytes import functional as F

    q, state = F.quantize_4bit(w.detach().float().contiguous(), blocksize=block_size,
                               compress_statistics=double_quant, quant_type="nf4")
    return F.dequantize_4bit(q, state).reshape(w.shape)


def quant_state_bytes(model: torch.nn.Module) -> int:
    """Bytes bitsandbytes holds outside parameters and buffers, which `bench.model_size_bytes`
    cannot see: the 4-bit absmax (and its nested scales, offset and code tables), the
    LLM.int8 row scales (`SCB`). Add it to `model_size_bytes` for the true footprint."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in ("absmax", "code", "offset"):
                add(getattr(qs, t, None))
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))
    return total
