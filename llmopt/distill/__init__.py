"""Knowledge distillation (lesson 05): train a small student on a big teacher's soft targets.

    from llmopt.distill import student_config, init_from_teacher, distill
    student = init_from_teacher(teacher, student_config(teacher.config, num_hidden_layers=3))
    log = distill(teacher, student, train_stream, TrainConfig(steps=300), temperature=2.0, alpha=0.5)

`distillation_loss` is the loss itself (forward or reverse KL at a temperature, mixed with
cross-entropy); `distill` runs it through `llmopt.train.train`, the course's one loop.
"""
from .losses import KINDS, distillation_loss, soft_kl, soft_targets
from .student import evenly_spaced, init_from_teacher, same_widths, student_config
from .trainer import distill, distill_loss_fn

__all__ = ["KINDS", "distillation_loss", "soft_kl", "soft_targets", "student_config", "init_from_teacher",
           "same_widths", "evenly_spaced", "distill", "distill_loss_fn"]
