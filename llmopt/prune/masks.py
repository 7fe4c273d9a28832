"""Pruning masks: which weights of a linear layer to zero. A mask is a bool tensor shaped
like the weight, True where the weight stays.

    magnitude_mask(w, 0.5)               # the half of the layer with the smallest |w|
    global_magnitude_masks(ws, 0.5)      # the smallest half of |w| over all the layers at once
    wanda_mask(w, x_norm, 0.5)           # |w| * ||x_j||, the smallest half of every output row
    nm_mask(scores, 2, 4)                # keep the 2 best of every 4 consecutive inputs (2:4)

Ties are broken by position (a stable sort), so a mask is the same on every run and machine.
"""
from __future__ import annotations

import torch


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got {getattr(w, 'shape', type(w))}")


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over the last dim of `scores` (any leading dims) with its k lowest entries False."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(scores, dim=-1, stable=True)[..., :k]
        mask.scatter_(-1, idx, False)
    return mask


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the round(sparsity * numel) weights of smallest magnitude in this layer."""
    _check_weight(w)
    k = round(check_sparsity(sparsity) * w.numel())
    return _prune_lowest(w.detach().abs().flatten(), k).reshape(w.shape)


def global_magnitude_masks(weights: dict, sparsity: float) -> dict:
    """One threshold for every layer: zero the smallest round(sparsity * total) magnitudes
    over all of `weights` ({name: 2-D weight}), so some layers lose more than others."""
    if not weights:
        raise ValueError("global_magnitude_masks needs at least one weight")
    for w in weights.values():
        _check_weight(w)
    flat = torch.cat([w.detach().abs().float().flatten().cpu() for w in weights.values()])
    mask = _prune_lowest(flat, round(check_sparsity(sparsity) * flat.numel()))
    out, i = {}, 0
    for name, w in weights.items():
        out[name] = mask[i:i + w.numel()].reshape(w.shape).to(w.device)
        i += w.numel()
    return out


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the round(sparsity * in_features) lowest scores of every output row."""
    _check_weight(scores)
    return _prune_lowest(scores, round(check_sparsity(sparsity) * scores.shape[1]))


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, the weight's size times the L2 norm of the
    input it multiplies over the calibration tokens."""
    _check_weight(w)
    if x_norm.shape != (w.shape[1],):
        raise ValueError(f"x_norm must have shape ({w.shape[1]},) for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(x_norm.shape)}")
    return w.detach().abs().float() * x_norm.float().to(w.device)[None, :]


def wanda_mask(w: torch.Tensor, x_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's mask: the lowest-scoring `sparsity` of each output row (compared per row, as
    in the paper, so every output keeps the same number of inputs)."""
    return row_mask(wanda_scores(w, x_norm), sparsity)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured sparsity: in every group of m consecutive inputs of a row, keep
    the n highest scores (2:4 keeps 2 of 4: what sparse tensor cores run)."""
    _check_weight(scores)
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n <= m:
        raise ValueError(f"N:M needs integers 0 < N <= M, got {n}:{m}")
    if scores.shape[1] % m:
        raise ValueError(f"in_features {scores.shape[1]} is not a multiple of M = {m}")
    groups = scores.reshape(scores.shape[0], -1, m)
    return _prune_lowest(groups, m - n).reshape(scores.shape)


def sparsity(mask: torch.Tensor) -> float:
    """The share of weights a mask zeroes."""
    return 1 - mask.float().mean().item()
