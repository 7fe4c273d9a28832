"""Lesson 07: Mixture of Experts (top-k gating, the balancing loss, sort-based dispatch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _call, _result


def _by_expert(weights, experts):
    """Slots of each row in expert order, so any slot order the learner returns compares equal."""
    order = experts.argsort(-1)
    return weights.gather(-1, order), experts.gather(-1, order)


def check_top_k_gating(fn) -> bool:
    """Exercise 7.1: fn(logits (T, E), k) -> (weights (T, k), experts (T, k)): softmax, top-k,
    the k weights renormalised to sum to 1."""
    from ..moe import route

    name = "Exercise 7.1 (top-k gating)"
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(6, 4, generator=g), 2), (torch.randn(10, 8, generator=g) * 3, 2),
             (torch.randn(5, 16, generator=g), 1), (torch.randn(4, 6, generator=g), 6)]
    for logits, k in cases:
        what = f"{tuple(logits.shape)} logits, k={k}"
        ok, out = _call(name, fn, logits.clone(), k)
        if not ok:
            return _result(name, False, out)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return _result(name, False, "return a pair (weights, experts)")
        w, e = out
        if not (isinstance(w, torch.Tensor) and isinstance(e, torch.Tensor)) or tuple(w.shape) != (len(logits), k) \
                or tuple(e.shape) != (len(logits), k):
            return _result(name, False, f"weights and experts must both be tensors of shape ({len(logits)}, {k}) "
                                        f"for {what}")
        r = route(logits, k)
        w, e = _by_expert(w.float(), e.long())
        want_w, want_e = _by_expert(r.weights, r.experts)
        if not torch.equal(e, want_e):
            return _result(name, False, f"wrong experts chosen for {what}: keep the k largest probabilities")
        if torch.allclose(w, want_w, atol=1e-5):
            continue
        p = F.softmax(logits, -1)
        if torch.allclose(w, p.gather(-1, e), atol=1e-5):
            return _result(name, False, f"the k weights must be renormalised to sum to 1 for {what} (they are the "
                                        "raw softmax probabilities)")
        if torch.allclose(w, logits.gather(-1, e), atol=1e-5):
            return _result(name, False, f"those are the logits; the weights are probabilities for {what}")
        return _result(name, False, f"weights differ from the renormalised top-k probabilities for {what}")
    return _result(name, True, "each token keeps its k most probable experts, and their weights sum to 1, so "
                               "identical experts give back the dense FFN")


def check_balancing_loss(fn) -> bool:
    """Exercise 7.2: fn(probs (T, E), experts (T, k)) -> E * sum_i f_i * P_i, f_i the share of the
    T*k assignments on expert i, P_i the mean probability of expert i."""
    from ..moe import expert_load, load_balancing_loss

    name = "Exercise 7.2 (load-balancing loss)"
    g = torch.Generator().manual_seed(1)
    cases = []
    for T, E, k, scale in ((8, 4, 1, 1.0), (32, 8, 2, 3.0), (50, 16, 4, 1.0)):
        probs = F.softmax(torch.randn(T, E, generator=g) * scale, -1)
        cases.append((probs, probs.topk(k, -1).indices, f"T={T}, E={E}, k={k}"))
    even = torch.full((8, 4), 0.25)
    cases.append((even, (torch.arange(16).reshape(8, 2) % 4), "a perfectly even router"))
    for probs, experts, what in cases:
        leaf = probs.clone().requires_grad_(True)   # the gradient is checked w.r.t. this (the fn gets a copy)
        ok, out = _call(name, fn, leaf.clone(), experts.clone())
        if not ok:
            return _result(name, False, out)
        if not isinstance(out, torch.Tensor):
            try:
                float(out)
            except (TypeError, ValueError):
                return _result(name, False, f"returned {type(out).__name__}, expected a number (a 0-d tensor)")
            return _result(name, False, f"returned a Python {type(out).__name__}: return the 0-d tensor, so the "
                                        "gradient can flow back to the router's probabilities")
        if out.numel() != 1:
            return _result(name, False, f"returned a tensor of shape {tuple(out.shape)}, expected one number")
        got = float(out)
        want = load_balancing_loss(probs, experts).item()
        if abs(got - want) <= 1e-4 * max(1.0, abs(want)):
            T, E = probs.shape
            # d loss / d probs[t, i] = E * f_i / T: only P carries a gradient, f is a count
            want_grad = (E * expert_load(experts, E).float() / experts.numel() / T).expand(T, E)
            grad = torch.autograd.grad(out, leaf, allow_unused=True)[0] if out.requires_grad else None
            if grad is None:
                return _result(name, False, f"the loss has no gradient w.r.t. probs for {what}: compute P = "
                                            "probs.mean(0) without .detach(), .item() or float(), so the "
                                            "gradient flows through P to the router")
            if not torch.allclose(grad.float(), want_grad, atol=1e-5):
                return _result(name, False, f"wrong gradient w.r.t. probs for {what}: it should come only through "
                                            "P = probs.mean(0), with f (a count of assignments) as constants")
            continue
        T, E = probs.shape
        k = experts.shape[1]
        f_tok = expert_load(experts, E).float() / T
        if abs(got - E * (f_tok * probs.mean(0)).sum().item()) < 1e-4 * max(1.0, want * k):
            return _result(name, False, f"got {got:.4g}, expected {want:.4g} for {what}: divide the counts by the "
                                        "T*k assignments, not the T tokens (that is k times the loss)")
        if abs(got - want / E) < 1e-5:
            return _result(name, False, f"got {got:.4g}, expected {want:.4g} for {what}: multiply by E, so an "
                                        "even router scores 1")
        return _result(name, False, f"got {got:.4g}, expected {want:.4g} for {what}")
    return _result(name, True, "1.0 when the load is even, up to E when one expert takes everything; the "
                               "gradient flows through P, the router's probabilities")


def check_sorted_dispatch(fn) -> bool:
    """Exercise 7.3: fn(x, experts, weights, gate_up, down) -> (T, H), by sorting the assignments
    by expert, running each expert once on its contiguous segment and adding rows back."""
    from ..moe import random_problem, sorted_dispatch

    name = "Exercise 7.3 (sort-based dispatch)"
    for T, H, inter, E, k, only, cap in ((12, 8, 16, 4, 2, None, None), (20, 16, 8, 8, 2, [1, 4, 6], None),
                                          (9, 8, 8, 3, 3, None, None), (16, 8, 8, 4, 2, None, 0.5)):
        x, experts, weights, gate_up, down = random_problem(T, H, inter, E, k, seed=2, only=only,
                                                            capacity_factor=cap)
        what = f"T={T}, E={E}, k={k}" + (", experts with no tokens" if only else "") + \
            (", some assignments dropped (expert index E)" if cap else "")
        ok, out = _call(name, fn, x.clone(), experts.clone(), weights.clone(), gate_up, down)
        if not ok:
            return _result(name, False, out)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, H):
            return _result(name, False, f"return a ({T}, {H}) tensor for {what}")
        want = sorted_dispatch(x, experts, weights, gate_up, down)
        if torch.allclose(out, want, atol=1e-5):
            continue
        unweighted = sorted_dispatch(x, experts, (weights > 0).float(), gate_up, down)
        if torch.allclose(out, unweighted, atol=1e-5):
            return _result(name, False, f"multiply each expert's output by its gate weight for {what}")
        return _result(name, False, f"max |difference| {(out - want).abs().max().item():.3g} from the reference for "
                                    f"{what}: did each token get the sum of its k slots (index_add_, not "
                                    "assignment, which keeps only one)?")
    return _result(name, True, "one sort, one gather, a matmul per contiguous segment and one scatter-add, "
                               "whatever the number of experts")
