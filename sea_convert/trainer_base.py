"""What stage A and stage B trainers share: the optimizer, the schedule and the step count.

Their state is checkpointed from outside (workers/train/dist_checkpoint.py): the trainable parameters
(those with requires_grad), the optimizer, the schedule, `step_count` and `total_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainerBase:
    """Subclasses set `self.model` and call `_build_optimizer(groups, ...)` with named parameter groups."""

    model: nn.Module
    # set from outside by a data-parallel runner (workers/train/parallel.py): averages gradients across ranks
    grad_sync: Callable[[], None] | None = None

    def _build_optimizer(self, groups: list[dict], weight_decay: float, warmup: int, total_steps: int) -> None:
        self.total_steps, self.warmup = total_steps, warmup
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
        # reads self.total_steps at every step, so a caller may shorten the run (set_total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup, self.total_steps)
        )
        self.step_count = 0

    def set_total_steps(self, total: int) -> None:
        """Re-plan the schedule's length (e.g. to fit a time budget measured on the first steps)."""
        self.total_steps = max(total, self.step_count)

    def _optimizer_step(self, grad_clip: float) -> float:
        if self.grad_sync is not None:
            self.grad_sync()  # before clipping: every rank then clips the same averaged gradient
        torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return lr
