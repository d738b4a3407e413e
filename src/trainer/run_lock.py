"""One writer per run directory: the process that trains a run holds an OS lock (flock) on
RUN/.lock for the run's whole life, and records there who it is (pid, host, since when).

The kernel drops the lock when the process ends, however it ends (kill -9 included), so a lock
is never stale; the file stays, and what it records counts only while the lock is held. Readers
(evaluate, predict, generate, export-model, TensorBoard) take no lock. A leaf: nothing from
trainer but errors.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from trainer.errors import UserError

LOCK = ".lock"
log = logging.getLogger("trainer")
_held: dict[Path, int] = {}  # the run directories this process holds: their lock's descriptor


class RunHeld(UserError):
    """Another process is training the run directory."""


def holder(run_dir: Path) -> str | None:
    """Who trains `run_dir` ("pid 4242 on host gpu1 since 2026-11-28 17:03:12"), or None when
    nobody does (or this process does). Reads only: it creates and changes nothing."""
    key = Path(run_dir).resolve()
    if key in _held:
        return None
    try:
        fd = os.open(key / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: no trainer has trained here
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared probe: readers never collide
    except BlockingIOError:
        return _described(os.pread(fd, 4096, 0))
    except OSError:  # a filesystem without locks: nothing to learn here
        return None
    finally:
        os.close(fd)  # closing drops the probe's own shared lock
    return None


def acquire(run_dir: Path) -> None:
    """Hold `run_dir`'s lock until `release` or the end of this process; RunHeld when another
    process holds it (and then nothing in the folder is changed). Taking it again is a no-op."""
    key = Path(run_dir).resolve()
    if key in _held:
        return
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _described(os.pread(fd, 4096, 0))
        os.close(fd)
        raise RunHeld(refusal(run_dir, who)) from None
    except OSError as error:  # such as an NFS mount without lock support: train unguarded
        log.warning("%s cannot be locked (%s): nothing stops a second train from writing this "
                    "run beside this one", key / LOCK, error.strerror or error)
        os.close(fd)
        return
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now().isoformat(sep=" ", timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[key] = fd


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # the kernel drops the lock with the last descriptor of the open file


@contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """The lock on `run_dir` for the block, taken here or before it (a check before the run
    started may have taken it), and released after it."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def descriptor(run_dir: Path) -> int | None:
    """The open lock file of a run this process holds: a child handed it (pass_fds) holds the
    lock with this process, so the run stays guarded while either lives."""
    return _held.get(Path(run_dir).resolve())


def refusal(run_dir: Path, who: str) -> str:
    """The one line for a second writer."""
    pid = who.split()[1] if who.startswith("pid ") else "PID"
    return (f"{run_dir} is being trained by {who}: one process trains a run at a time; wait "
            f"for it to end, or stop it there with kill -TERM {pid} (it saves last.pt), then "
            "resume. evaluate, predict, generate and export-model can read the run meanwhile")


def _described(recorded: bytes) -> str:
    try:
        record = json.loads(recorded)
        return f"pid {record['pid']} on host {record['host']} since {record['since']}"
    except (ValueError, KeyError, TypeError):  # caught between truncating and writing
        return "another process (it has not yet recorded its pid)"
