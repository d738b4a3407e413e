"""Run the real `train` command for a few steps: the seconds from starting the command to the
end of its first step, and the peak memory of the command and every process it started.

Memory is the proportional set size (PSS) summed over the process tree and sampled every 0.1 s:
pages that forked workers share with their parent are split between them rather than counted in
each, so the sum is what the run costs the machine. Used by benchmark_images.py and
benchmark_text.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

STEP = re.compile(r"\]\[trainer\]\[INFO\] - step (\d+)/")


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its descendants, in MB."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            continue  # the process ended while being read
    return total / 1024


def until_step(args: list[str], cwd: Path, steps: int = 5) -> tuple[float, float]:
    """(seconds to the end of the first step, peak MB of all processes up to step `steps`) of
    `train ARGS`; the run is stopped there (before validation and test)."""
    command = ["train", *args, "trainer.log_every=1", "trainer.progress=false", "logger=none"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    peak, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss_mb(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    seconds, lines = None, []
    for line in process.stdout:
        lines.append(line)
        step = STEP.search(line)
        if step and seconds is None:
            seconds = time.perf_counter() - start
        if step and int(step.group(1)) >= steps:
            break
    done.set()
    sampler.join()
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # the command and its decoding workers
    process.wait()
    if seconds is None:
        raise SystemExit(f"train {' '.join(args)} ended before a step:\n{''.join(lines)[-3000:]}")
    return seconds, peak
