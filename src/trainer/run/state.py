"""What a training run holds: `Setup` (everything built from a config) and `Run` (what the loop
steps, the checkpoints save and restore), with `Progress`, where the loop is.

They live at the bottom of the run's layer so that the loop and each helper that takes them
(resume, validation, evaluation, profiling, init_from) import this module, never the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from trainer.averaging import WeightAverage
from trainer.data import DataModule
from trainer.distributed import Runtime
from trainer.logging import Loggers
from trainer.tasks import Task


@dataclass
class Setup:
    """Everything built from a config: what `train` and `evaluate` share."""

    cfg: DictConfig
    rt: Runtime
    data: DataModule
    task: Task
    model: nn.Module


@dataclass
class Progress:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    best: float | None = None  # best value of the monitored metric so far
    stale: int = 0  # validations since it last improved by more than min_delta
    counted: float | None = None  # the value of that improvement (None: the best, runs before it)
    skipped: int = 0  # steps skipped for a non-finite gradient (trainer.skip_nonfinite)
    kept_best: list[list[float]] = field(default_factory=list)  # [value, step] of best-step-*.pt


@dataclass
class Run:
    """What a training run holds while it goes: what `fit` steps, `save` writes, `restore` fills."""

    s: Setup
    run_dir: Path
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    scaler: torch.amp.GradScaler
    step_model: Any  # what the training step calls: the model, wrapped for DDP and compile
    average: WeightAverage | None  # trainer.ema_decay: the weights validation measures
    tc: SimpleNamespace  # cfg.trainer as plain attributes: a config lookup costs microseconds
    steps_per_epoch: int
    total_steps: int
    progress: Progress = field(default_factory=Progress)
    logger: Any = field(default_factory=Loggers)
    saved_at: float = field(default_factory=time.monotonic)  # when last.pt was last written
    started_at: float = field(default_factory=time.monotonic)  # when this process's part began
    earlier_seconds: float = 0.0  # the time a resumed run had trained before (its checkpoint's)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def measured(self) -> nn.Module:
        """What validation measures and the checkpoints hand on as their model."""
        return self.average.model if self.average else self.s.model

    @property
    def seconds(self) -> float:
        """Wall time the run has trained, over every process that continued it."""
        return self.earlier_seconds + time.monotonic() - self.started_at

    @property
    def epochs_per_validation(self) -> int:
        """Without val_every, validate every epoch, or every few when the run has more epochs
        than trainer.max_validations (tiny epochs: each validation would cost more than them)."""
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        return max(1, math.ceil(epochs / (self.tc.max_validations or epochs)))
