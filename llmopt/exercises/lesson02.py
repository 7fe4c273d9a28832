"""Lesson 02: post-training quantization (one GPTQ column update)."""
from __future__ import annotations

import torch

from ._common import _call, _result


def check_gptq_column(fn) -> bool:
    """Exercise 2.1: fn(W, U, i, scale, bits) -> (codes of column i, W after the update), symmetric
    quantization, compared with llmopt.quant.gptq.column_update on a few random layers."""
    from ..quant.gptq import column_update

    name = "Exercise 2.1 (one GPTQ column update)"
    g = torch.Generator().manual_seed(0)
    for rows, n, i, bits in [(6, 10, 0, 4), (5, 12, 7, 3), (4, 8, 7, 4), (3, 16, 2, 8)]:
        x = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5)
        H = 2 * x.T @ x / x.shape[0] + 0.01 * torch.eye(n)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        W = torch.randn(rows, n, generator=g)
        qmax = 2 ** (bits - 1) - 1
        scale = W.abs().amax(dim=1) / qmax
        # in GPTQ the earlier columns' error feedback can push column i past the range its
        # scale was set for: two weights here land outside it, so the clamp matters
        W[0, i], W[-1, i] = 1.6 * qmax * scale[0], -1.6 * qmax * scale[-1]
        want_W = W.clone()
        want_q, _ = column_update(want_W, U, i, scale[:, None], None, bits)
        ok, got = _call(name, fn, W.clone(), U.clone(), i, scale.clone(), bits)
        if not ok:
            return _result(name, False, got)
        if not (isinstance(got, tuple) and len(got) == 2):
            return _result(name, False, "return a pair (codes of column i, updated W)")
        q, W_new = (torch.as_tensor(t).float() for t in got)
        what = f"column {i} of a {rows}x{n} weight at {bits} bits"
        if q.shape == want_q.shape and q.abs().max() > qmax:
            return _result(name, False, f"codes outside [-{qmax}, {qmax}] for {what}: clamp round(W[:, i] / scale) "
                           "to the range")
        if q.shape != want_q.shape or not torch.equal(q.reshape(-1), want_q):
            return _result(name, False, f"codes differ from round(W[:, i] / scale) clamped to the range, for {what}")
        if W_new.shape != W.shape:
            return _result(name, False, f"W has shape {tuple(W_new.shape)}, expected {tuple(W.shape)}")
        if not torch.allclose(W_new[:, :i], W[:, :i]):
            return _result(name, False, f"columns before {i} changed; only columns i+1.. should move")
        if i + 1 < n and torch.allclose(W_new[:, i + 1 :], W[:, i + 1 :]):
            return _result(name, False, f"the later columns did not move: spread the error along U[i, i+1:] ({what})")
        if not torch.allclose(W_new[:, i + 1 :], want_W[:, i + 1 :], atol=1e-5, rtol=1e-4):
            err = (W_new[:, i + 1 :] - want_W[:, i + 1 :]).abs().max().item()
            return _result(name, False, f"later columns off by up to {err:.3g} for {what}: e = (w_i - q_i s) / U_ii, "
                           "w_j -= e U_ij")
    return _result(name, True, "codes and error feedback match llmopt.quant.gptq.column_update")
