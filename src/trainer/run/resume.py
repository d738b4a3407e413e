"""A run's whole state to and from its checkpoints: weights (and their average), optimizer and
scheduler states, scaler, progress, every rank's random generators, the config and what the data
meant. Resuming from what `save` wrote continues the run bit for bit."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from trainer import checkpoint
from trainer.data import spec_record
from trainer.optim import flat, regrouped
from trainer.run.state import Progress, Run

log = logging.getLogger("trainer")


def save(run: Run, name: str, metrics: dict[str, float]) -> None:
    """Write checkpoints/<name>.pt; last.pt also keeps trainer.keep_last step-NNNNNN.pt copies.
    Every rank takes part: under FSDP gathering the full state is a collective."""
    rt, model = run.s.rt, run.s.model
    # `model` holds what validation measured (the weight average, when there is one): the
    # weights evaluate, predict and export use. The trained weights then go beside it.
    model_state = rt.model_state(run.measured)
    trained = {"training_model": rt.model_state(model)} if run.average else {}
    optimizer_states = [rt.optimizer_state(model, o) for o in run.optimizers]
    rng = rt.gather(checkpoint.rng_state(rt.device))
    if rt.is_main:
        path = run.checkpoints / f"{name}.pt"
        checkpoint.save(path, {
            "model": model_state,
            **trained,
            "optimizers": optimizer_states,
            "schedulers": [s.state_dict() for s in run.schedulers],
            "scaler": run.scaler.state_dict(),
            "progress": asdict(run.progress),
            "rng": rng,
            "config": OmegaConf.to_container(run.s.cfg, resolve=True),
            "data": spec_record(run.s.data.spec),
            "metrics": metrics,
            "seconds": run.seconds,  # trained so far: what trainer.max_minutes counts
        })
        if name == "last":
            checkpoint.keep_step_copy(path, run.progress.step, run.tc.keep_last)
    if name == "last":
        run.saved_at = time.monotonic()


def keep_best(run: Run, value: float | None, higher_is_better: bool, improved: bool,
              metrics: dict[str, float]) -> None:
    """trainer.keep_best=K: this validation's checkpoint as best-step-NNNNNN.pt when its
    monitored `value` is among the K best so far (without a monitor: the K newest); those that
    drop out of the K are deleted. Called after best.pt is written, before last.pt."""
    progress, k = run.progress, run.tc.keep_best
    if not k:
        return
    score = progress.step if value is None else value
    sign = -1 if value is None or higher_is_better else 1
    entry = [score, progress.step]
    progress.kept_best = sorted([*progress.kept_best, entry],
                                key=lambda e: (sign * e[0], e[1]))[:k]
    name = f"best-step-{progress.step:06d}"
    if entry in progress.kept_best:
        if improved and run.s.rt.is_main:  # best.pt holds these weights
            checkpoint.link_or_copy(run.checkpoints / "best.pt", run.checkpoints / f"{name}.pt")
        elif not improved:
            save(run, name, metrics)
    if run.s.rt.is_main:
        kept = {f"best-step-{int(step):06d}.pt" for _, step in progress.kept_best}
        for path in run.checkpoints.glob("best-step-*.pt"):
            if path.name not in kept:
                path.unlink()


def restore(run: Run, source: Path) -> None:
    """Continue from a checkpoint: weights, optimizer and scheduler states, scaler, progress and
    this rank's random generators."""
    rt, model = run.s.rt, run.s.model
    state = checkpoint.load(source)  # on the CPU: load_state_dict moves what it needs
    saved_model = state["config"]["model"]
    changed = [f"model.{key}={value}" for key, value in
               OmegaConf.to_container(run.s.cfg.model, resolve=True).items()
               if saved_model.get(key) != value]
    with checkpoint.reported_as_mismatch(source, changed):
        # The weights as trained: beside the average in a run that kept one, else `model`.
        rt.load_model_state(model, state.get("training_model", state["model"]))
        if run.average:  # a run that had no average starts one from its weights
            run.average.load_state_dict(state["model"])
        entries = run.s.task.param_groups(model)
        for optimizer, scheduler, saved, saved_schedule, entry in zip(
                run.optimizers, run.schedulers, state["optimizers"], state["schedulers"],
                entries, strict=True):
            saved, saved_schedule = regrouped(saved, saved_schedule, optimizer, flat(entry))
            rt.load_optimizer_state(model, optimizer, saved)
            scheduler.load_state_dict(saved_schedule)
    if state["scaler"]:  # empty when the run was not in 16-bit precision
        run.scaler.load_state_dict(state["scaler"])
    run.progress = Progress(**state["progress"])
    run.earlier_seconds = state.get("seconds", 0.0)  # absent in checkpoints before max_minutes
    rng = state["rng"]  # one state per rank; a different world size reuses them in turn
    checkpoint.set_rng_state(rng[rt.rank % len(rng)], rt.device)
    log.info("resumed from %s at step %d", source, run.progress.step)
