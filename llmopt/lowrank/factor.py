"""Truncated SVD of one weight matrix, plain or activation-aware, and the arithmetic of ranks.

A linear layer y = x W^T with W (out x in) holds out*in weights. Two thinner layers
y = (x V^T) U^T with U (out x r) and V (r x in) hold r*(out + in): fewer only while
r < out*in / (out + in), the *break-even rank* (half the width for a square matrix).

    factor(w, rank=64)                           # plain SVD: the best rank-64 W in ||W - W'||_F
    factor(w, energy=0.9)                        # the rank that keeps 90% of sum(S^2)
    factor(w, 64, whiten=cholesky_whitening(H))  # SVD-LLM: the best W' in ||X W^T - X W'^T||_F
    factor(w, 64, whiten=asvd_scale(x_absmean))  # ASVD: columns scaled by activation size

Plain SVD is optimal for the weights (Eckart-Young), but what the model needs is the layer's
*output* on real inputs, and LLM activations are far from isotropic: a few input channels are
large, many are correlated. With the inputs' X^T X = L L^T (Cholesky),
||X (W - W')^T||_F = ||(W - W') L||_F, so the truncated SVD of W L, multiplied back by L^{-1},
is the best rank-r W' for the outputs (Wang et al., SVD-LLM, 2024).
"""
from __future__ import annotations

import math

import torch


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_fraction(value, name: str) -> float:
    """A number in (0, 1] (a ratio of parameters, a share of energy); a clear error otherwise."""
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_rank(rank, out_features: int, in_features: int) -> int:
    """An integer rank in [1, min(out, in)]: a product U V cannot have a higher rank."""
    top = min(out_features, in_features)
    if not _is_int(rank) or not 1 <= rank <= top:
        raise ValueError(f"rank must be an integer in [1, {top}] for a {out_features}x{in_features} weight, "
                         f"got {rank!r}")
    return rank


def lowrank_params(out_features: int, in_features: int, rank: int, bias: bool = False) -> int:
    """Parameters of the factorised layer: U (out x r) + V (r x in), plus the bias if any."""
    return rank * (out_features + in_features) + (out_features if bias else 0)


def break_even_rank(out_features: int, in_features: int) -> float:
    """out*in / (out + in): at this rank the two factors hold as many weights as W. Above it a
    factorisation is bigger *and* slower than the dense layer."""
    return out_features * in_features / (out_features + in_features)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The largest rank whose factors hold at most `ratio` of the layer's out*in weights
    (at least 1, even where rank 1 is already over the budget)."""
    ratio = check_fraction(ratio, "ratio")
    return max(1, math.floor(ratio * break_even_rank(out_features, in_features) + 1e-9))


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest r whose r largest singular values hold `energy` of sum(S^2).

    sum(S^2) is ||W||_F^2, and by Eckart-Young the rank-r truncation leaves exactly the rest:
    ||W - W_r||_F^2 = sum(S[r:]^2). So energy=0.9 means a relative error of sqrt(0.1) ~ 32%."""
    energy = check_fraction(energy, "energy")
    S = torch.as_tensor(S).detach().double().flatten()
    if S.numel() == 0:
        raise ValueError("S is empty: a weight has at least one singular value")
    sq = S.sort(descending=True).values.pow(2)
    total = sq.sum()
    if total == 0:
        return 1  # the zero matrix: any rank reproduces it
    cum = sq.cumsum(0) / total
    # energy - 1e-12: a full-energy request must not miss the last value by a rounding error
    return min(S.numel(), int((cum < energy - 1e-12).sum()) + 1)


def cholesky_whitening(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower-triangular L with L L^T = H + damp * mean(diag H) * I, in float64.

    H is the inputs' second moment (X^T X; any positive multiple gives the same factors).
    Damping keeps L invertible when some inputs never move (dead channels, too few tokens);
    if the Cholesky still fails the damping grows tenfold until it succeeds."""
    H = torch.as_tensor(H).detach().double()
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square (in_features, in_features) matrix, got {tuple(H.shape)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    scale = H.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + d * scale * eye)
        if info == 0:
            return L
        d = max(10 * d, 1e-6)
    raise ValueError("H is not positive semi-definite even with heavy damping: is it X^T X of real inputs?")


def asvd_scale(x_absmean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD's diagonal transform (Yuan et al., 2023): input channel j scaled by mean|x_j|^alpha,
    so the SVD keeps what the loud channels multiply. A cheap, diagonal cousin of whitening."""
    s = torch.as_tensor(x_absmean).detach().double().pow(alpha)
    return s.clamp_min(1e-6 * s.max().clamp_min(1e-30))  # a dead channel must stay invertible


@torch.no_grad()
def factor(w: torch.Tensor, rank: int | None = None, *, energy: float | None = None,
           whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor w (out x in) into u (out x r) and v (r x in) with u @ v the truncated SVD.

    Give `rank`, or `energy` to pick the rank from the spectrum (that of W M when whitened).
    whiten: None (plain SVD), an (in,) vector s (ASVD: SVD of W diag(s)) or an (in, in)
    lower-triangular L (SVD-LLM: SVD of W L); the transform is undone on v, so u @ v always
    approximates W itself. The singular values are split evenly, u = U sqrt(S),
    v = sqrt(S) V^T, so neither factor is much larger than the other (kinder to float16).
    Computed in float64; returned in w's dtype and device.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got {getattr(w, 'shape', type(w))}")
    out_f, in_f = w.shape
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank and energy, got rank={rank!r}, energy={energy!r}")
    if rank is not None:
        check_rank(rank, out_f, in_f)
    W = w.detach().double()
    if whiten is None:
        M = W
    else:
        whiten = whiten.to(W.device, torch.float64)
        if whiten.shape == (in_f,):
            M = W * whiten[None, :]
        elif whiten.shape == (in_f, in_f):
            M = W @ whiten
        else:
            raise ValueError(f"whiten must be ({in_f},) or ({in_f}, {in_f}) for a weight with {in_f} inputs, "
                             f"got {tuple(whiten.shape)}")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = rank if rank is not None else rank_for_energy(S, energy)
    root = S[:r].sqrt()
    u, v = U[:, :r] * root[None, :], root[:, None] * Vh[:r]
    if whiten is not None and whiten.dim() == 1:
        v = v / whiten[None, :]
    elif whiten is not None:  # v L^{-1}: solve Z L = v for Z
        v = torch.linalg.solve_triangular(whiten, v, upper=False, left=False)
    return u.to(w.dtype), v.to(w.dtype)
