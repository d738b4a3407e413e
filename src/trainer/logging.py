"""Where a run reports: TensorBoard (rank 0 only), sample files beside it, throughput meters,
progress bars and the run's log file. A leaf: it takes plain values (steps, scalars, paths, a
config), never the loop's state."""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger("trainer")
PROGRESS_DELAY = 1.0  # seconds long work runs before its progress bar shows


def progress_bar(total: int, unit: str, desc: str, shown: bool = True, **options: Any) -> tqdm:
    """A bar for long work beside the training loop's (decoding, tokenizing, evaluating): drawn
    on a terminal only, once the work has taken PROGRESS_DELAY, and gone when it is done."""
    return tqdm(total=total, unit=unit, desc=desc, delay=PROGRESS_DELAY, leave=False,
                disable=None if shown else True, **options)  # None: on a terminal


class TensorBoardLogger:
    """Scalars, image grids, text, the config and an hparams entry in `run_dir/<subdir>`.

    The newest image grid and text sample are also written to `run_dir/samples/`, for a look
    without starting TensorBoard.
    """

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard", name: str | None = None,
                 purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        log_dir = self.run_dir / subdir / name if name else self.run_dir / subdir
        # purge_step hides events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step or None)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, tag: str, images: Tensor, step: int, per_row: int = 8) -> None:
        """Images in [-1, 1], shown as one grid."""
        from torchvision.utils import save_image

        pixels = grid(images, per_row)
        self.writer.add_image(tag, pixels, step)
        save_image(pixels, self._sample_path(tag, ".png"))

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, "```\n" + text + "\n```", step)  # markdown: keep line breaks
        self._sample_path(tag, ".txt").write_text(text, encoding="utf-8")

    def config(self, yaml: str) -> None:
        self.writer.add_text("config", "```yaml\n" + yaml + "\n```", 0)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """An HParams-dashboard entry; the metrics must also be logged as scalars in this run."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for event in hparams_summary(hparams, metrics):
            self.writer.file_writer.add_summary(event)

    def close(self) -> None:
        self.writer.close()

    def _sample_path(self, tag: str, suffix: str) -> Path:
        path = self.run_dir / "samples" / (tag.split("/")[-1] + suffix)
        path.parent.mkdir(exist_ok=True)
        return path


class Loggers:
    """Every logger the config names (`logger=[tensorboard,mlflow]`), each given every call;
    none at all for `logger=none` and on every rank but 0."""

    def __init__(self, loggers: list[Any] | None = None) -> None:
        self.loggers = loggers or []

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.scalars(metrics, step)

    def images(self, tag: str, images: Tensor, step: int, per_row: int = 8) -> None:
        for logger in self.loggers:
            logger.images(tag, images, step, per_row)

    def text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.text(tag, text, step)

    def config(self, yaml: str) -> None:
        for logger in self.loggers:
            logger.config(yaml)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.hparams(hparams, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(cfg: DictConfig, run_dir: Path, purge_step: int) -> Loggers:
    """The loggers of the `logger` group: one `_target_` node per chosen option."""
    from trainer.targets import instantiate

    nodes = [cfg] if "_target_" in cfg else list(cfg.values())  # a run of an older trainer
    return Loggers([instantiate(node, run_dir=run_dir, purge_step=purge_step) for node in nodes])


def grid(images: Tensor, per_row: int) -> Tensor:
    """Images in [-1, 1] as one (3, H, W) picture in [0, 1], a pixel of padding between."""
    from torchvision.utils import make_grid

    return make_grid(images.detach().float().cpu(), nrow=per_row, normalize=True,
                     value_range=(-1, 1), padding=1)


class Throughput:
    """perf/ scalars over the steps since the last report, counted across all ranks.

    Reported at log steps, right after the loss values came to the host, so the device has
    finished the steps timed. On a GPU, data_wait_pct times only the launch of the indexing.
    """

    def __init__(self, unit: str, device: torch.device, flops_per_item: float = 0.0,
                 world: int = 1) -> None:
        self.unit, self.device, self.world = unit, device, world
        self.flops_per_item = flops_per_item
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.samples, self.data_seconds = time.perf_counter(), 0, 0, 0.0

    def report(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rate = self.samples / seconds
        metrics = {f"perf/{self.unit}_per_s": rate,
                   "perf/step_ms": 1000 * seconds / max(self.steps, 1),
                   "perf/data_wait_pct": 100 * self.data_seconds / seconds,
                   "perf/peak_mem_mb": peak_memory_mb(self.device)}
        peak = peak_flops(self.device) * self.world
        if self.flops_per_item and peak:
            metrics["perf/mfu"] = self.flops_per_item * rate / peak
        self.reset()
        return metrics


class TimeEstimate:
    """One line after the first few steps: the time the steps left take at the pace measured, so
    that a run too long for this machine (a GPU preset on a CPU) says so at its start."""

    WARMUP, TIMED = 1, 5  # the first step allocates (and compiles); the next ones are timed
    WORTH_SAYING_S = 60.0

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.start, self.total, self.started_at = start_step, total_steps, 0.0

    def step(self, step: int) -> None:
        if step == self.start + self.WARMUP:
            self.started_at = time.perf_counter()
        elif step == self.start + self.WARMUP + self.TIMED:
            per_step = (time.perf_counter() - self.started_at) / self.TIMED
            left = (self.total - step) * per_step
            if left >= self.WORTH_SAYING_S:
                log.info("time: %.3g s a step over steps %d-%d, so about %s for the %s steps "
                         "left (validations add to it)", per_step, step - self.TIMED + 1, step,
                         duration(left), f"{self.total - step:,}")


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 0.9 s, 17 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float:
    """The GPU's peak FLOP/s when known; 0 on CPUs and unknown GPUs (then no MFU is logged)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), 0.0)


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The config flattened to dotted keys with TensorBoard-friendly values."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not str(key).startswith("_"):
                    walk(value, f"{prefix}{key}.")
        else:
            value = node if isinstance(node, (int, float, str, bool)) else str(node)
            flat[prefix[:-1]] = value

    container = OmegaConf.to_container(cfg, resolve=True)
    for group in ("model", "data", "optimizer", "scheduler", "trainer", "device"):
        walk(container[group], f"{group}.")
    flat["model"] = cfg.model._target_.rsplit(".", 1)[-1].lower()
    flat["seed"] = cfg.seed
    return flat


def shown(path: Path) -> Path:
    """`path` as a user would type it here: relative to the working directory when inside it."""
    path = path.resolve()
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def log_to_run_dir(run_dir: str, main: bool) -> None:
    """Logging in a launched worker, Hydra's set up or not: rank 0 also writes train.log."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main:
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log"))
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, handlers=handlers,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        force=True)  # a forked worker comes with its launcher's Hydra handlers
