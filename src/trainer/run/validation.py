"""Validation while training: the sanity check before the first step, each validation (samples,
best.pt and its kept copies, last.pt, early stopping) and the test of best.pt at the end."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from trainer import checkpoint
from trainer.errors import UserError
from trainer.logging import duration, hparams_of, shown
from trainer.run.evaluation import evaluate_split, test_checkpoint
from trainer.run.resume import keep_best, save
from trainer.run.state import Progress
from trainer.run.sweep import higher_is_better

if TYPE_CHECKING:
    from trainer.run.state import Run
    from trainer.tasks import Task

log = logging.getLogger("trainer")


def sanity_check(run: Run) -> None:
    """Two validation batches before the first step, as Lightning does: a validation that
    fails, or a trainer.monitor that names none of its metrics, stops the run now rather than
    after an epoch of training. It draws from no random generator the training uses."""
    val = evaluate_split(replace(run.s, model=run.measured), run.s.data.val, 2, prefix="val")
    _check_monitor(val, monitor_of(run.tc.monitor, run.s.task)[0])


def validation(run: Run, monitor: str | None, mode: str) -> bool:
    """Measure the validation split, show samples, save last.pt (and best.pt when it improved).
    Returns whether early stopping ends the run."""
    s, progress, tc = run.s, run.progress, run.tc
    measured = run.measured
    val = evaluate_split(replace(s, model=measured), s.data.val, tc.eval_batches, prefix="val")
    check_finite(val["val/loss"], progress.step, s.cfg, run.run_dir)
    run.logger.scalars(val, progress.step)
    measured.eval()  # every rank samples (FSDP needs them all); only rank 0 logs
    s.task.show(measured, s.data.val, run.logger, progress.step)
    measured.train()
    improved = _improved(val, monitor, mode, progress, tc.min_delta)
    if improved:  # best.pt first: a run killed between the two writes redoes this validation
        save(run, "best", val)
    keep_best(run, val[monitor] if monitor else None, mode == "max", improved, val)
    save(run, "last", val)
    log.info("step %d validation | %s%s", progress.step, format_metrics(val),
             " (best)" if improved and monitor else "")
    if tc.patience and progress.stale >= tc.patience:
        log.info("early stop: %s did not improve in %d validations", monitor, tc.patience)
        return True
    return False


def finish(run: Run) -> dict[str, float]:
    """Test best.pt; write metrics.json and the hparams entry."""
    rt = run.s.rt
    rt.barrier()  # rank 0 has written best.pt
    best = checkpoint.load(run.checkpoints / "best.pt")
    test, best_val, report = test_checkpoint(run.s, run.checkpoints / "best.pt", best)
    if rt.is_main:
        (run.run_dir / "metrics.json").write_text(json.dumps(test, indent=2) + "\n")
        run.logger.scalars(test, run.progress.step)
        if report:
            run.logger.text("test/per_class", report, run.progress.step)
        run.logger.hparams(hparams_of(run.s.cfg), test)
    run.logger.close()
    monitor, _ = monitor_of(run.tc.monitor, run.s.task)
    chosen_by = f", {monitor}={best_val[monitor]:.4g}" if monitor in best_val else ""
    log.info("test of best.pt (step %d%s) | %s%s", best["progress"]["step"], chosen_by,
             format_metrics(test), f"\n{report}" if report else "")
    if rt.is_main:
        log.info("done after %s of training; to use the run:\n  %s", duration(run.seconds),
                 "\n  ".join(next_commands(run)))
    return {**best_val, **test}


def next_commands(run: Run) -> list[str]:
    """The commands that use a finished run, spelled out for this one."""
    where = str(shown(run.run_dir))
    commands = [run.s.task.use_command.replace("RUN", where), f"evaluate run_dir={where}",
                f"export-model run_dir={where}"]
    if (run.run_dir / "tensorboard").is_dir():
        commands.append(f"tensorboard --logdir {where}")
    return commands


def monitor_of(name: str | None, task: Task) -> tuple[str | None, str]:
    """The metric best.pt follows (trainer.monitor, else the task's own; None: the latest)
    and whether higher ("max") or lower ("min") is better."""
    if name is None:
        return task.monitor or (None, "min")
    return name, "max" if higher_is_better(name) else "min"


def _improved(metrics: dict[str, float], monitor: str | None, mode: str,
              progress: Progress, min_delta: float = 0.0) -> bool:
    """Track the best monitored value, and the validations since it last improved by more than
    min_delta (early stopping); without a monitor every validation is the best."""
    if monitor is None:
        return True
    _check_monitor(metrics, monitor)
    value = metrics[monitor]
    sign = 1 if mode == "max" else -1
    # Early stopping measures from the last value that counted (the best, when min_delta is 0).
    counted = progress.best if progress.counted is None else progress.counted
    if counted is None or sign * (value - counted) > min_delta:
        progress.counted, progress.stale = value, 0
    else:
        progress.stale += 1
    better = progress.best is None or sign * (value - progress.best) > 0
    if better:
        progress.best = value
    return better


def _check_monitor(metrics: dict[str, float], monitor: str | None) -> None:
    if monitor is not None and monitor not in metrics:
        raise UserError(f"trainer.monitor={monitor!r} is not a validation metric of this task; "
                        f"choose one of {', '.join(sorted(metrics))}")


def check_finite(loss: float, step: int, cfg: DictConfig, run_dir: Path) -> None:
    if not math.isfinite(loss):
        raise UserError(f"the loss is {loss} at step {step}: training diverged. Lower "
                        f"optimizer.lr (now {cfg.optimizer.lr}) or set trainer.grad_clip; "
                        f"checkpoints saved so far are kept in {run_dir / 'checkpoints'}")


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
