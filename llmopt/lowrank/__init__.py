"""Low-rank factorisation (lesson 06): replace a linear's W (out x in) by two thin factors
U (out x r) and V (r x in), r(out + in) weights instead of out*in.

`factor` computes the truncated SVD of one weight: plain (Eckart-Young: the best rank-r W in
the Frobenius norm), whitened by the inputs' X^T X (SVD-LLM: the best for the layer's outputs)
or with ASVD's per-channel scaling; `LowRankLinear` is the drop-in module;
`factorize(model, method, ratio=... | energy=..., calibration)` does a whole model and
`rank_report` says what it did; `linear_times` measures where low rank stops paying and
`model_times` what a factorisation does to a whole model's prefill and decode speed.
A factorised model saves with `model.save_pretrained` and loads with `llmopt.load`
(`load_factorized`: `factorize` records where the low-rank layers go in the config).
"""
from .factor import (
    asvd_scale,
    break_even_rank,
    check_rank,
    cholesky_whitening,
    factor,
    lowrank_params,
    rank_for_energy,
    rank_for_ratio,
)
from .io import load_factorized
from .linear import LowRankLinear
from .model import METHODS, factorize, rank_report, targets
from .speed import linear_times, model_times, rank_grid

__all__ = ["METHODS", "factorize", "rank_report", "targets", "LowRankLinear", "factor", "cholesky_whitening",
           "asvd_scale", "rank_for_energy", "rank_for_ratio", "lowrank_params", "break_even_rank", "check_rank",
           "linear_times", "model_times", "rank_grid", "load_factorized"]
