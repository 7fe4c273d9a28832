"""Lesson 05: knowledge distillation (soft targets, the distillation loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _call, _result


def _tensor_out(out, shape, what):
    """The learner's result as a float tensor of `shape`, or the message saying why not."""
    if not isinstance(out, torch.Tensor):
        return None, f"returned {type(out).__name__}, expected a tensor for {what}"
    if tuple(out.shape) != tuple(shape):
        return None, f"returned shape {tuple(out.shape)}, expected {tuple(shape)} for {what}"
    if not torch.isfinite(out).all():
        return None, f"NaN or inf in the result for {what}"
    return out, None


def check_soft_targets(fn) -> bool:
    """Exercise 5.1: fn(logits (..., V), T) -> softmax(logits / T) over the vocabulary."""
    from ..distill import soft_targets

    name = "Exercise 5.1 (soft targets with a temperature)"
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(3, 10, generator=g) * 4, 1.0), (torch.randn(2, 5, 50, generator=g) * 5, 2.0),
             (torch.randn(4, 10, generator=g) * 3, 8.0), (torch.randn(4, 10, generator=g) * 2, 0.5),
             (torch.tensor([[1000.0, 0.0, -1000.0]]), 4.0)]  # large logits: subtract the max (softmax does)
    for logits, T in cases:
        what = f"{tuple(logits.shape)} logits at T={T}"
        ok, out = _call(name, fn, logits.clone(), T)
        if not ok:
            return _result(name, False, out)
        out, msg = _tensor_out(out, logits.shape, what)
        if msg:
            return _result(name, False, msg)
        want = soft_targets(logits, T)
        if torch.allclose(out.float(), want, atol=1e-6):
            continue
        if not torch.allclose(out.float().sum(-1), torch.ones(logits.shape[:-1]), atol=1e-4):
            return _result(name, False, f"rows do not sum to 1 for {what}: softmax over the last dimension "
                                        "(the vocabulary)")
        if torch.allclose(out.float(), torch.softmax(logits, -1), atol=1e-6):
            return _result(name, False, f"that is softmax(logits), the temperature is missing for {what}")
        if torch.allclose(out.float(), torch.softmax(logits * T, -1), atol=1e-6):
            return _result(name, False, f"divide the logits by T, not multiply, for {what}: T > 1 must flatten")
        return _result(name, False, f"values differ from softmax(logits / T) for {what}")
    return _result(name, True, "softmax(z / T): T = 1 is the model's own distribution, T > 1 flattens it "
                               "and lets the small probabilities show")


def _reference(s, t, y, T, alpha, kind="forward", t_squared=True, kl_mean_over_vocab=False, ce_at_T=False):
    """The loss with some plausible mistakes switched on, to tell the learner which one it is."""
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if kind == "reverse":
        log_p, log_q = log_q, log_p
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl = kl.mean() / (s.shape[-1] if kl_mean_over_vocab else 1)
    ce = F.cross_entropy(s / T if ce_at_T else s, y)
    return alpha * (T**2 if t_squared else 1) * kl + (1 - alpha) * ce


_MISTAKES = [
    (dict(t_squared=False), "the soft term is missing its T^2 (without it the soft targets' gradient shrinks "
                            "as 1/T^2 and alpha means something else at each temperature)"),
    (dict(kind="reverse"), "that is the reverse KL(student || teacher); Hinton's loss is KL(teacher || student): "
                           "the teacher's probabilities weight the sum"),
    (dict(kl_mean_over_vocab=True), "the KL is averaged over vocabulary entries too: sum it over the vocabulary, "
                                    "average it over tokens (F.kl_div's reduction='mean' does the former)"),
    (dict(ce_at_T=True), "the cross-entropy with the labels uses the student's plain logits, not logits / T"),
]


def check_distillation_loss(fn) -> bool:
    """Exercise 5.2: fn(student_logits (N, V), teacher_logits (N, V), labels (N,), T, alpha) ->
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels), per-token mean."""
    from ..distill import distillation_loss

    name = "Exercise 5.2 (the distillation loss)"
    g = torch.Generator().manual_seed(0)
    for T, alpha in [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (2.0, 1.0), (3.0, 0.0), (0.5, 0.3)]:
        n, v = 12, 30
        s, t = torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3
        y = torch.randint(0, v, (n,), generator=g)
        what = f"T={T}, alpha={alpha}"
        leaf = s.clone().requires_grad_(True)
        ok, out = _call(name, fn, leaf, t.clone(), y.clone(), T, alpha)
        if not ok:
            return _result(name, False, out)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            return _result(name, False, f"returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, "
                                        f"expected a scalar tensor (the mean over tokens) for {what}")
        ref_leaf = s.clone().requires_grad_(True)
        want = distillation_loss(ref_leaf, t, y, temperature=T, alpha=alpha)
        got = out.detach().float().reshape(())
        if not torch.allclose(got, want.detach(), rtol=1e-4, atol=1e-6):
            for kw, message in _MISTAKES:
                if torch.allclose(got, _reference(s, t, y, T, alpha, **kw), rtol=1e-4, atol=1e-6):
                    return _result(name, False, f"{message} ({what})")
            if torch.allclose(got, _reference(s, t, y, T, 1 - alpha), rtol=1e-4, atol=1e-6):
                return _result(name, False, f"alpha weighs the soft (teacher) term, 1 - alpha the labels ({what})")
            return _result(name, False, f"got {got.item():.5g}, expected {want.item():.5g} for {what}")
        if not out.requires_grad:
            return _result(name, False, f"no gradient flows back to the student's logits ({what}): "
                                        "is the result detached, or computed under no_grad?")
        out.reshape(()).backward()
        want.backward()
        if leaf.grad is None or not torch.allclose(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-7):
            return _result(name, False, f"the value is right but the gradient to the student's logits is not "
                                        f"({what}); keep every step in torch")
    return _result(name, True, "matches llmopt.distill.distillation_loss (alpha * T^2 * KL(teacher_T || student_T) "
                               "+ (1 - alpha) * CE), gradient included, at every temperature")
