"""The local optimizer and its learning-rate schedule, as every training side builds them.

Two parameter groups: the classifier head (parameters whose name contains
``classifier``, also under peft's ``modules_to_save``) and the body (encoder or LoRA
adapters). Under DP-SGD each coordinate of a noisy gradient carries noise of standard
deviation ``sigma * C / B``; a freshly initialized head, a few thousand coordinates, learns
only with a much larger rate than the pretrained body can take without being wrecked.

The ``linear`` schedule decays every group's rate from its base value to zero over the
run's planned local steps, counted across rounds::

    lr_t = lr_base * (1 - t / T),   t = (round - 1) * steps_per_round + local step

so the step a client takes in the last round is smaller than in the first one, as in
centralized fine-tuning with the same number of passes.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from sepal.config import RunConfig

HEAD_MARKER = "classifier"


def parameter_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    """The trainable parameters as [body, head] groups with their own learning rates."""
    head_lr = cfg.head_learning_rate or cfg.learning_rate
    body, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if HEAD_MARKER in name else body).append(param)
    groups = [{"params": body, "lr": cfg.learning_rate, "name": "body"},
              {"params": head, "lr": head_lr, "name": "head"}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """``optimizer``: AdamW, or SGD with ``momentum``; ``weight-decay`` on both."""
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


class LearningRateSchedule:
    """The run-wide rate factor at step ``t`` (see module docstring)."""

    def __init__(self, kind: str, total_steps: int, first_step: int = 0):
        self.kind = kind
        self.total_steps = max(int(total_steps), 1)
        self.step = int(first_step)

    def factor(self, step: int | None = None) -> float:
        if self.kind == "constant":
            return 1.0
        return max(0.0, 1.0 - (self.step if step is None else step) / self.total_steps)

    def attach(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """torch's LambdaLR over every parameter group, starting at this schedule's step;
        ``step()`` it once per logical batch."""
        first = self.step
        return LambdaLR(optimizer, lambda local_step: self.factor(first + local_step))
