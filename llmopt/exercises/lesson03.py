"""Lesson 03: quantization-aware training (the straight-through estimator)."""
from __future__ import annotations

import torch

from ._common import _call, _result


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _forward_backward(name, fn, inputs: list, upstream: torch.Tensor):
    """fn(*inputs) on fresh leaves, then backward with `upstream`: (ok, out or message, leaves)."""
    leaves = [_leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    ok, out = _call(name, fn, *leaves)
    if not ok:
        return False, out, leaves
    if not isinstance(out, torch.Tensor) or out.shape != upstream.shape:
        return False, f"returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, expected a tensor of " \
                      f"shape {tuple(upstream.shape)}", leaves
    if not out.requires_grad:
        return False, "no gradient flows back through the result (is it detached, or made under no_grad?)", leaves
    try:
        out.backward(upstream)
    except Exception as e:  # a learner's graph: show what went wrong, do not crash
        return False, f"backward raised {type(e).__name__}: {e}", leaves
    return True, out.detach(), leaves


def check_ste(fn) -> bool:
    """Exercise 3.1: fn(x) -> round(x) in the forward pass, gradient 1 in the backward pass."""
    name = "Exercise 3.1 (straight-through round)"
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(4, 50, generator=g) * 5, torch.randn(3, 7, generator=g) * 0.4):
        upstream = torch.randn(x.shape, generator=g)
        ok, out, (leaf,) = _forward_backward(name, fn, [x], upstream)
        if not ok:
            return _result(name, False, out)
        if not torch.equal(out, torch.round(x)):
            bad = (out != torch.round(x)).float().mean().item()
            return _result(name, False, f"the forward value differs from torch.round(x) in {100 * bad:.0f}% of entries")
        if leaf.grad is None or not leaf.grad.abs().sum() > 0:
            return _result(name, False, "the gradient is zero: round's own derivative is 0 almost everywhere, "
                            "so pass the incoming gradient straight through instead")
        if not torch.allclose(leaf.grad, upstream):
            return _result(name, False, "the gradient should be the incoming gradient unchanged (d round / dx := 1)")
    return _result(name, True, "round(x) forward, identity gradient backward: the straight-through estimator")


def check_fake_quant(fn) -> bool:
    """Exercise 3.2: fn(w, scale, zero, bits) -> (clamp(round(w/s) + z) - z) * s, with the STE."""
    from ..quant.qat import fake_quant

    name = "Exercise 3.2 (fake quantization with the STE)"
    g = torch.Generator().manual_seed(0)
    for bits, symmetric in [(2, True), (3, True), (2, False), (4, False)]:
        w = torch.randn(6, 3, 16, generator=g)
        qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
        if symmetric:
            scale, zero = 0.6 * w.abs().amax(-1, keepdim=True) / qmax, None  # 0.6: some weights clamp
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = 0.6 * (hi - lo) / qmax
            zero = torch.round(-lo / scale).clamp(0, qmax)
        what = f"{bits}-bit {'symmetric' if symmetric else 'zero-point'} groups"
        upstream = torch.randn(w.shape, generator=g)
        ok, out, leaves = _forward_backward(name, fn, [w, scale, zero, bits], upstream)
        if not ok:
            return _result(name, False, out)
        ref_w, ref_s = _leaf(w), _leaf(scale)
        want = fake_quant(ref_w, ref_s, zero, bits)
        want.backward(upstream)
        if not torch.allclose(out, want.detach(), atol=1e-6):
            return _result(name, False, f"values differ from (clamp(round(w/s) + z, qmin, qmax) - z) * s for {what}")
        w_grad, s_grad = leaves[0].grad, leaves[1].grad
        if w_grad is None or not w_grad.abs().sum() > 0:
            return _result(name, False, f"no gradient reaches w for {what}: round with the straight-through estimator")
        if not torch.allclose(w_grad, ref_w.grad, atol=1e-6):
            clamped = ref_w.grad == 0
            if torch.allclose(w_grad[~clamped], upstream[~clamped]):
                return _result(name, False, f"weights the clamp cut off should get no gradient ({what})")
            return _result(name, False, f"the gradient to w is wrong for {what}: 1 inside the range, 0 outside")
        if s_grad is None or not torch.allclose(s_grad, ref_s.grad, atol=1e-4, rtol=1e-4):
            return _result(name, False, f"the gradient to the scale is wrong for {what} (keep s in the graph, "
                            "compute q with the STE round and return (q - z) * s)")
    return _result(name, True, "values and gradients (to the weights and the scale, as in LSQ) match "
                   "llmopt.quant.qat.fake_quant")
