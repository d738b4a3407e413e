"""What `train` runs once Hydra has composed its config: the run in this process, in
device.count processes launched here, or (a sweep job) in a child process of its own; and how a
resumed run's config is put together from its checkpoint and the command line."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer import run_lock
from trainer.config import absolute_paths, saved_config, validate
from trainer.errors import UserError
from trainer.ranks import env_rank, in_process_group
from trainer.signals import STOPPED_EXIT, Stopped, report_stopped

log = logging.getLogger("trainer")
# The config groups: a resumed run keeps its choice of each.
GROUPS = ("model", "data", "optimizer", "scheduler", "device", "trainer", "logger", "experiment",
          "debug", "hparams_search")


def sweep_job(cfg: DictConfig) -> Any:
    """One job of a multirun, in a process of its own. A failure (an error, or the process
    killed) is logged and recorded in job.json, and the sweep goes on; a signal stops the sweep.
    With resume=auto a job that completed in an earlier run of the same sweep is kept as it is.
    Returns the job's `optimized_metric` (what Optuna minimises or maximises), or all its
    metrics when none is set."""
    from trainer.run.sweep import read_record, write_record

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    record: dict[str, Any] = {"job": hydra_cfg.job.num,
                              "overrides": " ".join(hydra_cfg.overrides.task),
                              "status": "completed", "error": None, "metrics": {},
                              "task": "unknown"}  # what the summary ranks it among
    earlier = read_record(run_dir) if cfg.resume == "auto" else None
    start = time.perf_counter()
    try:
        from trainer.tasks import family_of  # torch: only once a job runs

        record["task"] = family_of(cfg)
        if earlier and earlier["overrides"] != record["overrides"]:
            raise UserError(f"{run_dir} holds job {earlier['job']} of another sweep "
                            f"({earlier['overrides']}): resume=auto continues the same sweep "
                            "command; give a new hydra.sweep.dir for a new one")
        if earlier and earlier["status"] == "completed":
            log.info("job %d completed in an earlier run of this sweep: kept", record["job"])
            record = earlier
        else:
            record["metrics"] = train_job(cfg, isolated=True) or {}
    except run_lock.RunHeld as held:  # another process trains this job: its files are left alone
        print(f"error: job {record['job']}: {held}", file=sys.stderr)
        return None
    except Stopped as stopped:
        report_stopped(stopped)
    except Exception as error:  # noqa: BLE001 - one job's failure must not end the sweep
        log.error("job failed: %s", error, exc_info=not isinstance(error, UserError))
        record.update(status="failed", error=" ".join(str(error).split())[:500])
    if record is not earlier:
        record["seconds"] = round(time.perf_counter() - start, 2)
        write_record(run_dir, record)
    metric = cfg.get("optimized_metric")
    return record["metrics"].get(metric) if metric else record["metrics"]


def resumed_config(cfg: DictConfig, overrides: list[str], rerun: bool = False) -> DictConfig:
    """The run's own config, with the plain key=value overrides of this command on top.

    `rerun` (resume=auto): the command that started the run, run again, so its group choices are
    the run's own and are passed over rather than refused.
    """
    from trainer.checkpoint import resume_path

    path, saved = checked_resume(cfg.resume, cfg)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra") or (rerun and key in GROUPS):
            continue
        if key in GROUPS:
            raise UserError(f"{override}: a resumed run keeps its {key}; only keys such as "
                            "trainer.max_steps=N can change on resume")
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    # A step copy taken for an unreadable last.pt: what restore() loads, and what is saved.
    saved.resume = cfg.resume if path == resume_path(cfg.resume) else str(path)
    return saved


def checked_resume(resume: str, own: DictConfig, check_only: bool = False
                   ) -> tuple[Path, DictConfig]:
    """The checkpoint to continue (checkpoint.resumable) and its config, checked: the targets
    `own` (this command's composed config) names are trusted beside the allow-list."""
    from trainer.checkpoint import resumable
    from trainer.targets import target_nodes

    path, state = resumable(resume, check_only)
    trusted = {node.get("_target_") for _, _, node in target_nodes(own)
               if isinstance(node, DictConfig)}
    return path, saved_config(state["config"], path, trusted)


def resume_source(resume: str | None, run_dir: Path) -> str | None:
    """The run directory or checkpoint to continue: `latest` is the run directory Hydra was given
    (the newest run); `auto` continues run_dir if it holds a checkpoint, else starts afresh."""
    if resume == "latest":
        log.info("resume=latest: continuing %s", run_dir)
        return str(run_dir)
    if resume == "auto":
        found = (run_dir / "checkpoints" / "last.pt").is_file()
        log.info("resume=auto: %s", f"continuing {run_dir}" if found else "no checkpoint yet, "
                 "starting afresh")
        return str(run_dir) if found else None
    return resume


def train_job(cfg: DictConfig, isolated: bool = False) -> Any:
    """Train in this process, in device.count launched processes, or (`isolated`, a sweep job)
    in one child process, this process holding the run directory's lock meanwhile (one writer
    per run: a second train of it is refused)."""
    with run_lock.held(Path(HydraConfig.get().runtime.output_dir)):
        return _train_job(cfg, isolated)


def _train_job(cfg: DictConfig, isolated: bool) -> Any:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    rerun = cfg.resume == "auto"
    cfg.resume = resume_source(cfg.resume, run_dir)
    if cfg.resume:
        cfg = resumed_config(cfg, list(hydra_cfg.overrides.task), rerun)
    if hydra_cfg.mode == RunMode.MULTIRUN:  # name each sweep job by its overrides, everywhere
        for logger in cfg.logger.values():
            if isinstance(logger, DictConfig) and "name" in logger and not logger.name:
                logger.name = hydra_cfg.job.override_dirname.replace("/", "_") or "defaults"
    absolute_paths(cfg)
    from trainer.tasks import check_configured_pairing  # torch: only once a run is to start

    validate(cfg)  # once, here, before any process, child or worker starts
    check_configured_pairing(cfg)  # before the data is read: a mismatch costs no tokenizing
    if cfg.lr_find:
        return _find_lr(cfg, run_dir, list(hydra_cfg.overrides.task))
    if cfg.device.count * cfg.device.nodes > 1 and not in_process_group():
        return _launch_group(cfg, run_dir)
    if isolated:
        from trainer.run.job import run_in_child

        return run_in_child(OmegaConf.to_container(cfg, resolve=True), run_dir)
    from trainer.run.loop import train as run_training

    return run_training(cfg, run_dir)


def _find_lr(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, float]:
    """lr_find=true: the range test, in this one process; what it prints to train with is the
    command line given, less lr_find and any optimizer.lr."""
    from trainer.run.lr_find import find_lr

    if cfg.resume:
        raise UserError("lr_find=true starts from fresh weights: drop resume= (a run's "
                        "learning rate is changed on resuming with optimizer.lr=...)")
    if cfg.device.count * cfg.device.nodes > 1 or in_process_group():
        raise UserError(f"lr_find=true runs in one process: drop device.count="
                        f"{cfg.device.count} (its suggestion holds for the same per-process "
                        "batch on more devices; scale it with the global batch if you raise it)")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("lr_find",
                                                                            "optimizer.lr")]
    return find_lr(cfg, run_dir, kept)


def _launch_group(cfg: DictConfig, run_dir: Path) -> dict[str, float] | None:
    """device.count processes on this node (of device.nodes); rank 0's metrics where it ran."""
    from trainer.launcher import launch

    try:
        result = launch(cfg.device, worker, OmegaConf.to_container(cfg, resolve=True),
                        str(run_dir))
    except UserError as error:
        if (run_dir / "checkpoints" / "last.pt").is_file() and "resume=" not in str(error):
            raise UserError(f"{error}; resume from its last checkpoint with: train "
                            f"resume={run_dir}") from None
        raise
    if result is None and not (run_dir / "checkpoints").exists():
        # Several nodes: rank 0 ran on another node and the run lives there; the directory
        # Hydra made here for this node's launcher holds nothing of the run.
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def worker(config: dict, run_dir: str) -> dict[str, float]:
    """Each process started by `launch`: no Hydra, no directories; rank 0 logs to train.log."""
    from trainer.launcher import record_user_error
    from trainer.logging import log_to_run_dir  # torch: only in a process that trains
    from trainer.run.loop import train as run_training

    main = env_rank() == 0
    log_to_run_dir(run_dir, main)
    try:
        return run_training(OmegaConf.create(config), Path(run_dir))
    except UserError as error:
        record_user_error(str(error))
        sys.exit(2)
    except Stopped as stopped:
        if main:
            report_stopped(stopped)
        sys.exit(STOPPED_EXIT)
