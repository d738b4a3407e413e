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
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from trainer.cli.report import FULL_ERROR, fail, reporting_errors
from trainer.cli.run_dirs import forget_runs, latest_run, refuse_held_sweep, register_resolvers
from trainer.config import did_you_mean, refuse_added_keys, register_schemas
from trainer.errors import UserError
from trainer.ranks import env_rank, in_process_group
from trainer.run.launch import (
    GROUPS,
    resume_source,
    resumed_config,
    sweep_job,
    train_job,
)
from trainer.run.sweep import check_sweeper_overrides
from trainer.signals import STOPPED_EXIT, Stopped

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")
# The commands over a finished run: a folder of their own, where `device` and `data` are keys
# rather than the config groups of CONFIG_DIR.
COMMANDS_DIR = str(Path(CONFIG_DIR) / "commands")
log = logging.getLogger("trainer")


register_schemas()
register_resolvers()


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
        fail(UserError(_composition_error(error, Path(_config_dir(config_name)), groups)),
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
        fail(error, status=1)


def _config_dir(config_name: str) -> str:
    return CONFIG_DIR if config_name == "train" else COMMANDS_DIR


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
        fail(error)
    except Stopped:  # rank 0 prints how to resume
        sys.exit(STOPPED_EXIT)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train_main(cfg: DictConfig) -> Any:
    _refuse_added_keys(cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)
    return reporting_errors(lambda: train_job(cfg))


def _use_command(config_name: str, job: str) -> Callable[[], None]:
    """A console script over a finished run: `--help`, or Hydra composing `config_name` and
    use.<job> running on it, a UserError reported as one line."""

    @hydra.main(version_base="1.3", config_path=COMMANDS_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        from trainer.use import jobs as use

        _refuse_added_keys(cfg)
        return reporting_errors(lambda: getattr(use, job)(cfg))

    def command() -> None:
        if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
            _print_help(config_name, sys.argv[1:])
            return
        try:
            _composed(main, config_name)
        finally:
            forget_runs()

    return command


def _check_output_folder(args: list[str]) -> None:
    """Where the run directory will go must be a folder this process can write (else Hydra
    fails creating it, with a traceback)."""
    given = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in ("hydra.run.dir",
                                                                         "hydra.sweep.dir")]
    target = Path(given[0] if given else "outputs").absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(UserError(f"the run directory {target} cannot be created: {existing} is "
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
            fail(UserError(f"--config-dir {folder} is not a folder: give the folder of your own "
                            "config groups (such as experiment/NAME.yaml)"))
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        _print_help("train", sys.argv[1:])
        return
    if in_process_group() and env_rank() != 0:
        _join_external_group()
    else:
        _check_output_folder(sys.argv[1:])
        refuse_held_sweep(sys.argv[1:])
        reporting_errors(lambda: check_sweeper_overrides(sys.argv[1:]))
        try:
            _composed(_train_main, "train")
        finally:
            forget_runs()


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
