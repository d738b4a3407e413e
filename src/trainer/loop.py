"""The one training loop: build everything from the config, step, validate, checkpoint, test.

Read `train` top to bottom: it is the whole recipe. Per-family behaviour (losses, metrics,
samples) lives in the task; everything here is the same for all five architectures.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer import checkpoint
from trainer.config import call, instantiate, validate
from trainer.data import Batch, DataModule, Split, eval_batches, train_batches
from trainer.distributed import Runtime, runtime
from trainer.errors import UserError
from trainer.logging import NullLogger, Throughput
from trainer.sweep import higher_is_better
from trainer.tasks import Task, task_for

log = logging.getLogger("trainer")


@dataclass
class Progress:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    best: float | None = None  # best value of the monitored metric so far
    stale: int = 0  # validations since it last improved (early stopping)


@dataclass
class Setup:
    """Everything built from a config: what `train` and `evaluate` share."""

    cfg: DictConfig
    rt: Runtime
    data: DataModule
    task: Task
    model: nn.Module


def build(cfg: DictConfig) -> Setup:
    validate(cfg)
    rt = runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if not rt.is_main:
        rt.barrier()  # rank 0 downloads or unpacks the data first, alone
    data = instantiate(cfg.data, seed=cfg.seed)
    if rt.is_main:
        rt.barrier()
    task = task_for(cfg.model, data.spec)
    model = task.build_model(cfg.model, data.spec)
    torch.manual_seed(cfg.seed + rt.rank)  # the same weights everywhere; per-rank noise after
    return Setup(cfg, rt, data.to(rt.device), task, model.to(rt.device))


def train(cfg: DictConfig, run_dir: Path | None) -> dict[str, float]:
    """Train `cfg` in `run_dir` (continuing its last.pt when cfg.resume), test best.pt, and
    return its validation and test metrics (the test metrics are also written to metrics.json).

    In a process group every rank calls this; only rank 0 needs to know `run_dir`.
    """
    s = build(cfg)
    rt, data, task, model, tc = s.rt, s.data, s.task, s.model, cfg.trainer
    run_dir = Path(rt.share(str(run_dir)))
    rt.shard(model)
    optimizers = [call(instantiate(cfg.optimizer), params) for params in task.param_groups(model)]
    per_step = data.batch_size * rt.world * tc.accumulate
    steps_per_epoch = len(data.train) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size={data.batch_size} x {rt.world} process(es) x "
                        f"trainer.accumulate={tc.accumulate} = {per_step} samples per step, more "
                        f"than the {len(data.train)} training samples: lower data.batch_size")
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    schedulers = [call(instantiate(cfg.scheduler), optimizer=o, total_steps=total_steps)
                  for o in optimizers]
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "16")
    checkpoints = run_dir / "checkpoints"
    progress = Progress()
    if cfg.resume:
        source = Path(cfg.resume) / "checkpoints" / "last.pt"
        state = checkpoint.load(source)  # on the CPU: load_state_dict moves what it needs
        with checkpoint.reported_as_mismatch(source):
            rt.load_model_state(model, state["model"])
            for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
                rt.load_optimizer_state(model, optimizer, saved)
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if state["scaler"]:  # empty when the run was not in 16-bit precision
            scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        rng = state["rng"]  # one state per rank; a different world size reuses them in turn
        checkpoint.set_rng_state(rng[rt.rank % len(rng)], rt.device)
        log.info("resumed from %s at step %d", source, progress.step)

    def save(name: str, metrics: dict[str, float]) -> None:
        # Every rank takes part: under FSDP gathering the full state is a collective.
        model_state = rt.model_state(model)
        optimizer_states = [rt.optimizer_state(model, o) for o in optimizers]
        rng = rt.gather(checkpoint.rng_state(rt.device))
        if rt.is_main:
            checkpoint.save(checkpoints / f"{name}.pt", {
                "model": model_state,
                "optimizers": optimizer_states,
                "schedulers": [s.state_dict() for s in schedulers],
                "scaler": scaler.state_dict(),
                "progress": asdict(progress),
                "rng": rng,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "metrics": metrics,
            })

    # purge_step drops what a killed run logged after its last checkpoint (step T's own scalars
    # were logged before last.pt was written, so they stay).
    logger = instantiate(cfg.logger, run_dir=run_dir, purge_step=progress.step + 1) \
        if rt.is_main else NullLogger()
    if progress.step == 0:
        logger.config(OmegaConf.to_yaml(cfg))
    def prepare(module: nn.Module) -> nn.Module:  # what the training step calls
        wrapped = rt.wrap(module)
        return torch.compile(wrapped) if cfg.device.compile else wrapped

    step_model = task.distribute(model, prepare)
    monitor, mode = _monitor(tc.monitor, task)
    flops = getattr(model, "flops_per_item", lambda: 0.0)()  # per image, or per token of text
    meter = Throughput(task.unit, rt.device, flops, rt.world)
    running: dict[str, Tensor] = {}  # train/ scalars summed on the device between reports
    running_steps = 0
    batches: tuple[int, Iterator[Batch]] | None = None  # this epoch's, from progress.batch on
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True,
               disable=not (rt.is_main and tc.progress))
    with logging_redirect_tqdm(), bar:
        while progress.step < total_steps:
            if batches is None or batches[0] != progress.epoch:
                order = train_batches(len(data.train), data.batch_size, cfg.seed, progress.epoch,
                                      rt.rank, rt.world)
                batches = (progress.epoch, data.train.stream(order[progress.batch:],
                                                             progress.epoch))
            fetch_start = time.perf_counter()  # streamed data: the wait for the workers
            micro_batches = [next(batches[1]) for _ in range(tc.accumulate)]
            meter.data_seconds += time.perf_counter() - fetch_start

            logs = train_step(task, step_model, optimizers, scaler, micro_batches, rt,
                              tc.grad_clip)
            for scheduler in schedulers:
                scheduler.step()
            for key, value in logs.items():
                running[key] = running.get(key, 0.0) + value
            running_steps += 1
            progress.step += 1
            progress.batch += tc.accumulate
            meter.steps += 1
            meter.samples += sum(task.count(b) for b in micro_batches) * rt.world
            bar.update()
            end_of_epoch = progress.batch >= steps_per_epoch * tc.accumulate
            if end_of_epoch:
                progress.epoch, progress.batch = progress.epoch + 1, 0
            last = progress.step == total_steps

            if progress.step % tc.log_every == 0 or last:
                sums = rt.sum_across_ranks(running)  # the mean over all ranks' batches
                train_metrics = {f"train/{k}": v / (running_steps * rt.world)
                                 for k, v in sums.items()}
                _check_finite(train_metrics["train/loss"], progress.step, cfg, run_dir)
                train_metrics["train/lr"] = optimizers[-1].param_groups[0]["lr"]
                logger.scalars({**train_metrics, **meter.report()}, progress.step)
                bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}")
                log.info("step %d/%d epoch %d | %s", progress.step, total_steps, progress.epoch,
                         _fmt(train_metrics))
                running, running_steps = {}, 0

            due = progress.step % tc.val_every == 0 if tc.val_every else end_of_epoch
            if due or last:
                val = evaluate_split(s, data.val, tc.eval_batches, prefix="val")
                _check_finite(val["val/loss"], progress.step, cfg, run_dir)
                logger.scalars(val, progress.step)
                model.eval()  # every rank samples (FSDP needs them all); only rank 0 logs
                task.show(model, data.val, logger, progress.step)
                model.train()
                improved = _improved(val, monitor, mode, progress)
                save("last", val)
                if improved:
                    save("best", val)
                log.info("step %d validation | %s%s", progress.step, _fmt(val),
                         " (best)" if improved and monitor else "")
                if tc.patience and progress.stale >= tc.patience:
                    log.info("early stop: %s did not improve in %d validations", monitor,
                             tc.patience)
                    break
                meter.reset()  # throughput counts training only
            elif tc.checkpoint_every and progress.step % tc.checkpoint_every == 0:
                save("last", {})

    rt.barrier()  # rank 0 has written best.pt
    test, best_val = test_checkpoint(s, checkpoints / "best.pt")
    if rt.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(test, indent=2) + "\n")
        logger.scalars(test, progress.step)
        logger.hparams(_hparams(cfg), test)
    logger.close()
    log.info("test | %s", _fmt(test))
    return {**best_val, **test}


def train_step(task: Task, model: Any, optimizers: list[torch.optim.Optimizer],
               scaler: torch.amp.GradScaler, micro_batches: list[tuple[Tensor, Tensor]],
               rt: Runtime, grad_clip: float) -> dict[str, Tensor]:
    """One optimizer step per optimizer, each over all micro-batches. No host sync."""
    logs: dict[str, Tensor] = {}
    total = torch.zeros((), device=rt.device)
    for stage, optimizer in enumerate(optimizers):
        for each in optimizers:  # an earlier stage leaves gradients on the other's parameters
            each.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro_batches):
            with rt.skip_grad_sync(model, i < len(micro_batches) - 1):
                with rt.autocast():
                    loss, extra = task.training_step(model, batch, stage)
                scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().float() / len(micro_batches)
            for key, value in extra.items():
                logs[key] = logs.get(key, 0.0) + value.detach().float() / len(micro_batches)
        if grad_clip:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
    scaler.update()
    return {"loss": total, **logs}


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


def _monitor(name: str | None, task: Task) -> tuple[str | None, str]:
    if name is None:
        return task.monitor or (None, "min")
    return name, "max" if higher_is_better(name) else "min"


def _improved(metrics: dict[str, float], monitor: str | None, mode: str,
              progress: Progress) -> bool:
    """Track the best monitored value; without a monitor every validation is the best."""
    if monitor is None:
        return True
    if monitor not in metrics:
        raise UserError(f"trainer.monitor={monitor!r} is not a validation metric of this task; "
                        f"choose one of {', '.join(sorted(metrics))}")
    value = metrics[monitor]
    better = progress.best is None or (value > progress.best if mode == "max"
                                       else value < progress.best)
    if better:
        progress.best, progress.stale = value, 0
    else:
        progress.stale += 1
    return better


def _check_finite(loss: float, step: int, cfg: DictConfig, run_dir: Path) -> None:
    if not math.isfinite(loss):
        raise UserError(f"the loss is {loss} at step {step}: training diverged. Lower "
                        f"optimizer.lr (now {cfg.optimizer.lr}) or set trainer.grad_clip; "
                        f"checkpoints saved so far are kept in {run_dir / 'checkpoints'}")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to dotted keys with TensorBoard-friendly values."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not str(key).startswith("_"):
                    walk(value, f"{prefix}{key}.")
        else:
            value = node if isinstance(node, (int, float, str, bool)) else str(node)
            flat[prefix[:-1]] = value

    container = OmegaConf.to_container(cfg, resolve=True)
    for group in ("model", "data", "optimizer", "scheduler", "trainer", "device"):
        walk(container[group], f"{group}.")
    flat["model"] = cfg.model._target_.rsplit(".", 1)[-1].lower()
    flat["seed"] = cfg.seed
    return flat
