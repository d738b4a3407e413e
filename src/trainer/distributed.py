"""Which device and process this is: device choice, precision, rank helpers and reductions.

Every write in the project is guarded by `Runtime.is_main`, and every data selection takes
`rank` and `world`, so a single process is simply the world of one.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from trainer.errors import UserError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str = "32"
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def sum_across_ranks(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Add up per-rank totals (one collective for all keys) and bring them to the host."""
        keys = sorted(totals)
        stacked = torch.stack([totals[k].detach().double() for k in keys])
        if self.world > 1:
            dist.all_reduce(stacked)
        return dict(zip(keys, stacked.tolist(), strict=True))


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """auto: cuda, then mps, then cpu. An explicit device that is absent is a user error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if kind == "auto":
        kind = "cuda" if cuda else "mps" if mps else "cpu"
    if kind == "cuda" and not cuda:
        raise UserError("device=cuda but no CUDA device is available here "
                        "(torch.cuda.is_available() is False): use device=cpu or device=auto")
    if kind == "mps" and not mps:
        raise UserError("device=mps but Apple's MPS backend is not available here: "
                        "use device=cpu or device=auto")
    if kind == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(kind)


def runtime(device_cfg: DictConfig) -> Runtime:
    if device_cfg.count * device_cfg.nodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"device.count={device_cfg.count} device.nodes={device_cfg.nodes}: "
                        "multi-process training is not available in this version; use "
                        "device.count=1")
    device = resolve_device(device_cfg.type)
    return Runtime(device, str(device_cfg.precision))
