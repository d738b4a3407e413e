"""trainer.profile=N: torch.profiler over N training steps, after two warm-up steps, written as a
trace that Perfetto (https://ui.perfetto.dev) or chrome://tracing opens and as a table of the
operators that took the time. Rank 0 only, like every other write."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity

from trainer.logging import shown
from trainer.tables import aligned

if TYPE_CHECKING:
    from trainer.run.state import Run

log = logging.getLogger("trainer")

WARMUP = 2  # steps run under the profiler but not recorded: its own start-up is not the loop's
SHOWN = 10  # operators in the log; operators.txt has more


@contextlib.contextmanager
def profiled(run: Run) -> Iterator[Callable[[], None]]:
    """What the loop calls after each step: moves the profiler's window on, or does nothing."""
    steps = run.tc.profile
    if not steps or not run.s.rt.is_main:
        yield lambda: None
        return
    # Kineto reports a CUDA build's missing GPU as an error, on a CPU run no error, and prints
    # its USDT tracepoints (profiler_start, profiler_stop) below level 6.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    on_gpu = run.s.rt.device.type == "cuda"
    first = run.progress.step + WARMUP + 1
    window = torch.profiler.schedule(wait=0, warmup=WARMUP, active=steps, repeat=1)
    with torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []),
            schedule=window,
            on_trace_ready=lambda done: write(done, run.run_dir / "profile", first,
                                              run.progress.step, on_gpu),
    ) as profiler:
        yield profiler.step


def write(profiler: torch.profiler.profile, folder: Path, first: int, last: int,
          on_gpu: bool) -> None:
    """trace.json and operators.txt in `folder`, and the operators that took the most time in
    the log, for steps `first` to `last`. Called once the window is recorded, or when the run
    ends inside it."""
    recorded = last - first + 1
    if recorded < 1:
        log.warning("trainer.profile: the run ended within the profiler's %d warm-up steps; "
                    "nothing was recorded", WARMUP)
        return
    averages = profiler.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(folder / "trace.json"))
        (folder / "operators.txt").write_text(averages.table(sort_by=sort_by, row_limit=40))
        where = f"in {shown(folder)}: trace.json (open it in https://ui.perfetto.dev), " \
            "operators.txt"
    except OSError as error:  # a full disk must not end the run over its profile
        where = f"not written to {shown(folder)} ({error.strerror or error})"
    marks = [e for e in averages if e.key.startswith("ProfilerStep")]
    per_step_ms = sum(e.cpu_time_total for e in marks) / recorded / 1000
    log.info("profile of %s (%.1f ms a step on the host) %s\n%s",
             f"step {first}" if recorded == 1 else f"steps {first}-{last}", per_step_ms, where,
             operator_table(averages, recorded, on_gpu))


def operator_table(averages: Any, steps: int, on_gpu: bool) -> str:
    """The operators that took the most time of their own (not counting the operators they
    call), per step and as a share of the whole. On the CPU the whole is the steps' time, and a
    row says how much of it no operator took (Python, waiting for data); on a GPU, its busy time."""
    marks = [e for e in averages if e.key.startswith("ProfilerStep")]
    ops = [e for e in averages if not e.key.startswith("ProfilerStep")]

    def own_us(event: Any) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    rows = [[e.key, f"{e.count / steps:.3g}", own_us(e)]
            for e in sorted(ops, key=own_us, reverse=True)[:SHOWN]]
    if on_gpu:
        whole = sum(own_us(e) for e in ops)
    else:
        whole = sum(e.cpu_time_total for e in marks)
        rows.append(["(no operator: Python, waiting for data)", "",
                     sum(e.self_cpu_time_total for e in marks)])
    header = ["operator", "calls a step", f"{'GPU' if on_gpu else 'CPU'} ms a step", "share"]
    return aligned([header] + [[name, calls, f"{us / steps / 1000:.3f}",
                                f"{100 * us / (whole or 1.0):.1f}%"] for name, calls, us in rows],
                   right={1, 2, 3})
