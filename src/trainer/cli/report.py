"""A command's user error as one line on stderr and a non-zero exit, never a traceback (unless
HYDRA_FULL_ERROR=1); a run stopped by a signal as the command that resumes it."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from trainer.errors import UserError
from trainer.signals import Stopped, report_stopped

log = logging.getLogger("trainer")
# The user asked for full tracebacks (read before the commands set the variable for Hydra).
FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(error: UserError, status: int = 2) -> None:
    if FULL_ERROR:
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(status)


def reporting_errors(job: Callable[[], Any]) -> Any:
    """Run a job; a UserError becomes one line on stderr and exit status 2, a run stopped by a
    signal the resume command and STOPPED_EXIT."""
    try:
        return job()
    except UserError as error:
        log.debug("user error", exc_info=True)
        fail(error)
    except Stopped as stopped:
        report_stopped(stopped)
