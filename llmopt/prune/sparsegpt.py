"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and fix up the weights that remain, so
its output on calibration data moves least.

It is GPTQ with "set to zero" in place of "round": walk the columns left to right; zero the
chosen weights of column i; push the error e = (w_i - w_i') / U_ii onto the later columns,
w_j -= e U_ij, with U the upper Cholesky factor of the damped inverse Hessian H = 2 X^T X.
Which weights to zero is decided a block of columns at a time, by the OBS saliency
w^2 / U_ii^2 (the output error that zeroing one weight would cause) on the weights as updated
so far: "adaptive mask selection". With N:M, each group of M columns picks its own N.
"""
from __future__ import annotations

import torch

from ..quant.gptq import inverse_factor
from .masks import _check_weight, _prune_lowest, check_sparsity


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, nm: tuple | None = None,
                    damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune w (out_features, in_features) given its input Hessian H.

    Returns (new weight, mask): exactly round(sparsity * numel) zeros (unstructured), or N of
    every M consecutive inputs kept when nm=(N, M) (then `sparsity` is ignored)."""
    _check_weight(w)
    rows, n = w.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for a weight with {n} inputs, got {tuple(H.shape)}")
    if nm is not None:
        keep, m = nm
        if not (isinstance(keep, int) and isinstance(m, int)) or not 0 < keep <= m:
            raise ValueError(f"N:M needs integers 0 < N <= M, got {keep}:{m}")
        if n % m:
            raise ValueError(f"in_features {n} is not a multiple of M = {m}")
        block_size = m * max(1, block_size // m)  # a group never straddles two blocks
    else:
        sparsity = check_sparsity(sparsity)
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    W, H = w.detach().float().clone(), H.to(w.device, torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights can go for free
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_factor(H, damp)
    mask = torch.ones_like(W, dtype=torch.bool)
    total = round(sparsity * W.numel()) if nm is None else 0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, U1, err1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], torch.zeros(rows, i2 - i1, device=W.device)
        saliency = W1.pow(2) / torch.diag(U1).pow(2)[None, :]
        if nm is None:  # this block's share of the layer's zeros, rounded so the total is exact
            k = round(total * i2 / n) - round(total * i1 / n)
            mask[:, i1:i2] = _prune_lowest(saliency.flatten(), k).reshape(saliency.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = saliency[:, i:i + nm[1]]
                mask[:, i1 + i:i1 + i + nm[1]] = _prune_lowest(g, nm[1] - nm[0])
            w_i = W1[:, i]
            err1[:, i] = torch.where(mask[:, i1 + i], 0.0, w_i) / U1[i, i]
            W1[:, i:] -= err1[:, i:i + 1] * U1[i:i + 1, i:]
            if nm is not None and (i + 1) % nm[1] == 0 and i + 1 < i2 - i1:  # later groups: saliency as updated
                saliency = W1.pow(2) / torch.diag(U1).pow(2)[None, :]
        W[:, i1:i2] = W1 * mask[:, i1:i2]
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    return W.to(w.dtype), mask
