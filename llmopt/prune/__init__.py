"""Pruning (lesson 04): masks that choose which weights to zero.

Unstructured (magnitude per layer or global, Wanda) and N:M semi-structured masks live in
`masks`; SparseGPT in `sparsegpt`; `prune(model, method, sparsity, calibration)` applies any of
them to a whole model; `prune_ffn` and `prune_heads` remove whole FFN channels and key/value
groups of attention heads (a smaller model, not zeros); `recover` fine-tunes what is left;
`semi` runs 2:4-pruned weights on a GPU's sparse tensor cores.
"""
from .masks import (
    check_sparsity,
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    row_mask,
    sparsity,
    wanda_mask,
    wanda_scores,
)
from .model import METHODS, prune, sparsity_report
from .recover import recover
from .semi import is_2to4, linear_speedup, to_semi_structured
from .sparsegpt import sparsegpt_prune
from .structured import ffn_importance, group_importance, prune_ffn, prune_heads

__all__ = ["METHODS", "prune", "sparsity_report", "recover", "sparsegpt_prune", "ffn_importance", "prune_ffn",
           "group_importance", "prune_heads", "is_2to4", "linear_speedup", "to_semi_structured", "check_sparsity",
           "global_magnitude_masks", "magnitude_mask", "nm_mask", "row_mask", "sparsity", "wanda_mask", "wanda_scores"]
