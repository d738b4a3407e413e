"""One optimizer step of the loop: each optimizer's (a GAN has two) loss over the micro-batches
of gradient accumulation, under the run's precision and gradient sync, clipped, and skipped when
its gradient norm is not finite and the run allows it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from trainer.distributed import Runtime
from trainer.tasks import Task


def train_step(task: Task, model: Any, optimizers: list[torch.optim.Optimizer],
               scaler: torch.amp.GradScaler, micro_batches: list[tuple[Tensor, Tensor]],
               rt: Runtime, grad_clip: float, skip_nonfinite: bool = False
               ) -> tuple[dict[str, Tensor], bool]:
    """One optimizer step per optimizer, each over all micro-batches, and whether a step was
    skipped for a non-finite gradient norm. No host sync unless `skip_nonfinite` asks for one.
    The train/ scalars include each optimizer's gradient norm before clipping, when computed."""
    n = len(micro_batches)
    logs: dict[str, list[Tensor]] = {"loss": []}  # "loss" sums every stage's loss
    norms: dict[str, Tensor] = {}  # one per stage, not per micro-batch
    skipped = False
    for stage, optimizer in enumerate(optimizers):
        for each in optimizers:  # an earlier stage leaves gradients on the other's parameters
            each.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro_batches):
            with rt.skip_grad_sync(model, i < n - 1):
                with rt.autocast():
                    loss, extra = task.training_step(model, batch, stage)
                scaler.scale(loss if n == 1 else loss / n).backward()
            for key, value in {"loss": loss, **extra}.items():
                logs.setdefault(key, []).append(value.detach().float())
        if grad_clip or skip_nonfinite:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            norms[f"{task.stages[stage]}grad_norm"] = norm.detach().float()
            # The gradients are all-reduced, so every rank sees the same norm and skips alike.
            if skip_nonfinite and not torch.isfinite(norm).item():  # host sync
                skipped = True
                continue
        scaler.step(optimizer)
    scaler.update()
    means = {key: _mean_of_micro_batches(values, n) for key, values in logs.items()}
    return {**means, **norms}, skipped


def _mean_of_micro_batches(values: list[Tensor], n: int) -> Tensor:
    """A train/ scalar of one step: summed over stages, averaged over micro-batches. Without
    accumulation and with one stage, no arithmetic at all (each op costs the loop time)."""
    total = values[0] if len(values) == 1 else torch.stack(values).sum()
    return total if n == 1 else total / n
