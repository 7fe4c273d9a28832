"""Prune a whole model's decoder linears in place (the weights stay dense `nn.Linear`, with
zeros where the mask says): the unstructured and N:M methods of lesson 04.

    prune(model, "magnitude", 0.5)                      # per layer, no data needed
    prune(model, "magnitude-global", 0.5)               # one threshold for all layers
    prune(model, "wanda", 0.5, calibration=calib)       # |W| * ||X_j||, per output row
    prune(model, "sparsegpt", 0.5, calibration=calib)   # OBS reconstruction, like GPTQ
    prune(model, "wanda", nm=(2, 4), calibration=calib) # 2:4 semi-structured

The calibrated methods go one decoder layer at a time (`quant.calibrate.layerwise`): each
layer's statistics come from the outputs of the layers before it as already pruned.
Embeddings and lm_head are never pruned, nor a Mixture-of-Experts layer's stacked experts (they
are not nn.Linear: `prune` warns when they hold much of the model, and `sparsity_report` counts
them, dense, in its total).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..quant import calibrate
from ..quant.experts import stacked_expert_weights
from .masks import check_sparsity, global_magnitude_masks, magnitude_mask, nm_mask, row_mask, wanda_scores
from .sparsegpt import sparsegpt_prune

METHODS = ("magnitude", "magnitude-global", "wanda", "sparsegpt")


class InputNorms:
    """Running sum of x_j^2 per input channel over every token a linear sees: ||X_j||_2^2."""

    def __init__(self):
        self.sq = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        s = x.float().pow(2).sum(0)
        self.sq[name] = self.sq[name] + s if name in self.sq else s

    def norm(self, name: str) -> torch.Tensor:
        return self.sq[name].sqrt()


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by its full name."""
    layers = calibrate.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in calibrate.linears(layer).items()}



def _check_model(model: nn.Module, lins: dict) -> None:
    """ValueError when there is nothing to prune; a warning when much of the decoder is left dense."""
    layers = calibrate.decoder_layers(model)
    if any(getattr(m, "quantized", False) for m in layers.modules()):
        raise ValueError("this model is quantized, and prune zeroes the weights of float nn.Linears: prune the "
                         "float model, then quantize it")
    if not lins:
        kinds = sorted({type(m).__name__ for m in layers[0].modules() if m is not layers[0]})
        raise ValueError(f"prune found no nn.Linear in the decoder layers of {type(model).__name__} (layer 0 holds "
                         f"{', '.join(kinds)}): it prunes the nn.Linear projections of a Llama-family model "
                         "(q/k/v/o_proj, gate/up/down_proj)")
    seen = {id(m.weight) for m in lins.values()}
    matrices = [p for p in layers.parameters() if p.dim() >= 2]
    outside = sum(p.numel() for p in matrices if id(p) not in seen)
    total = sum(p.numel() for p in matrices)
    if outside > 0.1 * total:
        warnings.warn(f"{outside / total:.0%} of the decoder layers' weights are not in nn.Linear modules "
                      "(Mixture-of-Experts experts, say) and stay dense: prune zeroes nn.Linear weights only; "
                      "sparsity_report counts them", stacklevel=3)


def _mask(method, w, sparsity, nm, x_norm=None):
    scores = w.detach().abs().float() if method == "magnitude" else wanda_scores(w, x_norm)
    if nm is not None:
        return nm_mask(scores, *nm)
    return magnitude_mask(w, sparsity) if method == "magnitude" else row_mask(scores, sparsity)


@torch.no_grad()
def prune(model: nn.Module, method: str = "magnitude", sparsity: float = 0.5, calibration=None,
          nm: tuple | None = None, batch_size: int = 8, damp: float = 0.01) -> nn.Module:
    """Zero a share of every decoder linear's weights in place; returns the model.
    `sparsity` in [0, 1) (ignored with nm=(N, M): N kept of every M inputs).

    Only nn.Linear weights are pruned: a ValueError when the decoder has none (not a Llama-family
    model, or already quantized), a warning when more than 10% of its weights are elsewhere (a
    Mixture-of-Experts layer's stacked experts, left dense)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {METHODS}")
    if nm is None:
        sparsity = check_sparsity(sparsity)
    elif method == "magnitude-global":
        raise ValueError("N:M masks are per group of inputs: use 'magnitude', not 'magnitude-global'")
    lins = targets(model)
    _check_model(model, lins)
    if nm is not None:   # every shape before the first weight is touched
        if not (isinstance(nm, tuple | list) and len(nm) == 2 and all(type(v) is int for v in nm)
                and 0 < nm[0] <= nm[1]):
            raise ValueError(f"nm must be (N, M), integers with 0 < N <= M, got {nm!r}")
        for name, lin in lins.items():
            if lin.in_features % nm[1]:
                raise ValueError(f"cannot prune {name} ({lin.out_features}x{lin.in_features}) {nm[0]}:{nm[1]}: "
                                 f"in_features {lin.in_features} is not a multiple of M = {nm[1]}. Nothing was "
                                 "changed")
    if method == "magnitude-global":
        for name, mask in global_magnitude_masks({n: m.weight for n, m in lins.items()}, sparsity).items():
            lins[name].weight.mul_(mask.to(lins[name].weight.dtype))
        return model
    if method == "magnitude":
        for lin in lins.values():
            lin.weight.mul_(_mask(method, lin.weight, sparsity, nm).to(lin.weight.dtype))
        return model
    calibration = calibrate.check_calibration(calibration)
    for _, layer, inputs in calibrate.layerwise(model, calibration, batch_size):
        found = calibrate.linears(layer)
        stats = InputNorms() if method == "wanda" else calibrate.HessianAccumulator()
        calibrate.collect(layer, inputs, found, stats)
        for name, lin in found.items():
            if method == "wanda":
                lin.weight.mul_(_mask(method, lin.weight, sparsity, nm, stats.norm(name)).to(lin.weight.dtype))
            else:
                w, _ = sparsegpt_prune(lin.weight, stats.H[name], sparsity, nm, damp)
                lin.weight.copy_(w)
        del stats
    return model


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """The share of exact zeros in every decoder linear's weight and in every stacked
    Mixture-of-Experts weight (which `prune` leaves dense), and 'total' over all of them."""
    weights = {n: m.weight for n, m in targets(model).items()} | stacked_expert_weights(model)
    if not weights:
        raise ValueError(f"sparsity_report found no nn.Linear or Mixture-of-Experts weights in the decoder layers of "
                         f"{type(model).__name__}: it reports on a float Llama-family model")
    out = {n: (w == 0).float().mean().item() for n, w in weights.items()}
    out["total"] = sum((w == 0).sum().item() for w in weights.values()) / sum(w.numel() for w in weights.values())
    return out
