"""The console scripts `train`, `evaluate`, `predict`, `generate` and `export-model`: thin Hydra
entrypoints over run/launch.py (training, sweeps, process groups) and use/jobs.py (a finished
run's jobs).

Heavy imports (torch, the loop) happen only once a command runs, so `--help` is quick.

May import: everything below it (run, use and the leaves); nothing imports it but __main__.
"""

from __future__ import annotations

import logging
import os
import re
import string
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from trainer import run_lock
from trainer.config import did_you_mean, refuse_added_keys, register_schemas
from trainer.errors import UserError
from trainer.ranks import env_rank, in_process_group
from trainer.run.launch import (
    GROUPS,
    checked_resume,
    resume_source,
    resumed_config,
    sweep_job,
    train_job,
)
from trainer.run.sweep import check_sweeper_overrides
from trainer.signals import STOPPED_EXIT, Stopped, report_stopped

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")
# The commands over a finished run: a folder of their own, where `device` and `data` are keys
# rather than the config groups of CONFIG_DIR.
COMMANDS_DIR = str(Path(CONFIG_DIR) / "commands")
log = logging.getLogger("trainer")
# The user asked for full tracebacks (read before _composed sets the variable for Hydra).
FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def _existing_run(path: str) -> str:
    """A run directory (or a checkpoint file in one) given on the command line must exist with
    its checkpoints (Hydra would otherwise create it)."""
    if Path(path).is_file() and Path(path).suffix == ".pt":
        return str(Path(path).parent.parent)
    if not (Path(path) / "checkpoints").is_dir():
        _fail(UserError(f"{path!r} is not a run directory: it has no checkpoints/ "
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

        _run_reporting_errors(lambda: saved_run(_root_, check_only=True))
        _checked.add(run)
    return run


def latest_run(outputs: Path = Path("outputs")) -> str:
    """The run under outputs/ whose last.pt was written last."""
    found = list(outputs.glob("**/checkpoints/last.pt"))
    if not found:
        _fail(UserError(f"resume=latest: no run under {outputs.resolve()} has a "
                        "checkpoints/last.pt to continue"))
    return str(max(found, key=lambda p: p.stat().st_mtime).parent.parent)


def _run_dir(resume: str | None, new: str, mode: Any = RunMode.RUN, *,
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
        _run_reporting_errors(lambda: source_state(source, check_only=True))
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
        _run_reporting_errors(lambda: checked_resume(source, cfg, check_only=True))
    _run_reporting_errors(lambda: run_lock.acquire(Path(run)))
    _held_here.add(run)


def _forget_runs() -> None:
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
        _fail(run_lock.RunHeld(run_lock.refusal(Path(run), who)))


def _refuse_held_sweep(args: list[str]) -> None:
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


def _register_resolvers() -> None:
    resolvers: dict[str, Callable[..., Any]] = {
        "trainer_run_dir": _run_dir,
        "trainer_hydra_subdir": _hydra_subdir,
        "trainer_existing_run": _used_run,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)


register_schemas()
_register_resolvers()


def _fail(error: UserError, status: int = 2) -> None:
    if FULL_ERROR:
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(status)


def _composed(compose: Callable[[], Any], config_name: str) -> Any:
    """Run what composes the config (a Hydra main, and with it the job): a command line Hydra
    cannot compose (a misspelt key or option, a wrong type) is one line and exit status 1.

    Hydra prints such errors over several lines itself unless HYDRA_FULL_ERROR is set, when it
    raises them instead; set here, it also lets a job's unexpected error show its whole
    traceback. A UserError stays one line (`_run_reporting_errors`).
    """
    from hydra.errors import ConfigCompositionException, OverrideParseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return compose()
    except (ConfigCompositionException, OverrideParseException) as error:
        if FULL_ERROR:
            raise
        groups = GROUPS if config_name == "train" else ()
        _fail(UserError(_composition_error(error, Path(_config_dir(config_name)), groups)),
              status=1)


def _composition_error(error: Exception, config_dir: Path, groups: tuple[str, ...] = ()) -> str:
    """What Hydra could not compose from a command line, which it reports over several lines, as
    one line naming the bad value and what is accepted: a misspelt key, an option its group
    lacks, a value of the wrong type, an override it cannot parse. `groups`: the config groups
    the command takes (group=option) beside its keys."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = error.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.parent_node is not None:
        accepted = [str(k) for k in cause.parent_node if not str(k).startswith(("_", "hydra"))]
        if "." not in str(cause.full_key):  # the top level: groups without a key of their own too
            accepted += [group for group in groups if group not in accepted]
        prefix = str(cause.full_key).rpartition(".")[0]
        known = did_you_mean(str(cause.key), accepted, f"{prefix}." if prefix else "")
        return (f"unknown key {cause.full_key}{known}; "
                f"accepted: {', '.join(accepted)}")
    missing = getattr(error, "missing_cfg_file", None) or ""
    if isinstance(error, MissingConfigException) and "/" in missing:
        group, option = missing.rsplit("/", 1)
        options = error.options or sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        return (f"{group}={option} is not an option{did_you_mean(option, options, group, '=')}; "
                f"choose one of {', '.join(options)}")
    search_space = re.search(r"'hydra\.sweeper\.params\.([^']*)'", str(error))
    if search_space:  # Hydra: "Sweeping over Hydra's configuration is not supported"
        override = search_space.group(0).strip("'")
        return (f"{override} cannot be given on the command line: give the search space without "
                f"the prefix, as {search_space.group(1)}")
    lines = str(error).split("Config search path:")[0].splitlines()
    message = " ".join(line.strip() for line in lines if line.strip()).replace("\\'", "'")
    if isinstance(error, OverrideParseException):
        message = f"the command line cannot be parsed: {message}"
    if isinstance(cause, OmegaConfBaseException):
        message += f": {str(cause).splitlines()[0]}"
    return message


def _refuse_added_keys(cfg: DictConfig) -> None:
    """A misspelt key given with `+`: exit status 1, as for one Hydra refuses itself."""
    try:
        refuse_added_keys(cfg)
    except UserError as error:
        _fail(error, status=1)


def _config_dir(config_name: str) -> str:
    return CONFIG_DIR if config_name == "train" else COMMANDS_DIR


def _run_reporting_errors(job: Callable[[], Any]) -> Any:
    """Run a job; a UserError becomes one line on stderr and exit status 2, a run stopped by a
    signal the resume command and STOPPED_EXIT."""
    try:
        return job()
    except UserError as error:
        log.debug("user error", exc_info=True)
        _fail(error)
    except Stopped as stopped:
        report_stopped(stopped)


def _join_external_group() -> None:
    """A rank other than 0 under torchrun or srun: the same config, rank 0's run directory."""
    from hydra import compose, initialize_config_dir

    from trainer.run.loop import train as run_training

    logging.basicConfig(level=logging.WARNING)
    overrides, _ = _compose_overrides(sys.argv[1:])
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = _composed(lambda: compose("train", overrides=overrides), "train")
        _refuse_added_keys(cfg)
        rerun = cfg.resume == "auto"
        if cfg.resume in ("latest", "auto"):  # decided as rank 0 decides (it writes nothing yet)
            fixed = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
            run_dir = latest_run() if cfg.resume == "latest" else fixed[0] if fixed else None
            cfg.resume = resume_source(cfg.resume, Path(run_dir)) if run_dir else None
        if cfg.resume:
            cfg = resumed_config(cfg, overrides, rerun)
        run_training(cfg, None)
    except UserError as error:
        _fail(error)
    except Stopped:  # rank 0 prints how to resume
        sys.exit(STOPPED_EXIT)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train_main(cfg: DictConfig) -> Any:
    _refuse_added_keys(cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)
    return _run_reporting_errors(lambda: train_job(cfg))


def _use_command(config_name: str, job: str) -> Callable[[], None]:
    """A console script over a finished run: `--help`, or Hydra composing `config_name` and
    use.<job> running on it, a UserError reported as one line."""

    @hydra.main(version_base="1.3", config_path=COMMANDS_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        from trainer.use import jobs as use

        _refuse_added_keys(cfg)
        return _run_reporting_errors(lambda: getattr(use, job)(cfg))

    def command() -> None:
        if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
            _print_help(config_name, sys.argv[1:])
            return
        try:
            _composed(main, config_name)
        finally:
            _forget_runs()

    return command


def _check_output_folder(args: list[str]) -> None:
    """Where the run directory will go must be a folder this process can write (else Hydra
    fails creating it, with a traceback)."""
    given = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in ("hydra.run.dir",
                                                                         "hydra.sweep.dir")]
    target = Path(given[0] if given else "outputs").absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        _fail(UserError(f"the run directory {target} cannot be created: {existing} is "
                        f"{'not a folder' if not existing.is_dir() else 'not writable'}; run "
                        "from a writable folder or set hydra.run.dir=DIR"))


def _print_help(config_name: str, args: list[str]) -> None:
    """`--help`, without Hydra's own: it lists its hundred internal config groups as well, which
    takes longer than the rest of start-up together. The header, this tool's groups and
    options, and the config composed with the given overrides."""
    from hydra import compose, initialize_config_dir

    overrides, user_dirs = _compose_overrides(args)
    with initialize_config_dir(config_dir=_config_dir(config_name), version_base="1.3"):
        cfg = _composed(lambda: compose(config_name, overrides=overrides,
                                        return_hydra_config=True), config_name)
    options: dict[str, set[str]] = {}
    for root in (Path(_config_dir(config_name)), *user_dirs):
        for group in root.iterdir():
            if group.is_dir() and group.name not in ("hydra", "commands"):
                options.setdefault(group.name, set()).update(f.stem for f in group.glob("*.yaml"))
    listing = "".join(f"{group}: {', '.join(sorted(options[group]))}\n"
                      for group in sorted(options))
    template = cfg.hydra.help.template
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    print(string.Template(template).substitute(APP_CONFIG_GROUPS=listing,
                                               CONFIG=OmegaConf.to_yaml(cfg)))


def _compose_overrides(args: list[str]) -> tuple[list[str], list[Path]]:
    """A command line as Hydra's compose API takes it: its overrides, with `--config-dir DIR`
    (`-cd`; a folder of the user's own options, such as experiment/mine.yaml) as the search path
    entry that Hydra's own parsing adds; and those folders."""
    overrides, user_dirs, rest = [], [], iter(args)
    for arg in rest:
        if arg in ("--config-dir", "-cd") or arg.startswith("--config-dir="):
            user_dirs.append(Path(arg.split("=", 1)[1] if "=" in arg else next(rest, ".")))
        elif not arg.startswith("-"):
            overrides.append(arg)
    if user_dirs:
        paths = ",".join(f"file://{folder.absolute()}" for folder in user_dirs)
        overrides.append(f"hydra.searchpath=[{paths}]")
    return overrides, user_dirs


def train() -> None:
    """Console script `train`."""
    for folder in _compose_overrides(sys.argv[1:])[1]:
        if not folder.is_dir():
            _fail(UserError(f"--config-dir {folder} is not a folder: give the folder of your own "
                            "config groups (such as experiment/NAME.yaml)"))
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        _print_help("train", sys.argv[1:])
        return
    if in_process_group() and env_rank() != 0:
        _join_external_group()
    else:
        _check_output_folder(sys.argv[1:])
        _refuse_held_sweep(sys.argv[1:])
        _run_reporting_errors(lambda: check_sweeper_overrides(sys.argv[1:]))
        try:
            _composed(_train_main, "train")
        finally:
            _forget_runs()


def evaluate() -> None:
    """Console script `evaluate`."""
    # data.KEY=VALUE changes a key of the run's data config, which evaluate.yaml cannot list.
    sys.argv = ["+" + arg if arg.startswith("data.") else arg for arg in sys.argv]
    _evaluate()


def generate() -> None:
    """Console script `generate`."""
    sys.argv = [_quoted_prompt(arg) for arg in sys.argv]
    _generate()


def _quoted_prompt(arg: str) -> str:
    """prompt=ANY TEXT as Hydra's grammar wants it: quoted, so that commas, brackets, quotes and
    letters beyond ASCII stay text (the shell has already removed the user's own quotes)."""
    key, _, value = arg.partition("=")
    if key != "prompt" or value[:1] in ("'", '"') or value == "null":
        return arg
    return "prompt='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_evaluate = _use_command("evaluate", "evaluate_job")
_generate = _use_command("generate", "generate_job")
predict = _use_command("predict", "predict_job")  # console script `predict`
# Console script `export-model` (`export` is a shell builtin: it would never run).
export_model = _use_command("export", "export_job")
