"""Save a factorised model and load it back.

A stock `transformers` architecture has no `LowRankLinear`, so on its own a checkpoint with
`...q_proj.u.weight` and `...q_proj.v.weight` cannot say where those factors go (transformers'
`from_pretrained` would leave every factorised projection randomly initialised). `factorize`
therefore writes the shape of each low-rank layer into the model's config (`llmopt_lowrank`),
which `save_pretrained` puts in config.json; loading builds the architecture, puts empty
`LowRankLinear`s back at those names and loads the tensors strictly.

    factorize(model, "svd", ratio=0.5)
    model.save_pretrained("lr-50"); tokenizer.save_pretrained("lr-50")
    model, tokenizer = llmopt.load("lr-50")          # llmopt.models.load calls load_factorized
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..quant import calibrate
from .linear import LowRankLinear

CONFIG_KEY = "llmopt_lowrank"


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """Full name -> in_features, out_features, rank and bias of every LowRankLinear of `model`."""
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                   "bias": m.u.bias is not None}
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def restore(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Put an empty LowRankLinear of the recorded shape at each name of `shapes` (a freshly built
    model has an nn.Linear there), on that module's device and dtype; loading fills them."""
    for name, s in shapes.items():
        old = next(model.get_submodule(name).parameters())
        calibrate.replace(model, name, LowRankLinear(s["in_features"], s["out_features"], s["rank"], bias=s["bias"],
                                                     device=old.device, dtype=old.dtype))
    return model


def load_factorized(path, dtype=None) -> nn.Module:
    """The factorised model that `model.save_pretrained(path)` wrote (see the module docstring),
    in `dtype` (None: transformers' default); every tensor must be in the folder's *.safetensors
    files and every one of them must have a place in the model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(path)
    config = AutoConfig.from_pretrained(folder)
    shapes = getattr(config, CONFIG_KEY, None)
    if not shapes:
        raise ValueError(f"{folder / 'config.json'} has no {CONFIG_KEY!r} entry: not a model saved after "
                         "lowrank.factorize; load it with llmopt.load")
    model = restore(AutoModelForCausalLM.from_config(config, dtype=dtype), shapes)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    held = model.state_dict()
    loaded = {held[k].data_ptr() for k in state if k in held}
    missing = [k for k in missing if held[k].data_ptr() not in loaded]   # tied to a loaded tensor: fine
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its {CONFIG_KEY!r} record: missing tensors {missing[:3]}, "
                         f"unexpected tensors {unexpected[:3]}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
