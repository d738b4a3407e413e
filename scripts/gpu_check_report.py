"""The figures of scripts/gpu_check.sh, read from its runs' metrics.json and TensorBoard events:
printed, and written to OUT/gpu_check.json.

    python scripts/gpu_check_report.py OUT
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path, tag: str) -> list:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


def training_seconds(run: Path) -> float:
    """Steady-state training time of the whole run: the wall time between the first and the
    last logged step, scaled to all steps (so compile warm-up before the first log is left out,
    as speed records leave it out)."""
    logged = scalars(run, "train/loss")
    first, last = logged[0], logged[-1]
    return (last.wall_time - first.wall_time) * last.step / max(last.step - first.step, 1)


def main(out: Path) -> None:
    report = {"architectures": {}}
    for run in sorted(p for p in out.iterdir() if (p / "metrics.json").exists()):
        metrics = json.loads((run / "metrics.json").read_text())
        if run.name == "mnist":
            report["mnist"] = {"test/acc": metrics["test/acc"],
                               "training_seconds": round(training_seconds(run), 2)}
        elif run.name == "gpt2":
            mfu = [e.value for e in scalars(run, "perf/mfu")[1:]]  # the first holds compiling
            step_ms = [e.value for e in scalars(run, "perf/step_ms")[1:]]
            report["gpt2_small_shape"] = {
                "mfu": round(statistics.median(mfu), 3) if mfu else None,
                "step_ms": round(statistics.median(step_ms), 1) if step_ms else None,
                "tokens_per_s": round(statistics.median(
                    [e.value for e in scalars(run, "perf/tokens_per_s")[1:]] or [0]))}
        else:
            recompiles = (out / f"{run.name}.log").read_text().count("Recompiling")
            report["architectures"][run.name] = {**metrics, "recompiles": recompiles}
    layouts = out / "conv_layout.json"  # scripts/benchmark_conv_layout.py's table
    if layouts.exists():
        report["conv_layout"] = json.loads(layouts.read_text())
    memory = out / "memory.json"  # scripts/benchmark_memory.py's medians
    if memory.exists():
        report["memory"] = json.loads(memory.read_text())
    print(json.dumps(report, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
