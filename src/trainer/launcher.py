"""Starting a run's worker processes and saying how they ended.

`launch` starts `device.count` worker processes through PyTorch's elastic launcher (the engine
behind torchrun). The `train` process that calls it owns the run directory; workers get it as an
argument and never go through Hydra, so they create no directories of their own. When one fails,
the group is stopped and the rank that failed first is named, with its traceback or one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from trainer.errors import UserError
from trainer.signals import STOPPED_EXIT, Stopped


def record_user_error(message: str) -> None:
    """A launched worker's UserError, handed to `launch` to print as the one line whichever rank
    raised it: written where the elastic agent reads a worker's error."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:  # the agent keeps no files: say it here
        print(f"error: {message}", file=sys.stderr)
        return
    with open(path, "w") as file:
        json.dump({"message": message, "timestamp": int(time.time()), "user_error": True}, file)


ENDED = ".ended"  # beside a worker's error file: {"at": seconds since 1970, "exit": its code}


def start_method(device_type: str) -> str:
    """fork for CPU processes on Linux: they start with this process's imports (torch's 3 s
    each) already done. spawn elsewhere: CUDA cannot be used in a forked process, and macOS's
    system libraries are not safe to fork."""
    return "fork" if device_type == "cpu" and sys.platform == "linux" else "spawn"


def _with_threads(threads: int, worker: Callable[..., Any], *args: Any) -> Any:
    """`worker(*args)` on `threads` CPU threads (a forked process keeps the thread count its
    parent's OpenMP read at start, before OMP_NUM_THREADS was set for the workers), noting how
    and when, to the microsecond, it ended: the agent reports one failed rank, in whole
    seconds, too little to tell the rank that failed from those that then lost their peer."""
    torch.set_num_threads(threads)
    code = 1  # an exception
    try:
        result = worker(*args)
        code = 0
        return result
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        raise
    finally:
        with contextlib.suppress(KeyError, OSError), open(
                os.environ["TORCHELASTIC_ERROR_FILE"] + ENDED, "w") as file:
            json.dump({"at": time.time(), "exit": code}, file)


def _first_failure(error: Any) -> tuple[int, Any]:
    """The rank whose failure set off the others' (a ChildFailedError's rank and failure), from
    what each rank noted as it ended. A rank that noted nothing was killed by a signal (the out
    of memory killer, `kill -9`) and comes first: the others then lost a peer."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failures = dict(error.failures)
    # The agent's folder for this attempt, from a failure with an error file (attempt_N/RANK/)
    located = [(r, f) for r, f in failures.items() if Path(f.error_file).parent.name.isdigit()]
    if not located:
        return error.get_first_failure()
    known_rank, known = located[0]
    name = Path(known.error_file).name
    ended: dict[int, float] = {}
    for folder in Path(known.error_file).parent.parent.iterdir():
        if not folder.name.isdigit():
            continue
        rank = known_rank - known.local_rank + int(folder.name)
        try:
            noted = json.loads((folder / (name + ENDED)).read_text())
        except (OSError, ValueError):  # killed: as the agent saw it, else by a signal unknown
            failures.setdefault(rank, ProcessFailure(int(folder.name), 0, -signal.SIGKILL,
                                                     str(folder / name)))
            ended[rank] = float("-inf")
            continue
        if noted["exit"]:
            failures.setdefault(rank, ProcessFailure(int(folder.name), 0, noted["exit"],
                                                     str(folder / name)))
            ended[rank] = noted["at"]
    first = min(failures, key=lambda rank: ended.get(rank, failures[rank].timestamp))
    return first, failures[first]


def _group_failure(error: Any) -> Exception:
    """What to raise for a ChildFailedError: Stopped, a user's error as its one line, or the
    failed rank's traceback printed and a UserError naming the rank."""
    rank, failure = _first_failure(error)
    if failure.exitcode == STOPPED_EXIT:  # stopped by a signal; rank 0 said how to resume
        return Stopped("the training processes stopped on a signal and saved last.pt (the "
                       "resume command is printed above)")
    message = failure.error_file_data.get("message")
    # The one line of `record_user_error`, without the rank: mistakes such as a diverged
    # loss are every rank's, whichever stopped first (an out-of-memory error names its GPU).
    if failure.error_file_data.get("user_error"):
        return UserError(message)
    # A crash: the worker's traceback.
    if isinstance(message, dict):
        print(message.get("extraInfo", {}).get("py_callstack", ""), file=sys.stderr)
        # Named from the recorded error, not the exit status: a process that raised can
        # still abort while tearing down its threads, which would read as a kill.
        first_line = (str(message.get("message", "")).strip().splitlines() or ["?"])[0]
        how = f"failed: {first_line} (printed above)"
    elif failure.exitcode < 0:  # pid 0: found dead by `_first_failure`, its signal unknown
        how = (f"was killed by {failure.signal_name() if failure.pid else 'a signal'} (out of "
               "memory? `kill -9`?)")
    else:
        how = f"failed with exit code {failure.exitcode} (its error is printed above)"
    return UserError(f"training process rank {rank} {how}; the whole group was stopped")


def launch(device_cfg: DictConfig, worker: Callable[..., Any], *args: Any) -> Any:
    """Run `worker(*args)` in device.count processes per node with torch's elastic launcher.

    Returns rank 0's result. A failing worker ends the group (the agent stops the others within
    a monitor interval); its error is printed by the worker and summarised here.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's files of each rank (its error, how it ended): read on failure, then removed
    # (left to itself, the agent leaves a folder in /tmp for every launch).
    files = tempfile.TemporaryDirectory(prefix="trainer-workers-")
    config = LaunchConfig(
        min_nodes=device_cfg.nodes, max_nodes=device_cfg.nodes,
        nproc_per_node=device_cfg.count,
        run_id=device_cfg.rdzv_id or str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint=device_cfg.rdzv_endpoint or "localhost:0",
        max_restarts=0, monitor_interval=0.1,  # torchrun's interval
        start_method=start_method(device_cfg.type),
        logs_specs=DefaultLogsSpecs(log_dir=files.name),
    )
    # The agent logs a failed worker inside a traceback of its own polling code, and warns as it
    # stops the others; the worker's own traceback and a line naming the rank are printed below.
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Each worker's CPU threads get their share of the cores, as torchrun gives them: N processes
    # of all-cores thread pools on the same cores slow each other down. A value set is kept.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // device_cfg.count)))
    threads = int(os.environ["OMP_NUM_THREADS"])
    try:
        results = elastic_launch(config, _with_threads)(threads, worker, *args)
    except ChildFailedError as error:
        raise _group_failure(error) from None
    except SignalException as error:  # this process was signalled; the agent passed it on
        raise Stopped(f"stopped by {signal.Signals(error.sigval).name}: the training processes "
                      "saved last.pt (the resume command is printed above)") from None
    finally:
        files.cleanup()
    return results.get(0)
