"""The one training loop: build everything from the config, step, validate, checkpoint, test.

Read `train` top to bottom: it is the whole recipe (build, prepare, restore, fit, finish), and
`fit` the whole loop, each cadence decision a small named function; one optimizer step is in
step.py, what a validation does and the final test in validation.py. Per-family behaviour
(losses, metrics, samples) lives in the task; everything here is the same for all five
architectures.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer import checkpoint
from trainer.averaging import WeightAverage
from trainer.config import validate
from trainer.data import Batch, DataModule, DataSpec, train_batches
from trainer.distributed import Runtime, memory_format, runtime
from trainer.errors import UserError, out_of_memory_explained
from trainer.logging import Throughput, TimeEstimate, build_loggers, shown
from trainer.models.pretrained import weights_from_checkpoint
from trainer.optim import decay_groups, device_options
from trainer.run.init_from import encode_as_source, weights_from_source
from trainer.run.profiling import profiled
from trainer.run.resume import restore, save
from trainer.run.state import Run, Setup
from trainer.run.step import train_step
from trainer.run.validation import (
    check_finite,
    finish,
    format_metrics,
    monitor_of,
    sanity_check,
    validation,
)
from trainer.signals import Stopped, StopRequest
from trainer.targets import call, instantiate
from trainer.tasks import Task, check_configured_pairing, task_for

log = logging.getLogger("trainer")


def build(cfg: DictConfig, data: DataModule | None = None) -> Setup:
    """Everything for cfg; `data`, when given, instead of the data cfg.data describes."""
    validate(cfg)
    check_configured_pairing(cfg)
    rt = runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if not rt.is_main:
        rt.barrier()  # rank 0 downloads or unpacks the data first, alone
    data = data or instantiate(cfg.data, seed=cfg.seed)
    if rt.is_main:
        rt.barrier()
    if cfg.trainer.overfit_batches:
        data = data.overfit(cfg.trainer.overfit_batches, cfg.seed, rt.world)
    task, model = build_model(cfg, data.spec, rt)
    task.fit_loss_to_data(data.train, rt.device)
    return Setup(cfg, rt, data.to(rt.device), task, model)


def build_model(cfg: DictConfig, spec: DataSpec, rt: Runtime) -> tuple[Task, nn.Module]:
    """The task for cfg.model on data of this spec, and its model on rt's device."""
    task = task_for(cfg.model, spec, cfg.trainer)
    with out_of_memory_explained(lambda: "the model alone does not fit: make it smaller (its "
                                 "model.* sizes)"):
        model = task.build_model(cfg.model, spec)
        torch.manual_seed(cfg.seed + rt.rank)  # the same weights everywhere; noise differs after
        model = model.to(rt.device,
                         memory_format=memory_format(cfg.device.channels_last, rt, model))
    return task, model


def train(cfg: DictConfig, run_dir: Path | None) -> dict[str, float]:
    """Train `cfg` in `run_dir` (continuing a checkpoint when cfg.resume), test best.pt, and
    return its validation and test metrics (the test metrics are also written to metrics.json).

    In a process group every rank calls this; only rank 0 needs to know `run_dir`. A SIGTERM or
    a first Ctrl-C ends the current step, saves last.pt and raises `Stopped`.
    """
    run = ready(cfg, run_dir)
    s = run.s
    # purge_step drops what a killed run logged after its last checkpoint (step T's own scalars
    # were logged before last.pt was written, so they stay).
    if s.rt.is_main:
        run.logger = build_loggers(cfg.logger, run.run_dir, purge_step=run.progress.step + 1)
    if run.progress.step == 0:
        run.logger.config(OmegaConf.to_yaml(cfg))
    if s.rt.is_main:
        announce(run)
    with out_of_memory_explained(lambda: smaller_steps(run)):
        if run.progress.step == 0:
            sanity_check(run)
        with StopRequest() as stop:
            fit(run, stop)
        metrics = finish(run)
    s.rt.close()
    return metrics


def ready(cfg: DictConfig, run_dir: Path | None) -> Run:
    """The model, data, optimizers and the rest, built for step 0 or restored from the
    checkpoint that cfg.resume names."""
    if cfg.resume:  # its checkpoint holds every weight: pretrained ones are not read again
        with weights_from_checkpoint():
            s = build(cfg)
    else:
        s = build_fresh(cfg)
    run = prepare(s, Path(s.rt.share(str(run_dir))))
    if cfg.resume:
        restore(run, checkpoint.resume_path(cfg.resume))
    return run


def smaller_steps(run: Run) -> str:
    """What to change when a step, a validation or the test runs out of memory."""
    s = run.s
    changes = [f"lower data.batch_size={s.data.batch_size} (with trainer.accumulate=K for the "
               "same batch per step)"]
    if s.rt.precision == "32" and s.rt.device.type != "cpu":
        changes.append("set device.precision=bf16")
    if s.cfg.model.get("activation_checkpointing") is False:
        changes.append("set model.activation_checkpointing=true")
    changes.append("use a smaller model")
    # In a process group the launcher says how to resume, once every rank has stopped.
    last = run.checkpoints / "last.pt"
    kept = f"; its last.pt is kept: continue with train resume={shown(run.run_dir)} and the " \
        "changed keys" if s.rt.world == 1 and last.is_file() else ""
    return f"{', '.join(changes[:-1])}, or {changes[-1]}{kept}"


def build_fresh(cfg: DictConfig) -> Setup:
    """`build` for a run that starts at step 0, its weights initialised (before the weight
    average copies them): from the data and, with init_from, another run's."""
    if cfg.get("init_from"):
        encode_as_source(cfg)
    s = build(cfg)
    initialise(s)
    return s


def initialise(s: Setup) -> None:
    """A fresh run's weights beyond their random start: what the task fits to the training data,
    then (init_from=) another run's weights, where they fit."""
    s.task.fit_to_data(s.model, s.data.train)
    weights_from_source(s)


def prepare(s: Setup, run_dir: Path) -> Run:
    """Optimizers, schedulers and scaler for the model (sharded first under FSDP)."""
    rt, data, tc = s.rt, s.data, s.cfg.trainer
    rt.shard(s.model)
    make_optimizer = instantiate(s.cfg.optimizer)  # a partial: the parameters come next
    options = device_options(make_optimizer, rt.device)
    optimizers = [call(make_optimizer, decay_groups(entry, s.model), **options)
                  for entry in s.task.param_groups(s.model)]
    per_step = data.batch_size * rt.world * tc.accumulate
    steps_per_epoch = len(data.train) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size={data.batch_size} x {rt.world} process(es) x "
                        f"trainer.accumulate={tc.accumulate} = {per_step} samples per step, more "
                        f"than the {len(data.train)} training samples: lower data.batch_size")
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    schedulers = [call(instantiate(s.cfg.scheduler), optimizer=o, total_steps=total_steps)
                  for o in optimizers]
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "16")

    def wrap(module: nn.Module) -> nn.Module:
        wrapped = rt.wrap(module)
        return torch.compile(wrapped) if s.cfg.device.compile else wrapped

    # The average copies the bare model, before DDP's hooks and SyncBatchNorm (whose layers
    # share the model's tensors, so the average still follows them).
    average = WeightAverage(s.model, tc.ema_decay, tc.ema_every) if tc.ema_decay else None
    step_model = s.task.distribute(s.model, wrap)
    return Run(s, run_dir, optimizers, schedulers, scaler, step_model, average,
               SimpleNamespace(**OmegaConf.to_container(tc, resolve=True)), steps_per_epoch,
               total_steps)


def fit(run: Run, stop: StopRequest) -> None:
    """Step until the budget is spent, early stopping triggers, or a signal asks to stop."""
    s, progress, tc = run.s, run.progress, run.tc
    monitor, mode = monitor_of(tc.monitor, s.task)
    flops = getattr(s.model, "flops_per_item", lambda: 0.0)()  # per image, or per text token
    meter = Throughput(s.task.unit, s.rt.device, flops, s.rt.world)
    estimate = TimeEstimate(progress.step, run.total_steps)
    running: dict[str, list[Tensor]] = {}  # train/ scalars of each step since the last report
    batches: tuple[int, Iterator[Batch]] | None = None  # this epoch's, from progress.batch on
    # disable=None: only on a terminal; a redirected log (a cluster job's) keeps plain lines.
    bar = tqdm(total=run.total_steps, initial=progress.step, unit="step", dynamic_ncols=True,
               disable=None if s.rt.is_main and tc.progress else True)
    with logging_redirect_tqdm(), bar, profiled(run) as profile_step:
        while progress.step < run.total_steps:
            if batches is None or batches[0] != progress.epoch:
                order = train_batches(len(s.data.train), s.data.batch_size, s.cfg.seed,
                                      progress.epoch, s.rt.rank, s.rt.world)
                batches = (progress.epoch, s.data.train.stream(order[progress.batch:],
                                                               progress.epoch))
            fetch_start = time.perf_counter()  # streamed data: the wait for the workers
            micro_batches = [next(batches[1]) for _ in range(tc.accumulate)]
            meter.data_seconds += time.perf_counter() - fetch_start
            logs, skipped = train_step(s.task, run.step_model, run.optimizers, run.scaler,
                                       micro_batches, s.rt, tc.grad_clip, tc.skip_nonfinite > 0)
            advance(run, {} if skipped else logs, micro_batches, running, meter)
            if skipped:
                _count_skipped(run)
            bar.update()
            if s.rt.is_main:
                estimate.step(progress.step)
            profile_step()
            if progress.step % tc.log_every == 0 or progress.step == run.total_steps:
                report(run, running, meter, bar)
                running.clear()
            stopping, timed, spent = s.rt.any_rank(stop.reason is not None, _checkpoint_due(run),
                                                   _time_spent(run))
            if _validation_due(run) or spent:
                if validation(run, monitor, mode) or spent:
                    break  # early stop, or trainer.max_minutes spent
                meter.reset()  # throughput counts training only
            elif stopping or timed or _step_checkpoint_due(run):
                save(run, "last", {})
            if stopping:
                raise Stopped.at(stop.reason or "a signal to another rank", progress.step,
                                 str(run.run_dir))


def advance(run: Run, logs: dict[str, Tensor], micro_batches: list[Batch],
            running: dict[str, list[Tensor]], meter: Throughput) -> None:
    """Book one optimizer step: schedules, progress, the running sums reported at log steps."""
    progress, tc = run.progress, run.tc
    for scheduler in run.schedulers:
        scheduler.step()
    for key, value in logs.items():  # summed at the next report, one op per key
        running.setdefault(key, []).append(value)
    progress.step += 1
    if run.average:
        run.average.update(progress.step)
    progress.batch += tc.accumulate
    meter.steps += 1
    meter.samples += sum(run.s.task.count(b) for b in micro_batches) * run.s.rt.world
    if progress.batch >= run.steps_per_epoch * tc.accumulate:  # the end of an epoch
        progress.epoch, progress.batch = progress.epoch + 1, 0


def report(run: Run, running: dict[str, list[Tensor]], meter: Throughput, bar: tqdm) -> None:
    """train/ and perf/ scalars: the mean over all ranks' steps since the last report."""
    rt, progress = run.s.rt, run.progress
    steps = len(running.get("loss", []))  # skipped steps add no loss
    sums = rt.sum_across_ranks({k: torch.stack(v).sum() for k, v in running.items()}) \
        if running else {}  # empty when every step since the last report was skipped
    metrics = {f"train/{k}": v / (max(steps, 1) * rt.world) for k, v in sums.items()}
    if "train/loss" in metrics:  # absent when every step since the last report was skipped
        check_finite(metrics["train/loss"], progress.step, run.s.cfg, run.run_dir)
    metrics["train/lr"] = run.optimizers[-1].param_groups[0]["lr"]
    if run.tc.skip_nonfinite:
        metrics["train/skipped_steps"] = progress.skipped
    run.logger.scalars({**metrics, **meter.report()}, progress.step)
    # refresh=False: drawn at the bar's next tick rather than now (a redraw costs half a ms)
    bar.set_postfix(loss=f"{metrics.get('train/loss', math.nan):.4f}", refresh=False)
    log.info("step %d/%d epoch %d | %s", progress.step, run.total_steps, progress.epoch,
             format_metrics(metrics))


def _count_skipped(run: Run) -> None:
    """trainer.skip_nonfinite: a few non-finite steps are skipped; more end the run."""
    run.progress.skipped += 1
    allowed = run.tc.skip_nonfinite
    log.warning("step %d: the gradient norm is not finite; step skipped (%d of %d allowed)",
                run.progress.step, run.progress.skipped, allowed)
    if run.progress.skipped > allowed:
        raise UserError(f"{run.progress.skipped} steps had a non-finite loss or gradient, more "
                        f"than trainer.skip_nonfinite={allowed}: training diverged. Lower "
                        f"optimizer.lr (now {run.s.cfg.optimizer.lr}) or set trainer.grad_clip; "
                        f"checkpoints saved so far are kept in {run.checkpoints}")


def _validation_due(run: Run) -> bool:
    progress, tc = run.progress, run.tc
    if progress.step == run.total_steps:
        return True
    if tc.val_every:
        return progress.step % tc.val_every == 0
    return progress.batch == 0 and progress.epoch % run.epochs_per_validation == 0


def _time_spent(run: Run) -> bool:
    """trainer.max_minutes of training wall time, summed over resumes (rank 0's clock)."""
    minutes = run.tc.max_minutes
    if not (minutes and run.s.rt.is_main and run.seconds >= 60 * minutes):
        return False
    log.info("trainer.max_minutes=%g spent at step %d of %d: training ends here (continue it "
             "with train resume=%s trainer.max_minutes=MORE)", minutes, run.progress.step,
             run.total_steps, shown(run.run_dir))
    return True


def _step_checkpoint_due(run: Run) -> bool:
    every = run.tc.checkpoint_every
    return bool(every) and run.progress.step % every == 0


def _checkpoint_due(run: Run) -> bool:
    """trainer.checkpoint_minutes of wall time since last.pt was written (rank 0's clock)."""
    minutes = run.tc.checkpoint_minutes
    return bool(minutes) and run.s.rt.is_main and \
        time.monotonic() - run.saved_at >= 60 * minutes


def announce(run: Run) -> None:
    """Three lines before the first step: where and for how long, what trains on what, on which
    device."""
    s, rt, tc, spec = run.s, run.s.rt, run.tc, run.s.data.spec
    per_step = s.data.batch_size * rt.world * tc.accumulate
    batch = f"{per_step} images" if spec.kind == "image" else \
        f"{per_step} x {spec.block_size} tokens"
    log.info("run %s: %s steps of %s, %s per epoch%s", shown(run.run_dir),
             f"{run.total_steps:,}", batch, f"{run.steps_per_epoch:,}",
             f", continuing from step {run.progress.step:,}" if run.progress.step else "")
    weights = list(s.model.parameters())
    total = sum(w.numel() for w in weights)
    frozen = total - sum(w.numel() for w in weights if w.requires_grad)
    log.info("model=%s: %s parameters%s%s | %s: %s", type(s.model).__name__.lower(),
             f"{total:,}", f" ({frozen:,} frozen)" if frozen else "", _parts(s.model),
             spec.name, s.data.describe())
    log.info("device=%s, %d process%s, precision %s%s%s", rt.device.type, rt.world,
             "es" if rt.world > 1 else "", rt.precision,
             f" ({rt.precision_chosen})" if rt.precision_chosen != "set" else "",
             ", compiled" if s.cfg.device.compile else "")
    if s.task.note:
        log.info(s.task.note)
    if tc.overfit_batches:
        log.info("trainer.overfit_batches=%d: training and validating on the same %s samples, "
                 "which a sound model fits (the test metrics mean little)",
                 tc.overfit_batches, f"{len(s.data.train):,}")


def _parts(model: torch.nn.Module) -> str:
    """Where the parameters are: each top-level part's count, as Lightning's model summary."""
    counts = [(name, sum(w.numel() for w in part.parameters()))
              for name, part in model.named_children()]
    counts = [(name, count) for name, count in counts if count]
    return f" in {', '.join(f'{name} {count:,}' for name, count in counts)}" \
        if len(counts) > 1 else ""
