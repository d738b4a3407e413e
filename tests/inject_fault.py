"""Train in a process that kills itself with SIGKILL at a chosen point: for the fault tests.

`train_and_die(point, n, config, run_dir)` runs the training loop with `point`, where the process
dies on the nth time it gets there:
- step: inside a training step, after the forward pass, before the optimizer steps;
- validation: inside a validation, after its first batch;
- write: inside a checkpoint write, with half the file on disk.

A SIGKILL cannot be caught, so the run keeps only what it had written before: what a kill -9, the
out-of-memory killer or a lost node leaves. It goes to the run's process group, its data-loading
workers too, as on a lost node.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.run import loop, validation


def die() -> None:
    """SIGKILL to the run's process group: the training process and its data-loading workers
    (killed alone, a worker was left waiting for its parent for ever)."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def dying_step(real: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
    forward = task.training_step

    def forward_then_die(*inner: Any, **inner_kwargs: Any) -> Any:
        forward(*inner, **inner_kwargs)
        die()

    task.training_step = forward_then_die
    return real(task, *args, **kwargs)


class DyingSplit:
    """A split whose evaluation stream dies after its first batch."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __getattr__(self, name: str) -> Any:
        return getattr(self.split, name)

    def __len__(self) -> int:
        return len(self.split)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        yield next(iter(self.split.stream(*args, **kwargs)))
        die()


def dying_validation(real: Any, s: Any, split: Any, *args: Any, **kwargs: Any) -> Any:
    return real(s, DyingSplit(split), *args, **kwargs)


def dying_write(real: Any, state: Any, file: Any) -> None:
    buffer = io.BytesIO()
    real(state, buffer)
    file.write(buffer.getvalue()[: buffer.tell() // 2])
    file.flush()
    os.fsync(file.fileno())
    die()


TARGETS = {"step": (loop, "train_step", dying_step),
           "validation": (validation, "evaluate_split", dying_validation),
           "write": (torch, "save", dying_write)}


def train_and_die(point: str, n: int, config: dict, run_dir: str, start_method: str) -> None:
    """Run in a child process: train `config` in `run_dir`, dying at the nth `point`. Its
    data-loading workers start by `start_method`, as in the test's process (a child of a fork
    server would start them through a fork server of its own, each importing torch anew)."""
    os.setpgrp()  # a group of its own, which die() kills: never the test's
    multiprocessing.set_start_method(start_method, force=True)
    module, name, dying = TARGETS[point]
    real, calls = getattr(module, name), []

    def nth_call_dies(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return dying(real, *args, **kwargs) if len(calls) == n else real(*args, **kwargs)

    setattr(module, name, nth_call_dies)
    loop.train(OmegaConf.create(config), Path(run_dir))
