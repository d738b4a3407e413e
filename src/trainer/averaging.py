"""An exponential moving average of the weights (`trainer.ema_decay`).

The average generalises better than the last step's weights (Polyak averaging; timm's model EMA,
airbench's lookahead), so with it on, validation measures the average, best.pt and last.pt hand it
on as their `model` (the weights `evaluate`, `predict` and `export` use), and the weights being
trained travel beside it as `training_model` for resume.

Written here rather than with torch.optim.swa_utils.AveragedModel: that one reads its update count
from a device tensor each step (a host sync on a GPU) and has no warm-up, so a short run's average
would be mostly its random initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class WeightAverage:
    """A copy of `model` whose floating-point weights and buffers (batch norm statistics too)
    move toward the model's by 1 - decay every `every` optimizer steps; integer buffers are
    copied. The decay warms up as (1 + n) / (10 + n) after n updates, capped at `decay`."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.every = decay, every
        current = model.state_dict(keep_vars=True)
        pairs = [(mine.detach(), current[key].detach())  # detach: the same storage, no autograd
                 for key, mine in self.model.state_dict(keep_vars=True).items()]
        floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self._averaged, self._current = [a for a, _ in floats], [c for _, c in floats]
        self._others = [pair for pair in pairs if not pair[0].is_floating_point()]

    def decay_after(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (counted from 1); resuming at any step continues the same
        sequence of decays, since it depends on the step alone."""
        if step % self.every:
            return
        weight = 1.0 - self.decay_after(step // self.every - 1)
        torch._foreach_lerp_(self._averaged, self._current, weight)  # one kernel per dtype
        for averaged, current in self._others:
            averaged.copy_(current)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
