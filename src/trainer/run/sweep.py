"""Sweeps: each job's record (job.json) and the summary table written when a multirun ends.

Every job writes its own record where it runs (which may be another process or another machine
under the joblib or submitit launchers); the summary, a Hydra callback in the process that ran
`train -m`, only reads the records from the sweep directory.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainer.errors import UserError
from trainer.tables import aligned

RECORD = "job.json"


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    (run_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """A job's record from an earlier run of the sweep, if it left one."""
    path = run_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def higher_is_better(metric: str) -> bool:
    return metric.endswith("acc")


def summary_rows(sweep_dir: Path, metric: str) -> list[dict[str, Any]]:
    """One row per job, with its `task`: within each task (in the order of their first jobs),
    completed jobs best first by `metric`, then the failed ones. Jobs of different tasks are not
    ranked against each other: a GAN's val/loss and a classifier's measure different things."""
    records = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{RECORD}")]
    for record in records:
        record.setdefault("task", "unknown")  # a record of a job that failed before it knew
    sign = -1 if higher_is_better(metric) else 1
    first_job = {}
    for record in sorted(records, key=lambda r: r["job"]):
        first_job.setdefault(record["task"], record["job"])

    def order(record: dict[str, Any]) -> tuple[int, int, float, int]:
        value = record["metrics"].get(metric, math.nan)
        missing = record["status"] != "completed" or math.isnan(value)
        return (first_job[record["task"]], missing, 0.0 if missing else sign * value,
                record["job"])

    return sorted(records, key=order)


def write_summary(sweep_dir: Path, metric: str) -> tuple[str, str]:
    """Write sweep_summary.csv (every job's whole overrides) and .md into the sweep directory;
    return how it is ranked, in words, and the table as text. The .md and the text show what
    differs between jobs: the overrides every job shares are named once above the table, long
    numbers shortened."""
    rows = summary_rows(sweep_dir, metric)
    metrics = sorted({k for r in rows for k in r["metrics"]}, key=lambda k: (k != metric, k))
    header = ["job", "task", "overrides", "status", *metrics, "seconds", "error"]
    table = [[str(r["job"]), r["task"], r["overrides"], r["status"],
              *(_number(r["metrics"].get(k)) for k in metrics), f"{r['seconds']:.1f}",
              r.get("error") or ""] for r in rows]
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as file:
        csv.writer(file).writerows([header, *table])
    shared, differing = _split_overrides([r["overrides"] for r in rows])
    for row, overrides in zip(table, differing, strict=True):
        row[2] = overrides
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if len(tasks) == 1:  # all ranked together: no task column
        header, table = [header[0], *header[2:]], [[row[0], *row[2:]] for row in table]
    every = f"every job: {shared}\n\n" if shared else ""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    ranked = ranking(metric, tasks)
    (sweep_dir / "sweep_summary.md").write_text(
        f"Sweep {sweep_dir}, {ranked}\n\n{every}" + "\n".join(lines) + "\n")
    return ranked, every + aligned([header, *table])


def ranking(metric: str, tasks: list[str]) -> str:
    """How the table is ordered, in words."""
    if len(tasks) == 1:
        return f"best first by {metric}"
    return (f"best first by {metric} within each task ({', '.join(tasks)}); jobs of different "
            "tasks are not ranked against each other")


def _split_overrides(overrides: list[str]) -> tuple[str, list[str]]:
    """What every job's overrides share, and what each job has besides, with long numbers
    (Optuna's 0.004015543686135838) shortened to 4 significant digits."""
    jobs = [_shortened(each).split() for each in overrides]
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    return (" ".join(o for o in jobs[0] if o in shared) if shared else "",
            [" ".join(o for o in job if o not in shared) or "-" for job in jobs])


def _shortened(overrides: str) -> str:
    return re.sub(r"(?<==)-?\d+\.\d{5,}(e-?\d+)?\b", lambda m: f"{float(m.group()):.4g}",
                  overrides)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def check_sweeper_overrides(args: list[str]) -> None:
    """The Optuna sweeper's settings given on the command line (`hydra.sweeper.n_trials=30`),
    checked before Hydra starts: the sweeper reports a bad one with a traceback, some only after
    every trial has run (and Hydra's callbacks cannot stop a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    given = [arg for arg in args if arg.startswith("hydra.sweeper.")]
    try:
        overrides = OverridesParser.create().parse_overrides(given)
    except OverrideParseException:
        return  # Hydra reports it
    settings = {o.key_or_group.removeprefix("hydra.sweeper."): o.value() for o in overrides}
    for key in ("n_trials", "n_jobs"):
        value = settings.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"hydra.sweeper.{key}={value} is not accepted: it takes an "
                            "integer >= 1")
    if settings.get("direction", "minimize") not in ("minimize", "maximize"):
        raise UserError(f"hydra.sweeper.direction={settings['direction']} is not accepted: "
                        "choose one of minimize, maximize")
    rate = settings.get("max_failure_rate", 0.0)
    if not isinstance(rate, int | float) or not 0 <= rate <= 1:
        raise UserError(f"hydra.sweeper.max_failure_rate={rate} is out of range: it must be in "
                        "[0, 1] (the share of trials that may fail before the search stops)")


class SweepSummary(Callback):
    """Prints and writes the summary table at the end of every multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        metric = config.get("optimized_metric") or "val/loss"
        ranked, table = write_summary(sweep_dir, metric)
        print(f"\nSweep summary, {ranked} ({sweep_dir}/sweep_summary.md):\n")
        print(table)
