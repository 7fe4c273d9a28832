"""Distillation through the course's one training loop.

`llmopt.train.train` calls `loss_fn(model, x, y)` each step; distillation is only a
different loss: run the frozen teacher on the same batch, without gradients, and score the
student against its distribution as well as against the labels. Everything else (schedule,
optimizer, clipping, bf16 autocast, validation) is the loop every lesson uses, so a
hard-label baseline with the same `TrainConfig` sees the very same batches:

    log_hard = train(student_a, stream, cfg, val_stream)                     # labels only
    log_kd = distill(teacher, student_b, stream, cfg, temperature=2.0, alpha=0.5, val_stream=val)
"""
from __future__ import annotations

import torch

from .losses import check_args, distillation_loss


def distill_loss_fn(teacher, temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward"):
    """A `train()` loss: the teacher's logits under no_grad, then `distillation_loss`.

    The teacher is put in eval mode (no dropout: its targets must not be noisy) and is
    never updated: none of its parameters is in the graph, so none gets a gradient."""
    check_args(temperature, alpha, kind)
    teacher.eval()

    def loss_fn(model, x, y):
        logits = model(input_ids=x).logits
        with torch.no_grad():
            t = teacher(input_ids=x).logits
        return distillation_loss(logits, t, y, temperature, alpha, kind)

    return loss_fn


def distill(teacher, student, train_stream, cfg, temperature: float = 2.0, alpha: float = 0.5,
            kind: str = "forward", val_stream=None, progress: bool = True):
    """Train `student` on `train_stream` to match `teacher` (and the labels); returns the `TrainLog`.

    `cfg` is a `llmopt.train.TrainConfig`; its steps, batches, seed and schedule are used
    exactly as `train()` uses them, and `val_stream` gets the student's plain cross-entropy
    (comparable with a hard-label run). Only the student's parameters are optimized."""
    from ..train import TrainConfig, train

    check_args(temperature, alpha, kind)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a llmopt.train.TrainConfig, got {type(cfg).__name__}")
    if teacher is student:
        raise ValueError("teacher and student must be different models (copy the teacher to self-distil)")
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise ValueError(f"teacher and student must share the vocabulary (the soft targets are distributions "
                         f"over it): teacher vocab_size {vt}, student {vs}")
    dt, ds = next(teacher.parameters()).device, next(student.parameters()).device
    if dt != ds:
        raise ValueError(f"teacher and student must be on the same device, got teacher on {dt}, student on {ds}")
    shared = {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
    if shared:
        raise ValueError("the student shares parameter tensors with the teacher: training it would change the "
                         "teacher; build it with init_from_teacher (which copies) or copy.deepcopy")
    loss_fn = distill_loss_fn(teacher, temperature, alpha, kind)
    return train(student, train_stream, cfg, val_stream=val_stream, loss_fn=loss_fn, progress=progress)
