"""Save a quantized model and load it back: the packed codes as they are held in memory.

A folder holds the Hugging Face `config.json` and tokenizer (so the float architecture can
be rebuilt), `model.safetensors` (every parameter and buffer: codes, scales, zeros, folded
norms), and `quant_config.json`: the `QuantConfig` and which quantized module sits at each
name (a Mixture-of-Experts layer's `QuantExperts` as one entry), and the shapes of any low-rank
layers of lesson 06, whose factors may be quantized.
Loading rebuilds the float model, puts back the low-rank layers, swaps in empty quantized
modules of the right shapes, and loads the tensors strictly, so a missing or extra tensor is
an error.

    save_quantized(model, tokenizer, "w4-gptq")
    model, tokenizer = load_quantized("w4-gptq")
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

FORMAT = "llmopt-quant"
VERSION = 1


def module_classes() -> dict[str, type]:
    """Every quantized module class a folder may name (looked up by class name)."""
    from .experts import QuantExperts
    from .linear import QuantLinear

    classes = {"QuantLinear": QuantLinear, "QuantExperts": QuantExperts}
    for mod, name in (("nf4", "NF4Linear"), ("smoothquant", "W8A8Linear")):
        try:
            classes[name] = getattr(__import__(f"{__package__}.{mod}", fromlist=[name]), name)
        except (ImportError, AttributeError):
            pass
    return classes


def _cfg_dict(cfg) -> dict:
    d = asdict(cfg)
    d["skip"] = list(d["skip"])
    return d


def _cfg_from(d: dict):
    from .linear import QuantConfig

    known = {f.name for f in fields(QuantConfig)}
    d = {k: (tuple(v) if k == "skip" else v) for k, v in d.items() if k in known}
    return QuantConfig(**d)


def save_quantized(model: nn.Module, tokenizer, path) -> Path:
    """Write `model` (already quantized by llmopt) and its tokenizer to the folder `path`."""
    from safetensors.torch import save_model

    from ..lowrank.io import layer_shapes

    quantized = {name: m for name, m in model.named_modules() if getattr(m, "quantized", False)}
    if not quantized:
        raise ValueError("the model holds no llmopt quantized modules: quantize it first, "
                         "or save a float model with model.save_pretrained")
    classes = module_classes()
    modules = {}
    for name, m in quantized.items():
        if any(name.startswith(f"{outer}.") for outer in modules):
            continue   # an expert's matrix inside a QuantExperts: saved with it
        kind = type(m).__name__
        if kind == "QuantExperts":   # saved with its matrices, which must be of a class loading knows
            kind = type(m.down_proj[0]).__name__
        if kind not in classes:
            fused = (" (kernels.fuse() put it there: save the model before fusing, and fuse it again after loading; "
                     "`llmopt serve` does)")
            hint = {"KernelQuantLinear": fused, "KernelQuantExperts": fused,
                    "FakeQuantLinear": " (QAT's training form: quant.convert(model) turns it into the QuantLinear "
                                       "it stands for)"}.get(kind, "")
            raise ValueError(f"{name}: cannot save a {kind} (known: {sorted(classes)}){hint}")
        if type(m).__name__ == "QuantExperts":
            modules[name] = {"class": "QuantExperts", "num_experts": m.num_experts, "hidden_size": m.hidden_size,
                             "intermediate_size": m.intermediate_size, "cfg": _cfg_dict(m.cfg)}
            continue
        modules[name] = {"class": type(m).__name__, "in_features": m.in_features,
                         "out_features": m.out_features, "bias": m.bias is not None, "cfg": _cfg_dict(m.cfg)}
    float_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = model.dtype if getattr(model, "dtype", None) in float_dtypes else next(iter(float_dtypes))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # de-duplicates tied weights
    meta = {"format": FORMAT, "version": VERSION, "dtype": str(dtype).removeprefix("torch."), "modules": modules,
            "lowrank": layer_shapes(model)}   # lesson 06's low-rank layers, whose factors may be quantized
    (out / "quant_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_quantized(path, device=None):
    """Rebuild a model saved by `save_quantized`: returns (model in eval mode, tokenizer or None)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import models
    from ..lowrank.io import restore
    from . import calibrate
    from .experts import activation

    folder = Path(path)
    meta_path = folder / "quant_config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} has no quant_config.json: not a folder written by save_quantized")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')!r} is not "
                         f"{FORMAT!r} v{VERSION}")
    dtype = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(folder)
    model = restore(AutoModelForCausalLM.from_config(config, dtype=dtype), meta.get("lowrank", {}))
    classes = module_classes()
    for name, spec in meta["modules"].items():
        if spec["class"] not in classes:
            raise ValueError(f"{meta_path}: unknown module class {spec['class']!r} at {name}")
        cls, cfg = classes[spec["class"]], _cfg_from(spec["cfg"])
        if spec["class"] == "QuantExperts":   # stands where the stock model has its float experts
            new = cls(spec["num_experts"], spec["hidden_size"], spec["intermediate_size"], cfg)
            new.act = activation(model.get_submodule(name))
        else:
            new = cls(spec["in_features"], spec["out_features"], cfg, bias=spec["bias"])
        calibrate.replace(model, name, new)
    load_model(model, str(folder / "model.safetensors"), strict=True)
    model.to(models.pick_device(device)).eval()
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        tokenizer = models.load_tokenizer(folder)
    return model, tokenizer
