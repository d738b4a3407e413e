"""Measuring a model on a split: what validation, the final test and `evaluate` share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainer import checkpoint
from trainer.data import Split, eval_batches

if TYPE_CHECKING:
    from trainer.loop import Setup


@torch.no_grad()
def evaluate_split(s: Setup, split: Split, max_batches: int | None = None,
                   prefix: str = "test") -> dict[str, float]:
    """The task's metrics over a split (every sample once across ranks), as `prefix/name`."""
    s.model.eval()
    totals: dict[str, Tensor] = {}
    n = len(split)
    if max_batches:  # a cap on global batches, so every world size scores the same samples
        n = min(n, max_batches * s.data.batch_size * s.rt.world)
    for batch in split.stream(eval_batches(n, s.data.batch_size, s.rt.rank, s.rt.world), 0):
        with s.rt.autocast():
            sums = s.task.eval_step(s.model, batch)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value.float()
    s.model.train()
    metrics = s.task.metrics(s.rt.sum_across_ranks(totals))
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def test_checkpoint(s: Setup, path: Path, state: dict[str, Any] | None = None
                    ) -> tuple[dict[str, float], dict[str, float]]:
    """Load a checkpoint's weights into the model and measure the test split; also return the
    validation metrics saved with it. `state` is the checkpoint at `path` if already loaded."""
    state = state or checkpoint.load(path)
    with checkpoint.reported_as_mismatch(path):
        s.rt.load_model_state(s.model, state["model"])
    return evaluate_split(s, s.data.test), state["metrics"]
