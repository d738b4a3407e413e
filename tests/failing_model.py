"""Models that fail on purpose. CrashingCNN crashes at its third training step where the CRASH
environment variable says: for the failing-rank, killed-rank and failing-sweep-job tests.

CRASH is a comma-separated list of WHO:HOW. WHO is `rank1` (the process of rank 1) or `seed3`
(a run with seed=3); HOW is `raise` (a RuntimeError), `raise_abort` (the same, then the process
aborts as it exits, as a C++ thread torn down at exit can make it), `oom` (torch's
OutOfMemoryError, worded as CUDA words it), `oom_eval` (the same, in evaluation, at once) or
`kill` (SIGKILL, as the out-of-memory killer does). Loaded by the `train` command through
`model._target_=failing_model.CrashingCNN` with this folder on PYTHONPATH
(conftest.FAILING_MODELS).
"""

from __future__ import annotations

import multiprocessing.util
import os
import signal

import torch

from trainer.models.cnn import CNN

# What CUDA's caching allocator says when it runs out (torch 2.14).
CUDA_OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                      "of 79.15 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this "
                      "process has 78.08 GiB memory in use.")


class CrashingCNN(CNN):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The loop seeds torch with cfg.seed just before it builds the model.
        here = {f"rank{os.environ.get('RANK', '0')}", f"seed{torch.initial_seed()}"}
        plan = dict(item.split(":") for item in os.environ.get("CRASH", "").split(",") if item)
        self.crash = next((how for who, how in plan.items() if who in here), None)
        self.calls = 0

    def forward(self, images):
        if not self.training and self.crash == "oom_eval":
            raise torch.OutOfMemoryError(CUDA_OUT_OF_MEMORY)
        if self.training and self.crash:
            self.calls += 1
            if self.calls == 3 and self.crash in ("raise", "raise_abort"):
                if self.crash == "raise_abort":  # at exit, forked or spawned or neither
                    multiprocessing.util.Finalize(None, os.abort, exitpriority=0)
                raise RuntimeError("deliberate failure")
            if self.calls == 3 and self.crash == "oom":
                raise torch.OutOfMemoryError(CUDA_OUT_OF_MEMORY)
            if self.calls == 3 and self.crash == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(images)


class UnexportableCNN(CNN):
    """A CNN whose forward branches on its input's values: torch.export cannot trace it."""

    def forward(self, images):
        if images.mean() > 10:  # never true for images in [-1, 1]: trains as a CNN
            images = -images
        return super().forward(images)
