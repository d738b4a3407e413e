"""Stopping cleanly on SIGTERM (a cluster's preemption, `scancel`) or a first Ctrl-C: the loop
finishes its optimizer step, saves last.pt, and exits with STOPPED_EXIT. A second Ctrl-C stops at
once."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

STOPPED_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped on request, resumable
log = logging.getLogger("trainer")


class Stopped(Exception):
    """Raised once the checkpoint of a run stopped by a signal is written; the message says how
    to resume."""

    @classmethod
    def at(cls, reason: str, step: int, run_dir: str) -> Stopped:
        return cls(f"stopped by {reason} at step {step}; checkpoints/last.pt is saved. Resume "
                   f"with: train resume={run_dir}")


class StopRequest:
    """A flag the signal handlers raise; the loop reads it between steps. Installed only on the
    main thread (Python delivers signals there); elsewhere it never rises."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.reason is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.reason = signal.Signals(number).name


def report_stopped(stopped: Exception) -> None:
    """A run stopped by a signal: the resume command in the log and on stderr, STOPPED_EXIT."""
    log.info("%s", stopped)
    print(stopped, file=sys.stderr)
    sys.exit(STOPPED_EXIT)
