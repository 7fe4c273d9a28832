"""GPTQ (Frantar et al., 2022): quantize a layer's weight one column at a time, and spread
each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian of the layer's inputs, so the layer's *output* on calibration data changes least.

For a linear layer y = x W^T, the Hessian of ||X W^T - X Q^T||^2 is H = 2 X^T X (inputs x
inputs). Steps: dampen H (add `damp` x its mean diagonal), take the upper Cholesky factor of
its inverse, then for each column i: quantize, error e = (w_i - q_i) / U_ii, update the
remaining columns w_j -= e U_ij. Columns go in blocks of `block_size` whose updates to later
columns are applied in one matmul ("lazy batch updates"). `act_order` visits columns by
decreasing H_ii (the inputs with the most energy first); its group scales are then fixed up
front from the original weights ("static groups"), so the storage format stays the same.
"""
from __future__ import annotations

import torch

from .primitives import QTensor, _groups, from_codes, qrange, scale_zero, to_codes


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n from a layer's inputs (..., in_features), accumulated in float32."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    if x.shape[0] == 0:
        raise ValueError("the calibration set is empty: GPTQ needs input activations")
    return 2 * x.T @ x / x.shape[0]


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = None,
                  symmetric: bool = True, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> QTensor:
    """GPTQ-quantize a weight (out_features, in_features) given its input Hessian H."""
    rows, n = w.shape
    qrange(bits, symmetric)
    if H.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for a weight with {n} inputs, got {tuple(H.shape)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    granularity = "channel" if group_size is None else group_size
    gs = n if group_size is None else group_size
    W, H = w.detach().float().clone(), H.to(w.device, torch.float32).clone()
    dev = W.device
    _groups(W, granularity)  # validates group_size
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = n // gs
    scales = torch.empty(rows, n_groups, 1, device=dev)
    zeros = None if symmetric else torch.empty(rows, n_groups, 1, device=dev)
    static = act_order or group_size is None
    if static:
        s, z = scale_zero(_groups(W, granularity), bits, symmetric)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
    else:
        block_size = gs * max(1, block_size // gs)  # a group never straddles two blocks

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=dev)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(n, device=dev)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, err1, U1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=dev), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // gs
            if not static and (i1 + i) % gs == 0:  # the group's scale from the weights as updated so far
                s, z = scale_zero(W1[:, None, i : i + gs], bits, symmetric)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            s, z = scales[:, g], None if zeros is None else zeros[:, g]
            q = to_codes(W1[:, i : i + 1], s, z, bits)
            Q[:, i1 + i] = q[:, 0]
            err = (W1[:, i] - from_codes(q, s, z)[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ U[i1:i2, i2:]

    codes = Q[:, torch.argsort(perm)]
    return QTensor(codes.to(torch.int8 if symmetric else torch.uint8), scales, zeros, bits, granularity,
                   tuple(w.shape), w.dtype)
