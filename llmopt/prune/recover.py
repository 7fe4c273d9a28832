"""A short recovery fine-tune after pruning, through the course's one training loop.

Pruning removes weights the model was trained with; a few hundred steps on the train split let
the weights that stay take over some of the work. For unstructured and N:M pruning the zeros
must stay zeros while training (or the sparsity, and any sparse-kernel speedup, is lost), so
each pruned weight is trained through a mask: the layer computes with `weight * mask`, whose
gradient is zero where the mask is. A structured-pruned model has no zeros to keep and is
simply fine-tuned: it is an ordinary smaller model.

    prune(model, "wanda", 0.5, calibration=calib)
    log = recover(model, tokenizer, steps=200)        # zeros stay zero; returns the loss history
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..train import TrainLog, finetune, lm_loss
from .model import targets


class _KeepMask(nn.Module):
    """The parametrization weight -> weight * mask (the mask is a buffer, not trained)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def recover(model: nn.Module, tokenizer, steps: int = 200, lr: float = 2e-4, teacher: nn.Module | None = None,
            keep_zeros: bool = True, progress: bool = True, **finetune_kw) -> TrainLog:
    """Fine-tune a pruned model in place for `steps` steps (`llmopt.train.finetune`); returns
    the `TrainLog`. With `keep_zeros`, every decoder linear's exact zeros stay zero. With a
    `teacher` (the dense model) the loss is distillation (KL to the teacher's next-token
    distribution) instead of cross-entropy on the labels."""
    from ..quant.qat import distillation_loss

    masked = []
    if keep_zeros:
        for lin in targets(model).values():
            mask = lin.weight.detach() != 0
            if not mask.all():
                parametrize.register_parametrization(lin, "weight", _KeepMask(mask.to(lin.weight.dtype)))
                masked.append(lin)
    loss_fn = lm_loss if teacher is None else distillation_loss(teacher)
    try:
        log = finetune(model, tokenizer, steps, lr, loss_fn=loss_fn, progress=progress, **finetune_kw)
    finally:  # bake weight * mask back into a plain weight, even if training was interrupted
        for lin in masked:
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    return log
