"""The task interface: what every family (classification, language model, adversarial,
reconstruction) does its own way, with the defaults they share. Its own module so that the
registry (tasks/__init__.py) imports the families, and the families import only this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from trainer.data import DataSpec, Split
from trainer.targets import instantiate


class Task:
    """Defaults shared by every family; each family overrides what differs."""

    monitor: tuple[str, str] | None = ("val/loss", "min")  # best.pt; None keeps the latest
    unit = "samples"  # what perf/<unit>_per_s counts
    stages = ("",)  # each optimizer's prefix for its train/ scalars, such as train/grad_norm

    # What an exported model takes and gives (export.json says it to the serving side).
    served_input = "images scaled to [-1, 1] (pixel / 127.5 - 1), channels first"
    served_output = "class scores (logits), in the order of `classes`"
    served_scores = True  # the output's last dimension scores choices (its argmax is the answer)
    note: str | None = None  # what the task fitted to the data, said before the first step
    # How a finished run is put to use (its directory for RUN), said when training ends.
    use_command = "predict run_dir=RUN inputs=IMAGES"

    def model_sizes(self, spec: DataSpec) -> dict[str, Any]:
        """What the model takes from the data, beside its own config."""
        return {"in_shape": spec.in_shape, "num_classes": spec.num_classes}

    def build_model(self, cfg: DictConfig, spec: DataSpec) -> nn.Module:
        return instantiate(cfg, **self.model_sizes(spec))

    def fit_to_data(self, model: nn.Module, train: Split) -> None:
        """Set what the model initialises from the training data, before a fresh run's first
        step (a resumed run's checkpoint holds it). Nothing by default."""

    def fit_loss_to_data(self, train: Split, device: torch.device) -> None:
        """Set what the training loss takes from the training data, for every run, fresh or
        resumed (a checkpoint holds weights, not the task). Nothing by default."""

    def param_groups(self, model: nn.Module) -> list[list[Any]]:
        """The parameters (or param-group dicts) of each optimizer, in the order their steps run."""
        return [list(model.parameters())]

    def distribute(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> Any:
        """What `training_step` is given: the model with `wrap` (DDP) applied to what it calls."""
        return wrap(model)

    def training_step(self, model: Any, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss that optimizer `stage` minimises, and extra train/ scalars."""
        raise NotImplementedError

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Totals over the batch (sums and a count), so batches and ranks add up exactly."""
        raise NotImplementedError

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def report(self, totals: dict[str, Any], spec: DataSpec) -> str | None:
        """A table a user reads beside the test metrics (a classifier's classes, worst first),
        from the summed totals of `eval_step`. None by default."""
        return None

    def count(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[1].numel() if self.unit == "tokens" else len(batch[1])

    def show(self, model: nn.Module, split: Split, logger: Any, step: int) -> None:
        """Log what a user looks at rather than reads (images, text). Nothing by default."""

    def served(self, model: nn.Module, split: Split, count: int) -> tuple[nn.Module, Tensor]:
        """What `export` writes: the module a serving stack runs, and `count` of its inputs (the
        first test inputs) to trace it with and check the exported copy against."""
        index = torch.arange(min(count, len(split)), device=next(model.parameters()).device)
        return model, split.batch(index)[0]


def mean_of(totals: dict[str, float], *keys: str) -> dict[str, float]:
    return {key: totals[key] / totals["count"] for key in keys}


def as_count(batch_size: int, like: Tensor) -> Tensor:
    return torch.tensor(float(batch_size), device=like.device)
