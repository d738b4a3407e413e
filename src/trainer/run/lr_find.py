"""`train lr_find=true`: the learning-rate range test (Smith, 2017; fastai's and Lightning's
lr_find). The run's own model, data, optimizer and precision take up to 100 steps at learning
rates rising geometrically from 1e-7 to 1; the loss, smoothed, falls, flattens and climbs. The
suggestion is where it fell fastest: a rate the model learns at, well short of where it diverges.

Nothing is saved but the curve (lr_find.csv) and the log: the range test trains the model to
ruin on purpose.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig

from trainer.data import Batch, configured_kind, train_batches
from trainer.errors import UserError, out_of_memory_explained
from trainer.logging import shown
from trainer.run.loop import build_fresh, prepare, smaller_steps
from trainer.run.state import Run, Setup
from trainer.run.step import train_step
from trainer.tables import aligned
from trainer.tasks import task_class

log = logging.getLogger("trainer")

MIN_LR, MAX_LR, STEPS = 1e-7, 1.0, 100
SMOOTHING = 0.98  # the loss is averaged exponentially over the last ~50 steps, bias-corrected
DIVERGED = 4.0  # the test ends once the smoothed loss is this many times its lowest
SKIP = 10  # the first steps' slope is the smoothing settling, not learning
SPAN = 5  # the slope at a step is taken over this many steps either side: the loss is noisy
SHOWN = 20  # rows of the table in the log


def find_lr(cfg: DictConfig, run_dir: Path, command: list[str]) -> dict[str, float]:
    """Run the range test for cfg, write run_dir/lr_find.csv, log the curve and the suggested
    optimizer.lr with the train command (`command`, the user's overrides) that uses it."""
    model_class = get_class(cfg.model._target_)
    kind = configured_kind(cfg.data)  # known before the data is read, but for a Hugging Face set
    task = task_class(model_class, kind) if kind else None
    if task:
        _check_one_loss(model_class, len(task.stages))
    s = build_fresh(cfg)
    run = prepare(s, run_dir)
    _check_one_loss(model_class, len(run.optimizers))
    with out_of_memory_explained(lambda: smaller_steps(run)):
        lrs, losses = range_test(run, _batches(s))
    suggested = steepest(lrs, losses)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "lr_find.csv", "w", newline="") as file:
            csv.writer(file).writerows([("lr", "smoothed_loss"), *zip(lrs, losses, strict=True)])
    except OSError as error:  # the suggestion below still stands
        log.warning("could not write %s (%s)", run_dir / "lr_find.csv", error.strerror or error)
    lowest = min(range(len(losses)), key=losses.__getitem__)
    log.info("lr_find: %d steps from lr %.0e to %.1e (%s); the smoothed loss was lowest, %.4g, "
             "at %.2e\n%s", len(lrs), lrs[0], lrs[-1],
             "stopped as the loss diverged" if len(lrs) < STEPS else "the whole range",
             losses[lowest], lrs[lowest], curve_table(lrs, losses, suggested))
    log.info("suggested optimizer.lr=%.2e, where the loss fell fastest (the curve is in %s); "
             "train with it:\n  train %s", lrs[suggested], shown(run_dir / "lr_find.csv"),
             " ".join([*command, f"optimizer.lr={lrs[suggested]:.2e}"]))
    return {"lr_find/suggested_lr": lrs[suggested]}


def _check_one_loss(model_class: type, optimizers: int) -> None:
    if optimizers > 1:
        raise UserError(f"lr_find=true needs one loss to minimise; "
                        f"model={model_class.__name__.lower()} trains two networks against each "
                        "other, whose losses do not fall together: choose optimizer.lr by a "
                        "sweep instead")


def _batches(s: Setup) -> Iterator[Batch]:
    """Training batches in the run's order, epoch after epoch."""
    for epoch in itertools.count():
        order = train_batches(len(s.data.train), s.data.batch_size, s.cfg.seed, epoch, 0, 1)
        yield from s.data.train.stream(order, epoch)


def range_test(run: Run, batches: Iterator[Batch]) -> tuple[list[float], list[float]]:
    """The learning rate of each step and the smoothed loss after it, up to STEPS steps or
    until the loss diverges."""
    s, tc = run.s, run.tc
    lrs: list[float] = []
    losses: list[float] = []
    average = 0.0
    for i in range(STEPS):
        lr = MIN_LR * (MAX_LR / MIN_LR) ** (i / (STEPS - 1))
        for group in run.optimizers[0].param_groups:
            group["lr"] = lr
        micro_batches = [next(batches) for _ in range(tc.accumulate)]
        logs, _ = train_step(s.task, run.step_model, run.optimizers, run.scaler, micro_batches,
                             s.rt, tc.grad_clip)
        loss = logs["loss"].item()  # a host sync a step: the test needs each loss at once
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        lrs.append(lr)
        losses.append(average / (1 - SMOOTHING ** (i + 1)))
        if losses[-1] > DIVERGED * min(losses):
            break
    if len(losses) <= SKIP + SPAN:
        raise UserError(f"lr_find: the loss diverged after {len(losses)} steps, at lr {lr:.1e}: "
                        "too few to find a slope; the model diverges at any learning rate, so "
                        "look at its inputs and its loss")
    return lrs, losses


def steepest(lrs: list[float], losses: list[float]) -> int:
    """The step where the smoothed loss fell fastest per decade of learning rate, over SPAN
    steps either side, leaving out the first SKIP steps (the smoothing settling)."""
    slopes = {i: (losses[i + SPAN] - losses[i - SPAN]) / math.log10(lrs[i + SPAN] / lrs[i - SPAN])
              for i in range(SKIP, len(losses) - SPAN)}
    return min(slopes, key=slopes.__getitem__)


def curve_table(lrs: list[float], losses: list[float], suggested: int) -> str:
    """SHOWN steps of the curve, evenly spaced, as rows with a bar for the loss from its lowest
    to its highest before the suggestion (a longer one, the divergence, ends in "+"); the
    suggested step is always one of them, marked."""
    steps = sorted({round(i * (len(lrs) - 1) / (SHOWN - 1)) for i in range(SHOWN)} | {suggested})
    low, high = min(losses), max(losses[:suggested + 1])
    rows = [["lr", "loss", ""]]
    for i in steps:
        length = 1 + round(39 * (losses[i] - low) / ((high - low) or 1))
        bar = "#" * min(length, 40) + ("+" if length > 40 else "")
        rows.append([f"{lrs[i]:.1e}", f"{losses[i]:#.4g}",
                     bar + ("  <- suggested" if i == suggested else "")])
    return aligned(rows, right={1})
