"""What the training loop costs: for each architecture, `trainer`'s loop (`loop.fit`: progress
bar, logging to TensorBoard every `log_every` steps, throughput meters, the stop and checkpoint
checks) against a plain hand-written PyTorch loop over the same model, data, batches, batch size,
seed and thread count, in one process, alternating. Validation is left out of both: it is timed
apart in `fit` and subtracted (its cost is a matter of cadence, not of the loop).

    python scripts/benchmark.py [--steps 200] [--rounds 3] [--models cnn,rnn,...] [OVERRIDES...]

Prints samples (tokens, for text) per second of each (medians over the rounds), the median and
range of each round's ratio (trainer / plain: 1.00 means the loop costs nothing) and the peak
resident memory of each phase (sampled every 10 ms; on CUDA
the peak allocated memory). Target: 0.98 or better for every architecture.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from trainer.cli import CONFIG_DIR
from trainer.data import train_batches
from trainer.logging import build_loggers
from trainer.run import loop
from trainer.signals import StopRequest

MODELS = ["cnn", "rnn", "transformer", "gan", "autoencoder"]


class PeakMemory:
    """The peak resident set (MB) while the block runs: sampled from /proc every 10 ms on the
    CPU, torch's own peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._done = device, 0.0, threading.Event()

    def _sample(self) -> None:
        page_mb = 4096 / 2**20
        while not self._done.wait(0.01):
            resident = int(Path("/proc/self/statm").read_text().split()[1]) * page_mb
            self.peak = max(self.peak, resident)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._done.set()
            self._thread.join()


def per_batch(s: loop.Setup) -> int:
    """Samples (tokens, for text) in one training batch."""
    return s.task.count(s.data.train.batch(torch.arange(s.data.batch_size)))


def trainer_loop(cfg: Any, run_dir: Path) -> tuple[float, int, float]:
    """(seconds of training, samples, peak MB) of `loop.fit` for cfg.trainer.max_steps steps."""
    s = loop.build(cfg)
    run = loop.prepare(s, run_dir)
    run.logger = build_loggers(cfg.logger, run_dir, purge_step=1)
    in_validation = [0.0]
    real_validation = loop.validation

    def timed_validation(*args: Any) -> bool:
        start = time.perf_counter()
        try:
            return real_validation(*args)
        finally:
            in_validation[0] += time.perf_counter() - start

    loop.validation = timed_validation
    try:
        with PeakMemory(s.rt.device) as memory, StopRequest() as stop:
            start = time.perf_counter()
            loop.fit(run, stop)
            seconds = time.perf_counter() - start - in_validation[0]
    finally:
        loop.validation = real_validation
        run.logger.close()
    return seconds, run.progress.step * per_batch(s), memory.peak


def plain_loop(cfg: Any) -> tuple[float, int, float]:
    """The same steps written by hand: batches, forward, backward, clip, step; nothing else."""
    s = loop.build(cfg)
    task, model, data = s.task, s.model, s.data
    optimizers = [loop.call(loop.instantiate(cfg.optimizer), params)  # the same optimizer
                  for params in task.param_groups(model)]
    steps, epoch, done = cfg.trainer.max_steps, 0, 0
    with PeakMemory(s.rt.device) as memory:
        start = time.perf_counter()
        while done < steps:
            order = train_batches(len(data.train), data.batch_size, cfg.seed, epoch, 0, 1)
            for batch in data.train.stream(order[: steps - done], epoch):
                for stage, optimizer in enumerate(optimizers):
                    for each in optimizers:
                        each.zero_grad(set_to_none=True)
                    loss, _ = task.training_step(model, batch, stage)
                    loss.backward()
                    params = [p for group in optimizer.param_groups for p in group["params"]]
                    nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip)
                    optimizer.step()
                done += 1
            epoch += 1
        final = loss.item()  # wait for the last step, as the trainer's last log does
        seconds = time.perf_counter() - start
    del final
    return seconds, steps * per_batch(s), memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    print(f"{'model':12} {'trainer/s':>10} {'plain/s':>10} {'ratio':>6} {'range':>9} "
          f"{'trainer MB':>10} {'plain MB':>9}")
    for model in args.models.split(","):
        overrides = [f"model={model}", f"trainer.max_steps={args.steps}",
                     f"trainer.val_every={args.steps}", "trainer.eval_batches=1",
                     *args.overrides]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        rates: dict[str, list[float]] = {"trainer": [], "plain": []}
        peaks: dict[str, float] = {"trainer": 0.0, "plain": 0.0}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as run_dir:
                measured = {"trainer": trainer_loop(cfg, Path(run_dir)), "plain": plain_loop(cfg)}
            for name, (seconds, samples, peak) in measured.items():
                rates[name].append(samples / seconds)
                peaks[name] = max(peaks[name], peak)
        # Each round's ratio compares two runs made seconds apart: the machine's drift cancels.
        ratios = sorted(a / b for a, b in zip(rates["trainer"], rates["plain"], strict=True))
        mine, plain = statistics.median(rates["trainer"]), statistics.median(rates["plain"])
        print(f"{model:12} {mine:10.0f} {plain:10.0f} {statistics.median(ratios):6.3f} "
              f"{ratios[0]:.2f}-{ratios[-1]:.2f} {peaks['trainer']:10.0f} "
              f"{peaks['plain']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
