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


def inverse_factor(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1: row i says how column
    i's error spreads onto the later columns (shared with SparseGPT)."""
    H = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def column_update(W: torch.Tensor, U: torch.Tensor, i: int, scale: torch.Tensor, zero, bits: int):
    """GPTQ's step for one column, in place: round column i to codes, then move its rounding
    error onto the columns after it (i+1, ...) along row i of U, the upper Cholesky factor of
    H^-1, so the layer's output on the calibration inputs moves as little as possible.
    W: (rows, n) weights not yet quantized from column i on; scale/zero: (rows, 1).
    Returns (codes of column i (rows,), the scaled error (rows,) that was spread)."""
    q = to_codes(W[:, i : i + 1], scale, zero, bits)
    err = (W[:, i] - from_codes(q, scale, zero)[:, 0]) / U[i, i]
    W[:, i:] -= err[:, None] * U[i, i:][None, :]  # column i itself becomes its dequantized value
    return q[:, 0], err


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
    U = inverse_factor(H, damp)

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
            q, err1[:, i] = column_update(W1, U1, i, scales[:, g], None if zeros is None else zeros[:, g], bits)
            Q[:, i1 + i] = q
        W[:, i2:] -= err1 @ U[i1:i2, i2:]

    codes = Q[:, torch.argsort(perm)]
    return QTensor(codes.to(torch.int8 if symmetric else torch.uint8), scales, zeros, bits, granularity,
                   tuple(w.shape), w.dtype)


@torch.no_grad()
def gptq_model(model, calibration: torch.Tensor, cfg):
    """GPTQ a whole model, one decoder layer at a time: each layer's Hessians come from
    inputs that already went through the quantized layers before it, so later layers learn
    to absorb the earlier layers' error. Called by `quantize(model, cfg, calibration)`.
    A Mixture-of-Experts layer's experts get one Hessian each, from the tokens routed to them
    (`ExpertHessians`). Linears outside the decoder layers (lm_head, unless cfg.skip lets it
    through) get RTN."""
    from . import calibrate
    from .experts import ExpertHessians, QuantExperts, expert_targets
    from .linear import QuantLinear, targets

    todo, expert_todo = targets(model, cfg), expert_targets(model, cfg)
    wanted, done = {id(m) for _, m in todo + expert_todo}, set()
    for _, layer, inputs in calibrate.layerwise(model, calibration, cfg.calib_batch_size):
        found = {n: m for n, m in calibrate.linears(layer).items() if id(m) in wanted}
        experts = {n: m for n, m in layer.named_modules() if id(m) in wanted and n not in found}
        stats, expert_stats = calibrate.HessianAccumulator(), {n: ExpertHessians() for n in experts}
        handles = [m.register_forward_hook(expert_stats[n]) for n, m in experts.items()]
        try:
            calibrate.collect(layer, inputs, found, stats)
        finally:
            for h in handles:
                h.remove()
        for name, linear in found.items():
            qt = gptq_quantize(linear.weight, stats.H[name], cfg.bits, cfg.group_size, cfg.symmetric,
                               cfg.damp, act_order=cfg.act_order)
            calibrate.replace(layer, name, QuantLinear.from_qtensor(qt, cfg, linear.bias))
            done.add(id(linear))
        for name, module in experts.items():
            calibrate.replace(layer, name, QuantExperts.from_experts(module, cfg, expert_stats[name].H))
            done.add(id(module))
        del stats, expert_stats
    for name, linear in todo:
        if id(linear) not in done:
            calibrate.replace(model, name, QuantLinear.from_linear(linear, cfg))
    for name, module in expert_todo:
        if id(module) not in done:
            calibrate.replace(model, name, QuantExperts.from_experts(module, cfg))
    return model
