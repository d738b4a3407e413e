"""Where `train` writes and what it may touch: the run directory a new run claims, the run a
resume continues (held by its lock and its checkpoint's config checked before Hydra writes into
it), the run a command over a finished run reads. Hydra calls these as config resolvers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer import run_lock
from trainer.cli.report import fail, reporting_errors
from trainer.errors import UserError
from trainer.run.launch import checked_resume


def _existing_run(path: str) -> str:
    """A run directory (or a checkpoint file in one) given on the command line must exist with
    its checkpoints (Hydra would otherwise create it)."""
    if Path(path).is_file() and Path(path).suffix == ".pt":
        return str(Path(path).parent.parent)
    if not (Path(path) / "checkpoints").is_dir():
        fail(UserError(f"{path!r} is not a run directory: it has no checkpoints/ "
                        "(give a directory such as outputs/2026-11-28/17-03-12, a checkpoint in "
                        "one, or resume=latest)"))
    return path


_checked: set[str] = set()  # runs and init_from sources checked (resolvers run more than once)


def _used_run(path: str, *, _root_: DictConfig | None = None) -> str:
    """The run a command over a finished run (evaluate, predict, ...) reads, its checkpoint's
    config checked before Hydra writes the command's log into it: a refused checkpoint leaves
    the run as it was."""
    run = _existing_run(path)
    if _root_ is not None and "checkpoint" in _root_ and run not in _checked:
        from trainer.use.jobs import saved_run

        reporting_errors(lambda: saved_run(_root_, check_only=True))
        _checked.add(run)
    return run


def latest_run(outputs: Path = Path("outputs")) -> str:
    """The run under outputs/ whose last.pt was written last."""
    found = list(outputs.glob("**/checkpoints/last.pt"))
    if not found:
        fail(UserError(f"resume=latest: no run under {outputs.resolve()} has a "
                        "checkpoints/last.pt to continue"))
    return str(max(found, key=lambda p: p.stat().st_mtime).parent.parent)


def run_dir(resume: str | None, new: str, mode: Any = RunMode.RUN, *,
             _root_: DictConfig | None = None) -> str:
    single = str(mode) in ("RUN", str(RunMode.RUN))
    if resume is None:  # a sweep's jobs go under hydra.sweep.dir: nothing to claim here
        if single and _root_ is not None and _root_.get("init_from"):
            _check_init_from(_root_.init_from)  # before the new run's directory is made
        return _unclaimed(new) if single else new
    if resume == "auto":  # auto: continue in hydra.run.dir if it holds a checkpoint
        run = new
    elif resume == "latest":
        run = latest_run()
    else:
        is_file = Path(resume).is_file() and Path(resume).suffix == ".pt"
        run = str(Path(resume).parent.parent) if is_file else resume
        _refuse_held(run)  # before "no checkpoints/": a run may train before its first save
        run = _existing_run(resume)
    if single:
        _hold(run, resume, _root_)
    return run


_held_here: set[str] = set()  # the runs _hold took (its resolvers run more than once)


def _check_init_from(source: str) -> None:
    from trainer.run.init_from import source_state

    if source not in _checked:
        reporting_errors(lambda: source_state(source, check_only=True))
        _checked.add(source)


def _hold(run: str, resume: str, cfg: DictConfig | None) -> None:
    """A run to continue is held from here, before Hydra writes .hydra/ and train.log into it,
    and the config of the checkpoint it continues checked: a second writer, or a checkpoint that
    cannot be resumed, is refused having changed nothing. train_job keeps the lock."""
    if run in _held_here or not Path(run).is_dir():
        return
    _refuse_held(run)
    auto = resume == "auto" and not (Path(run) / "checkpoints" / "last.pt").is_file()
    if cfg is not None and not auto:  # (resumed_config checks again, for every path in)
        source = run if resume in ("auto", "latest") else resume
        reporting_errors(lambda: checked_resume(source, cfg, check_only=True))
    reporting_errors(lambda: run_lock.acquire(Path(run)))
    _held_here.add(run)


def forget_runs() -> None:
    """The end of a command: the locks its resolvers took released (train_job has released
    those it trained; a command that stopped before keeps none) and what they checked
    forgotten, so that a command called again in this process looks again."""
    for run in _held_here:
        run_lock.release(Path(run))
    _held_here.clear()
    _checked.clear()


def _refuse_held(run: str) -> None:
    who = run_lock.holder(Path(run))
    if who:
        fail(run_lock.RunHeld(run_lock.refusal(Path(run), who)))


def refuse_held_sweep(args: list[str]) -> None:
    """`train -m ... hydra.sweep.dir=D` (say, resume=auto after a requeue) while a job of D
    trains: refused before Hydra writes into any job's directory."""
    if not {"-m", "--multirun"} & set(args):
        return
    for folder in (a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")):
        for lock in sorted(Path(folder).glob(f"*/{run_lock.LOCK}")):
            _refuse_held(str(lock.parent))


_claimed: dict[str, str] = {}  # per process: Hydra resolves the run directory more than once


def _unclaimed(new: str) -> str:
    """`new` (outputs/DATE/TIME), or new_1, new_2, ... if a run started in the same second has
    it: claimed by creating it, so two runs never share a directory."""
    if new not in _claimed:
        candidate, n = new, 0
        while True:
            try:
                Path(candidate).mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                candidate = f"{new}_{n}"
        _claimed[new] = candidate
    return _claimed[new]


def _hydra_subdir(resume: str | None, run_dir: str, *, _root_: DictConfig | None = None
                  ) -> str:
    # Also where hydra.run.dir=DIR on the command line leaves _run_dir unresolved.
    if resume is not None and HydraConfig.initialized() and \
            HydraConfig.get().mode == RunMode.RUN:
        _hold(run_dir, resume, _root_)
    fresh = resume is None or (resume == "auto" and not (Path(run_dir) / ".hydra").is_dir())
    return ".hydra" if fresh else f".hydra/resumed-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def register_resolvers() -> None:
    resolvers: dict[str, Callable[..., Any]] = {
        "trainer_run_dir": run_dir,
        "trainer_hydra_subdir": _hydra_subdir,
        "trainer_existing_run": _used_run,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)
