"""A sweep job in a process of its own, so that a job killed by the out-of-memory killer or
`kill -9` (or one that crashes in native code) fails alone and the sweep goes on.

The sweep's process runs `python -m trainer.run.job RUN_DIR OUTCOME` with the job's resolved config
on stdin. The child trains and writes ["completed", metrics], ["stopped", message] or
["failed", message] to OUTCOME; a child that dies before writing it was killed.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer import run_lock
from trainer.errors import UserError
from trainer.signals import Stopped, StopRequest

log = logging.getLogger("trainer")


def run_in_child(config: dict[str, Any], run_dir: Path) -> dict[str, float]:
    """Train `config` in `run_dir` in a child process; return its metrics. A SIGTERM or Ctrl-C
    to this process is passed on, so the child saves and stops as a run does (`Stopped` here).
    A failure in the child, or the child killed, is a UserError."""
    with tempfile.TemporaryDirectory() as scratch:
        outcome = Path(scratch) / "outcome.json"
        # The child shares this process's lock on run_dir: the run stays held while either lives.
        lock = run_lock.descriptor(run_dir)
        child = subprocess.Popen([sys.executable, "-m", "trainer.run.job", str(run_dir),
                                  str(outcome)], stdin=subprocess.PIPE, text=True,
                                 pass_fds=() if lock is None else (lock,))
        assert child.stdin is not None
        child.stdin.write(json.dumps(config))
        child.stdin.close()
        with StopRequest() as stop:
            passed_on = False
            while child.poll() is None:
                if stop.reason and not passed_on:
                    child.terminate()  # SIGTERM: the child finishes its step and saves
                    passed_on = True
                time.sleep(0.2)
        result = json.loads(outcome.read_text()) if outcome.is_file() else None
    if result is None:
        code = child.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
            f"exited with status {code}"
        raise UserError(f"the training process {how} before it finished (out of memory? "
                        "`kill -9`?); its checkpoints are kept, and resume=auto continues it")
    status, value = result
    if status == "stopped":
        raise Stopped(value)
    if status == "failed":
        raise UserError(value)  # the child logged it, with its traceback
    return value


def main() -> None:
    """The child: train, and write the outcome."""
    from trainer.logging import log_to_run_dir
    from trainer.run.loop import train

    run_dir, outcome = sys.argv[1:3]
    config = OmegaConf.create(json.load(sys.stdin))
    log_to_run_dir(run_dir, main=True)
    try:
        result: list[Any] = ["completed", train(config, Path(run_dir))]
    except Stopped as stopped:
        log.info("%s", stopped)
        result = ["stopped", str(stopped)]
    except Exception as error:  # noqa: BLE001 - reported to the sweep, which goes on
        log.error("job failed: %s", error, exc_info=not isinstance(error, UserError))
        result = ["failed", str(error) if isinstance(error, UserError)
                  else f"{type(error).__name__}: {error}"]
    Path(outcome).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
