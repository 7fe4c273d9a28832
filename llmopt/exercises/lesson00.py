"""Lesson 00: measuring (perplexity, the decode roofline)."""
from __future__ import annotations

import math

import torch

from ._common import _check_numbers


def check_perplexity(fn) -> bool:
    """Exercise 0.1: fn(logits (T, V), targets (T,)) -> perplexity (a float)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for logits, targets in [(torch.randn(50, 11, generator=g) * 3, torch.randint(0, 11, (50,), generator=g)),
                            (torch.zeros(7, 5), torch.randint(0, 5, (7,), generator=g))]:  # uniform: ppl = V
        want = math.exp(torch.nn.functional.cross_entropy(logits, targets).item())
        cases.append(((logits.clone(), targets.clone()), want, f"{tuple(logits.shape)} logits"))
    return _check_numbers("Exercise 0.1 (perplexity from logits)", fn, cases, 1e-4,
                          "matches exp(mean cross-entropy); uniform logits give perplexity = vocab size")


def check_roofline_floor(fn) -> bool:
    """Exercise 0.2: fn(weight_bytes, bandwidth_bytes_per_s) -> floor tokens/s at batch 1."""
    cases = [((wb, bw), bw / wb, f"{wb:.3g} bytes at {bw:.3g} bytes/s")
             for wb, bw in [(2.2e9, 4.2e12), (13.2e6, 20e9), (1, 1)]]
    return _check_numbers("Exercise 0.2 (decode roofline)", fn, cases, 1e-6,
                          "a 2.2 GB model at 4.2 TB/s cannot decode faster than ~1900 tok/s at batch 1")
