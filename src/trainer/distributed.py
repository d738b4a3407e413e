"""Which device and process this is: the device, precision and process group of a run.

- `trainer.launcher` starts `device.count` worker processes; each calls `runtime` here.
- Under an external `torchrun` or `srun`, every process runs `train`; rank 0 owns the run
  directory and `Runtime.share` hands its path to the others.
- Every write in the project is guarded by `Runtime.is_main`, and every data selection takes
  `rank` and `world`, so a single process is simply a world of one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from trainer.errors import UserError
from trainer.ranks import in_process_group

log = logging.getLogger("trainer")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str = "32"
    rank: int = 0
    world: int = 1
    strategy: str = "ddp"
    sync_batchnorm: bool = False
    control: Any = None  # a gloo group for host-side agreements (any_rank)
    precision_chosen: str = "set"  # why this precision: set in the config, or auto's reason

    def close(self) -> None:
        """Leave the process group once the run is done, so its gloo threads are joined before
        the interpreter exits (left alive, one was seen to abort a rank at exit)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def skip_grad_sync(self, model: Any, skip: bool) -> AbstractContextManager:
        """DDP's no_sync for all but the last micro-batch of an accumulated step (a task that
        wraps several networks gives its namespace a no_sync of its own)."""
        no_sync = getattr(model, "no_sync", None)
        return no_sync() if skip and no_sync is not None else contextlib.nullcontext()

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module that the training step calls: DDP-wrapped when there are several ranks."""
        if self.world == 1 or self.strategy == "fsdp":  # FSDP wraps in place: see shard
            return module
        if self.sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world > 1

    def shard(self, model: nn.Module) -> None:
        """device.strategy=fsdp: FSDP2 shards the model in place, unit by unit: each transformer
        block, or else each child module (so a GAN's generator and discriminator can be called
        on their own), then the root.

        Call before the optimizers exist: they must hold the sharded parameters.
        """
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        blocks = getattr(model, "blocks", None)
        blocks = list(blocks) if isinstance(blocks, nn.ModuleList) else []
        for unit in blocks or [c for c in model.children() if any(True for _ in c.parameters())]:
            fully_shard(unit)
        fully_shard(model)

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The whole model's state dict; gathered from the shards (on every rank) under FSDP."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state())

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state())

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not self.sharded:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_state(offload=False))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_full_state(offload=False))

    def sum_across_ranks(self, totals: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Add up per-rank totals (one collective for all keys) and bring them to the host:
        scalars as floats, larger totals (a confusion matrix) as tensors."""
        keys = sorted(totals)
        parts = [torch.as_tensor(totals[k]).detach().double() for k in keys]
        flat = torch.cat([part.reshape(-1) for part in parts])
        if self.world > 1:
            flat = flat.to(self.device)  # nccl reduces device tensors, gloo host ones
            dist.all_reduce(flat)
        summed = flat.cpu().split([part.numel() for part in parts])
        return {key: value.item() if part.ndim == 0 else value.view(part.shape)
                for key, value, part in zip(keys, summed, parts, strict=True)}

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank. Over a gloo group of host tensors, so
        asking every step costs no device sync."""
        if self.world == 1:
            return list(flags)
        if self.control is None:
            self.control = dist.new_group(backend="gloo")
        values = torch.tensor(flags, dtype=torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in values.tolist()]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order (on every rank)."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _full_state(offload: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload)


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """auto: cuda, then mps, then cpu. An explicit device that is absent is a user error."""
    if kind == "cpu":  # CUDA untouched: a process forked for the CPU must not initialise it
        return torch.device("cpu")
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


def memory_format(setting: bool | str, rt: Runtime, model: nn.Module) -> torch.memory_format:
    """device.channels_last: `auto` is channels-last for a model with 2-d convolutions on CUDA or
    the CPU, where cuDNN and oneDNN run them faster in that layout (the ResNet preset's step:
    1.25-1.3x in float32 and in bf16 on a 2-core CPU; BENCHMARKS.md), unless FSDP shards it:
    FSDP2 takes contiguous parameters only. A convolution whose weight is channels-last makes its
    output so, so the inputs need no change."""
    wanted = str(setting).lower() == "true"
    if setting == "auto":
        convolutional = any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())
        wanted = convolutional and rt.device.type in ("cuda", "cpu") and not rt.sharded
    return torch.channels_last if wanted else torch.contiguous_format


# One training step of the ResNet preset in bf16 against float32, on a CPU kept to AVX2 kernels
# (no bf16 instructions; BENCHMARKS.md): what an explicit bf16 costs there.
EMULATED_BF16_SLOWDOWN = "3-4x"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX, the instructions oneDNN runs bf16 matmuls and convolutions on; without
    them autocast emulates bf16, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, since 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision to train in, and why: device.precision=auto is bf16 autocast on GPUs with
    bf16 tensor cores (Ampere and later), 16 (with a gradient scaler) on older GPUs, bf16 on CPUs
    with bf16 instructions, 32 elsewhere."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("device.precision=bf16 on a CPU without bf16 instructions (AVX-512 BF16 "
                        "or AMX): autocast emulates it, %s slower than 32 for the ResNet preset; "
                        "device.precision=auto picks 32 here", EMULATED_BF16_SLOWDOWN)
        return precision, "set"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "auto: this GPU has bf16 tensor cores"
        return "16", "auto: this GPU has no bf16 tensor cores"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "auto: this CPU has bf16 instructions"
    return "32", f"auto: {'this CPU has no bf16 instructions' if device.type == 'cpu' else 'mps'}"


def enable_tf32() -> None:
    """float32 matmuls that stay in float32 (outside autocast, or all of them with precision 32)
    run on TensorFloat-32 tensor cores: 10-bit mantissa inputs, float32 sums, several times the
    float32 rate; Lightning, torchtitan and nanoGPT train so. cuDNN's convolutions already do by
    default. The legacy call, not `torch.backends.cuda.matmul.fp32_precision`: once that is set,
    torch.get_float32_matmul_precision() raises, and torch.compile's inductor calls it."""
    torch.set_float32_matmul_precision("high")


def runtime(device_cfg: DictConfig) -> Runtime:
    """This process's device and place in the group, joining the group when there is one."""
    options = {"strategy": device_cfg.strategy, "sync_batchnorm": device_cfg.sync_batchnorm}
    device = resolve_device(device_cfg.type, int(os.environ.get("LOCAL_RANK", "0")))
    precision, chosen = resolve_precision(str(device_cfg.precision), device)
    if device.type == "cuda":
        enable_tf32()
    if device.type == "cuda" and device_cfg.count > torch.cuda.device_count():
        raise UserError(f"device.count={device_cfg.count} but this node has "
                        f"{torch.cuda.device_count()} CUDA device(s): one process per GPU")
    if device_cfg.sync_batchnorm and device.type != "cuda":
        raise UserError(f"device.sync_batchnorm=true needs CUDA (SyncBatchNorm runs on GPUs "
                        f"only), and this run is on {device.type}: use device=cuda or drop it")
    if not in_process_group():
        return Runtime(device, precision, precision_chosen=chosen, **options)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=device_cfg.timeout_s))
    return Runtime(device, precision, dist.get_rank(), dist.get_world_size(),
                   precision_chosen=chosen, **options)
