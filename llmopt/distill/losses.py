"""Soft-target losses: what the student learns from the teacher's whole distribution.

A language model trained on text sees one right answer per position: the token that came
next. A trained teacher knows more: after `for i in` it puts most of its mass on `range`,
some on `enumerate`, a little on `zip`. Those probabilities of the *wrong* answers (Hinton's
"dark knowledge") say which mistakes are nearly right, and the student can learn them from
every position at once: many more bits per token than the one-hot label carries.

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(q, labels)

with p_T = softmax(teacher / T), q_T = softmax(student / T). A temperature T > 1 flattens
both distributions so the small probabilities count; the T^2 keeps the gradient's size
independent of T (the gradient of the soft term shrinks as 1/T^2), so alpha means the same
at every temperature. Forward KL(p || q) is "mean-seeking": the student must cover
everything the teacher thinks possible. Reverse KL(q || p) is "mode-seeking": the student
may ignore some of the teacher's options but is punished for mass where the teacher has
none (MiniLLM, Gu et al. 2024, argues this suits generation by smaller students).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("forward", "reverse")


def check_args(temperature: float, alpha: float, kind: str) -> None:
    """ValueError naming the bad argument and what it may be."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # at least float32: bf16 logits would lose the small probabilities the soft targets carry
    # (float64 stays float64: the tests check the large-T limit, where float32 runs out of digits)
    return x if x.dtype == torch.float64 else x.float()


def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over the last dimension: T > 1 flattens, T < 1 sharpens."""
    check_args(temperature, 0.0, "forward")
    return torch.softmax(_as_float(logits) / temperature, dim=-1)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            kind: str = "forward") -> torch.Tensor:
    """KL divergence per position between the tempered distributions, shape `logits.shape[:-1]`.

    forward: KL(teacher_T || student_T) = sum p_T (log p_T - log q_T);
    reverse: KL(student_T || teacher_T) = sum q_T (log q_T - log p_T).
    Computed from log-softmaxes (never log of a probability that underflowed to 0)."""
    check_args(temperature, 0.0, kind)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape (same vocabulary), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    log_q = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_as_float(teacher_logits) / temperature, dim=-1)
    if kind == "reverse":
        log_p, log_q = log_q, log_p
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward",
                      ignore_index: int = -100) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * cross-entropy(student, labels), averaged over tokens.

    Logits are (..., vocab), labels (...) token ids; positions whose label is `ignore_index`
    (padding) count in neither term. `labels` may be None only when alpha == 1 (pure
    distillation needs no labels). Only `student_logits` should carry gradients: pass the
    teacher's logits computed under `torch.no_grad()`."""
    check_args(temperature, alpha, kind)
    if labels is None and alpha < 1:
        raise ValueError(f"labels are needed when alpha < 1 (the hard-label term), got alpha={alpha!r}")
    if labels is not None and tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits' without "
                         f"the vocabulary), got {tuple(labels.shape)}")
    kl = soft_kl(student_logits, teacher_logits, temperature, kind)
    if labels is None:
        return temperature**2 * kl.mean()
    keep = labels != ignore_index
    if not keep.any():
        raise ValueError(f"every label is ignore_index={ignore_index}: no token to learn from")
    soft = temperature**2 * kl[keep].mean()
    if alpha == 1:
        return soft
    hard = F.cross_entropy(_as_float(student_logits)[keep], labels[keep])
    return alpha * soft + (1 - alpha) * hard
