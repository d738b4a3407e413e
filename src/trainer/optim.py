"""Learning-rate schedules, as functions of the optimizer step (the loop steps them once a step)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100,
           min_lr_ratio: float = 0.1) -> LRScheduler:
    """Linear warmup, then a half cosine from lr down to min_lr_ratio * lr at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step(optimizer: Optimizer, total_steps: int, step_size: int = 1000,
         gamma: float = 0.5) -> LRScheduler:
    return StepLR(optimizer, step_size=step_size, gamma=gamma)
