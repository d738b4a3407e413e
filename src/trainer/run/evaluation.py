"""Measuring a model on a split: what validation, the final test and `evaluate` share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainer import checkpoint
from trainer.data import Split, eval_batches
from trainer.logging import progress_bar

if TYPE_CHECKING:
    from trainer.run.state import Setup


def evaluate_split(s: Setup, split: Split, max_batches: int | None = None,
                   prefix: str = "test") -> dict[str, float]:
    """The task's metrics over a split (every sample once across ranks), as `prefix/name`."""
    return _prefixed(s.task.metrics(summed_totals(s, split, max_batches, prefix)), prefix)


@torch.no_grad()
def summed_totals(s: Setup, split: Split, max_batches: int | None = None,
                  name: str = "test") -> dict[str, Any]:
    """The task's eval_step totals over a split, every sample once, added up across ranks; a
    progress bar on a terminal when it takes a while (a large test split)."""
    s.model.eval()
    totals: dict[str, Tensor] = {}
    n = len(split)
    if max_batches:  # a cap on global batches, so every world size scores the same samples
        n = min(n, max_batches * s.data.batch_size * s.rt.world)
    batches = eval_batches(n, s.data.batch_size, s.rt.rank, s.rt.world)
    shown = s.rt.is_main and s.cfg.trainer.get("progress", True)
    with progress_bar(len(batches), "batch", f"{name} split", shown) as bar:
        for batch in split.stream(batches, 0):
            with s.rt.autocast():
                sums = s.task.eval_step(s.model, batch)
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value.float()
            bar.update()
    s.model.train()
    return s.rt.sum_across_ranks(totals)


def test_checkpoint(s: Setup, path: Path, state: dict[str, Any] | None = None,
                    split: str = "test", max_batches: int | None = None
                    ) -> tuple[dict[str, float], dict[str, float], str | None]:
    """Load a checkpoint's weights into the model and measure the test split (or `split`, val,
    up to `max_batches`): its metrics, the validation metrics saved with the checkpoint, and the
    task's report (a classifier's table of classes). `state` is the checkpoint at `path` if
    already loaded."""
    state = state or checkpoint.load(path)
    with checkpoint.reported_as_mismatch(path):
        s.rt.load_model_state(s.model, state["model"])
    totals = summed_totals(s, getattr(s.data, split), max_batches, split)
    return (_prefixed(s.task.metrics(totals), split), state["metrics"],
            s.task.report(totals, s.data.spec))


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in metrics.items()}
