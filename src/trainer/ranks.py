"""Which process this is in a group, from the environment that torchrun, srun or `launch` sets.

No torch here: the `train` command asks before it imports anything heavy.
"""

from __future__ import annotations

import os


def adopt_slurm_env() -> None:
    """Under `srun`, expose SLURM's task numbers under the names torch.distributed reads.

    MASTER_ADDR and MASTER_PORT must be set by the batch script (see scripts/slurm_train.sbatch).
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def in_process_group() -> bool:
    """True inside a group started by torchrun, srun or `launch`."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    adopt_slurm_env()
    return int(os.environ.get("RANK", "0"))
