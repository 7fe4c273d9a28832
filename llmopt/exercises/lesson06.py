"""Lesson 06: low-rank factorisation (the rank for an energy, truncated SVD, whitened SVD)."""
from __future__ import annotations

import torch

from ._common import _call, _result


def check_rank_for_energy(fn) -> bool:
    """Exercise 6.1: fn(S, energy) -> the smallest r whose r largest singular values (S sorted
    in descending order) hold at least `energy` of sum(S^2)."""
    from ..lowrank import rank_for_energy

    name = "Exercise 6.1 (rank for an energy)"
    g = torch.Generator().manual_seed(0)
    decaying = torch.linspace(1, 0.01, 200).pow(3) * 10
    # S^2 = 9, 4, 1 of 14; 9/14 is exactly the first value's share: rank 1
    cases = [(torch.tensor([3.0, 2.0, 1.0]), e) for e in (0.5, 9 / 14, 0.65, 0.93)]
    cases += [(decaying, 0.9), (decaying, 0.99), (torch.rand(64, generator=g).sort(descending=True).values, 0.75),
              (torch.tensor([5.0]), 0.3), (torch.tensor([3.0, 2.0, 1.0]), 1.0),
              (torch.rand(300, generator=g).sort(descending=True).values + 0.01, 1.0)]
    got, want, unsquared = [], [], []
    for S, energy in cases:
        what = f"S with {S.numel()} values, energy={energy:.4g}"
        ok, r = _call(name, fn, S.clone(), energy)
        try:
            r = int(r) if ok else r
        except (TypeError, ValueError, RuntimeError):
            ok, r = False, f"returned {type(r).__name__}, expected an integer rank for {what}"
        if not ok:
            if got != want:  # show the first wrong answer before a later crash
                break
            return _result(name, False, r)
        got.append(r)
        want.append(rank_for_energy(S, energy))
        unsquared.append(rank_for_energy(S.double().sqrt(), energy))  # the share of S, not of S^2
    wrong = [i for i in range(len(got)) if got[i] != want[i]]
    if wrong:
        i = wrong[0]
        S, energy = cases[i]
        hint = ""
        if got == unsquared[:len(got)] and sum(u != w for u, w in zip(unsquared, want)) >= 2:
            hint = ": energy is the share of the *squared* singular values, sum(S[:r]**2) / sum(S**2)"
        elif all(g == w - 1 for g, w in zip(got, want)):
            hint = ": one too few; return how many values are kept (an index + 1)"
        elif got[i] == want[i] + 1 and energy < 1:
            hint = ": one too many; stop at the first r whose share reaches the energy (>=, not >)"
        elif energy == 1.0:
            hint = (": with energy=1.0 rounding can leave the cumulative share a hair below 1; "
                    "compare with a small tolerance, or cap the rank at len(S)")
        return _result(name, False, f"got rank {got[i]}, expected {want[i]} for S with {S.numel()} values, "
                                    f"energy={energy:.4g}{hint}")
    return _result(name, True, "matches llmopt.lowrank.rank_for_energy, including energy=1.0 and exact ties")


def _pair(name, fn, args, out_f, in_f, rank, what):
    """Call fn and check it returned (u (out, r), v (r, in)); (product or None, message)."""
    ok, got = _call(name, fn, *args)
    if not ok:
        return None, got
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
        return None, f"return a pair of tensors (u, v), got {type(got).__name__} for {what}"
    u, v = got
    if tuple(u.shape) != (out_f, rank) or tuple(v.shape) != (rank, in_f):
        return None, (f"u should be ({out_f}, {rank}) and v ({rank}, {in_f}) for {what}, got {tuple(u.shape)} "
                      f"and {tuple(v.shape)}")
    return (u.double() @ v.double()), None


def _close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def _svd_product(M, rank, scale=True, largest=True):
    """U_r diag(S_r) V_r^T (or without S_r, or with the smallest values): the plausible answers."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = slice(0, rank) if largest else slice(S.numel() - rank, None)
    s = S[keep] if scale else torch.ones_like(S[keep])
    return (U[:, keep] * s[None, :]) @ Vh[keep]


def check_lowrank_factor(fn) -> bool:
    """Exercise 6.2: fn(w, rank) -> (u, v) with u (out, rank), v (rank, in) and u @ v the truncated
    SVD of w, the best rank-`rank` approximation in the Frobenius norm (Eckart-Young)."""
    from ..lowrank import factor

    name = "Exercise 6.2 (truncated SVD)"
    g = torch.Generator().manual_seed(1)
    structured = torch.randn(40, 6, generator=g) @ torch.randn(6, 24, generator=g)
    structured += 0.05 * torch.randn(40, 24, generator=g)
    cases = [("w (12, 20), rank 3", torch.randn(12, 20, generator=g), 3),
             ("w (30, 10), rank 10 (full)", torch.randn(30, 10, generator=g), 10),
             ("w (16, 16), rank 1", torch.randn(16, 16, generator=g), 1),
             ("a nearly rank-6 w (40, 24), rank 6", structured, 6)]
    for what, w, rank in cases:
        want = (lambda uv: uv[0].double() @ uv[1].double())(factor(w, rank))
        got, msg = _pair(name, fn, (w.clone(), rank), *w.shape, rank, what)
        if msg:
            return _result(name, False, msg)
        if _close(got, want):
            continue
        W = w.double()
        hint = ""
        if _close(got, _svd_product(W, rank, scale=False)):
            hint = ": the singular values are missing (u @ v must be U_r diag(S_r) V_r^T)"
        elif _close(got, _svd_product(W, rank, largest=False)):
            hint = ": those are the *smallest* singular values; keep the largest (torch.linalg.svd sorts them)"
        err, best = (W - got).norm().item(), (W - want).norm().item()
        return _result(name, False, f"u @ v is not the truncated SVD for {what}: ||w - u v||_F = {err:.4g}, "
                                    f"the best rank-{rank} error is {best:.4g}{hint}")
    return _result(name, True, "u @ v matches the truncated SVD; its error is sqrt(sum of the dropped S^2), "
                               "the least any rank-r matrix can have (Eckart-Young)")


def check_whitened_factor(fn) -> bool:
    """Exercise 6.3: fn(w, H, rank) -> (u, v) minimising the *output* error ||X (w - u v)^T||_F for
    inputs X with H = X^T X (positive definite here): SVD-LLM's whitened truncated SVD."""
    from ..lowrank import cholesky_whitening, factor

    name = "Exercise 6.3 (whitened SVD)"
    g = torch.Generator().manual_seed(2)
    cases = []
    for out_f, in_f, rank in [(24, 32, 4), (40, 16, 8), (12, 12, 12)]:
        mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + 0.2 * torch.eye(in_f)
        x = torch.randn(8 * in_f, in_f, generator=g) @ mix
        x[:, 0] *= 10  # one loud input channel, as LLMs have
        cases.append((f"w ({out_f}, {in_f}), rank {rank}", torch.randn(out_f, in_f, generator=g), x, rank))
    for what, w, x, rank in cases:
        H = x.T @ x
        L = cholesky_whitening(H, damp=0.0)
        want = (lambda uv: uv[0].double() @ uv[1].double())(factor(w, rank, whiten=L))
        got, msg = _pair(name, fn, (w.clone(), H.clone(), rank), *w.shape, rank, what)
        if msg:
            return _result(name, False, msg)
        if _close(got, want):
            continue
        W, X = w.double(), x.double()
        hint = ""
        if _close(got, _svd_product(W, rank)):
            hint = ": that is the plain SVD of w; take the SVD of w @ L, with L = cholesky(H)"
        elif _close(got, _svd_product(W @ L, rank)):
            hint = ": that approximates w @ L; undo the whitening (v @ L^-1) so u @ v approximates w"
        err, best = (X @ (W - got).T).norm().item(), (X @ (W - want).T).norm().item()
        return _result(name, False, f"wrong factors for {what}: output error ||X (w - u v)^T||_F = {err:.4g}, "
                                    f"the best is {best:.4g}{hint}")
    return _result(name, True, "u @ v matches llmopt.lowrank.factor(w, rank, whiten=cholesky(H)): the least "
                               "output error any rank-r weight can have on these inputs")
