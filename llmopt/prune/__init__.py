"""Pruning (lesson 04): masks that choose which weights to zero.

Unstructured (magnitude per layer or global, Wanda) and N:M semi-structured masks live in
`masks`; model-level pruning, SparseGPT and structured pruning build on them.
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

__all__ = ["check_sparsity", "global_magnitude_masks", "magnitude_mask", "nm_mask", "row_mask", "sparsity",
           "wanda_mask", "wanda_scores"]
