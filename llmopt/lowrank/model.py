"""Factorise a whole model's decoder linears into `LowRankLinear`s, in place.

    factorize(model, "svd", ratio=0.6)                             # weights only, no data
    factorize(model, "whitened", ratio=0.6, calibration=calib)     # SVD-LLM: best for the outputs
    factorize(model, "asvd", ratio=0.6, calibration=calib)         # ASVD: per-channel scaling
    factorize(model, "svd", energy=0.9)                            # rank from each layer's spectrum
    rank_report(model)                                             # ranks and parameters per layer

`ratio` is the share of each layer's weights the factors may hold; `energy` picks each layer's
rank from its singular values (those of W L when whitened), so it varies from layer to layer.
A layer whose factors would hold at least as many weights as W (rank at or above the break-even
out*in / (out + in)) stays a dense `nn.Linear`: there low rank only costs accuracy and time.

The calibrated methods go one decoder layer at a time (`quant.calibrate.layerwise`), like GPTQ
and SparseGPT: each layer's X^T X comes from the outputs of the layers before it *as already
factorised*, so each layer is fitted to the inputs it will really see.
Embeddings and lm_head are never factorised, nor a Mixture-of-Experts layer's stacked experts
(they are not nn.Linear; `factorize` warns when they hold much of the model, and `rank_report`
counts them as they are).

`factorize` records each low-rank layer's shape in `model.config` (`lowrank.io`), so
`model.save_pretrained(path)` and `llmopt.load(path)` round-trip a factorised model.
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..quant import calibrate
from ..quant.experts import stacked_expert_weights
from .factor import (
    asvd_scale,
    break_even_rank,
    check_fraction,
    cholesky_whitening,
    lowrank_params,
    rank_for_ratio,
)
from .io import CONFIG_KEY, layer_shapes
from .linear import LowRankLinear

METHODS = ("svd", "whitened", "asvd")


def _layer_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The layer's nn.Linear and LowRankLinear modules by name, not the linears inside a LowRankLinear."""
    found, inside = {}, []
    for name, m in layer.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, LowRankLinear):
            inside.append(name)
            found[name] = m
        elif isinstance(m, nn.Linear):
            found[name] = m
    return found


def targets(model: nn.Module, skip: tuple = (), dense_only: bool = False) -> dict[str, nn.Module]:
    """Every linear of the decoder layers (dense or already factorised) by its full name, minus
    the names that match a `skip` regex; with dense_only, just the nn.Linears."""
    layers = calibrate.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = {}
    for i, layer in enumerate(layers):
        for name, m in _layer_modules(layer).items():
            full = f"{prefix}.{i}.{name}"
            if any(re.search(p, full) for p in skip) or (dense_only and not isinstance(m, nn.Linear)):
                continue
            out[full] = m
    return out



def _check_model(model: nn.Module) -> None:
    """ValueError when there is nothing to factorise; a warning when much of the decoder stays dense."""
    layers = calibrate.decoder_layers(model)
    if any(getattr(m, "quantized", False) for m in layers.modules()):
        raise ValueError("this model is quantized, and only float nn.Linears are factorised: factorise the "
                         "float model, then quantize it (quantize() takes the factors, which are nn.Linear)")
    if not targets(model):
        kinds = sorted({type(m).__name__ for m in layers[0].modules() if m is not layers[0]})
        raise ValueError(f"factorize found no nn.Linear in the decoder layers of {type(model).__name__} (layer 0 "
                         f"holds {', '.join(kinds)}): it factorises the nn.Linear projections of a Llama-family "
                         "model (q/k/v/o_proj, gate/up/down_proj)")
    experts = sum(w.numel() for w in stacked_expert_weights(model).values())
    total = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    if experts > 0.1 * total:
        warnings.warn(f"{experts / total:.0%} of the decoder layers' weights are Mixture-of-Experts experts, which "
                      "factorize leaves dense (it factorises nn.Linear modules only); rank_report counts them",
                      stacklevel=3)


def _check_args(method, ratio, energy, calibration, skip):
    if method not in METHODS:
        raise ValueError(f"unknown factorisation method {method!r}; choose from {METHODS}")
    if (ratio is None) == (energy is None):
        raise ValueError(f"give exactly one of ratio (share of each layer's weights to keep, in (0, 1]) and "
                         f"energy (share of sum(S^2) to keep, in (0, 1]); got ratio={ratio!r}, energy={energy!r}")
    if ratio is not None:
        check_fraction(ratio, "ratio")
    if energy is not None:
        check_fraction(energy, "energy")
    if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
        raise ValueError(f"skip must be a tuple of regular expressions (e.g. ('k_proj', 'v_proj')), got {skip!r}")
    if method != "svd" and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data: pass "
                         "calibration=llmopt.data.calibration_batches(tokenizer), or use method='svd'")


def _factorise_one(root: nn.Module, name: str, lin: nn.Linear, ratio, energy, whiten, multiple_of: int = 1) -> bool:
    """Put a LowRankLinear in place of `lin` if it saves weights; True if it did. The rank is
    rounded to a multiple of `multiple_of`: down for a ratio (a budget), up for an energy (a floor)."""
    out_f, in_f = lin.weight.shape
    rank = None if ratio is None else rank_for_ratio(out_f, in_f, ratio)
    if rank is not None:
        rank = max(multiple_of, rank // multiple_of * multiple_of)
    if rank is not None and lowrank_params(out_f, in_f, rank) >= out_f * in_f:
        return False  # skip the SVD: the answer is "stay dense" whatever it says
    new = LowRankLinear.from_linear(lin, rank, energy=energy, whiten=whiten)
    if new.rank % multiple_of:
        rank = -(-new.rank // multiple_of) * multiple_of
        if lowrank_params(out_f, in_f, rank) >= out_f * in_f:
            return False
        new = LowRankLinear.from_linear(lin, rank, whiten=whiten)
    if lowrank_params(out_f, in_f, new.rank) >= out_f * in_f:
        return False
    calibrate.replace(root, name, new)
    return True


@torch.no_grad()
def factorize(model: nn.Module, method: str = "svd", ratio: float | None = None, energy: float | None = None,
              calibration=None, skip: tuple = (), batch_size: int = 8, damp: float = 0.01,
              alpha: float = 0.5, multiple_of: int = 1) -> nn.Module:
    """Replace the decoder's linears by truncated-SVD `LowRankLinear`s in place; returns the model.

    method: "svd" (the weights alone), "whitened" (SVD-LLM: Cholesky whitening by the inputs'
        X^T X, damped by `damp`) or "asvd" (columns scaled by mean|x|^alpha); the last two need
        `calibration`, token ids (n_samples, seq_len) from `llmopt.data.calibration_batches`.
    ratio: keep at most this share of each layer's weights, in (0, 1]; or
    energy: give each layer the smallest rank keeping this share of sum(S^2), in (0, 1].
    skip: regexes of full module names to leave dense (e.g. ("k_proj", "v_proj")). A Mixture-of-
        Experts layer's stacked experts are never factorised (a warning says so when they hold more
        than 10% of the decoder's weights); only its attention projections are.
    multiple_of: round every rank to a multiple of this (down within a ratio's budget, but at least
        one multiple; up to keep an energy): a GPU's matrix units like multiples of 8 or 16, and
        quantizing the factors afterwards needs the group size to divide the rank
        (`multiple_of=group_size`).

    Layers where the rank would be at or above the break-even out*in/(out+in) stay dense, since
    there the factors hold no fewer weights than W (`rank_report` shows what was done).

    The low-rank layers' shapes go into `model.config.llmopt_lowrank`, so `model.save_pretrained(path)`
    then `llmopt.load(path)` (or `lowrank.load_factorized`) gives the same model back. transformers'
    own `from_pretrained` does not read that entry and would leave the factorised projections random.
    """
    _check_args(method, ratio, energy, calibration, skip)
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1, got {multiple_of!r}")
    _check_model(model)
    if method == "svd":
        for name, lin in targets(model, skip, dense_only=True).items():
            _factorise_one(model, name, lin, ratio, energy, None, multiple_of)
        return _record(model)
    calibration = calibrate.check_calibration(calibration)
    layers = calibrate.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i, layer, inputs in calibrate.layerwise(model, calibration, batch_size):
        found = {n: m for n, m in _layer_modules(layer).items() if isinstance(m, nn.Linear)
                 and not any(re.search(p, f"{prefix}.{i}.{n}") for p in skip)}
        stats = calibrate.HessianAccumulator() if method == "whitened" else calibrate.ChannelStats()
        calibrate.collect(layer, inputs, found, stats)
        for name, lin in found.items():
            if method == "whitened":
                whiten = cholesky_whitening(stats.H[name], damp)
            else:
                whiten = asvd_scale(stats.absmean[name], alpha)
            _factorise_one(layer, name, lin, ratio, energy, whiten, multiple_of)
        del stats
    return _record(model)


def _record(model: nn.Module) -> nn.Module:
    """Write the low-rank layers' shapes into the config, where save_pretrained keeps them for loading."""
    shapes = layer_shapes(model)
    if shapes and getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, shapes)
    return model


def rank_report(model: nn.Module) -> dict[str, dict]:
    """Per decoder linear: its shape, rank (None while dense), break-even rank, parameters now and
    as a dense layer; under "total", the sums and their ratio. A Mixture-of-Experts layer's stacked
    experts, which are never factorised, get a row each (rank None, "experts": E, the shape of
    one expert's matrix) and count in the total as they are."""
    rows, params, dense = {}, 0, 0
    for name, m in targets(model).items():
        if isinstance(m, LowRankLinear):
            out_f, in_f, rank, bias = m.out_features, m.in_features, m.rank, m.u.bias is not None
        else:
            (out_f, in_f), rank, bias = m.weight.shape, None, m.bias is not None
        n = sum(p.numel() for p in m.parameters())
        d = out_f * in_f + (out_f if bias else 0)
        rows[name] = {"out": out_f, "in": in_f, "rank": rank, "break_even": break_even_rank(out_f, in_f),
                      "params": n, "dense_params": d}
        params, dense = params + n, dense + d
    for name, w in stacked_expert_weights(model).items():
        n_exp, out_f, in_f = w.shape
        rows[name] = {"out": out_f, "in": in_f, "rank": None, "break_even": break_even_rank(out_f, in_f),
                      "params": w.numel(), "dense_params": w.numel(), "experts": n_exp}
        params, dense = params + w.numel(), dense + w.numel()
    rows["total"] = {"params": params, "dense_params": dense, "ratio": params / dense if dense else 1.0}
    return rows
