"""Per-family behaviour behind one small interface, and the model x data matrix that picks it.

A task builds its model from the data's spec, says which parameters each optimizer owns, computes
a training step's loss for each optimizer (a GAN has two: discriminator, then generator), sums an
evaluation batch into totals that add up across batches and ranks, and shows samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import Tensor, nn

from trainer.data import KINDS, DataSpec, Split
from trainer.errors import UserError
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


# trainer.* keys that only a classifier takes, and their defaults.
CLASSIFICATION_OPTIONS: dict[str, Any] = {"label_smoothing": 0.0, "class_weights": None}


def task_class(model_class: type, kind: str) -> type[Task] | None:
    """The model x data matrix: the task of this architecture on image or text data, if any."""
    from trainer.models.autoencoder import Autoencoder
    from trainer.models.cnn import CNN
    from trainer.models.gan import GAN
    from trainer.models.rnn import RNN
    from trainer.models.transformer import Transformer
    from trainer.tasks.adversarial import Adversarial
    from trainer.tasks.classification import Classification
    from trainer.tasks.language_model import LanguageModel
    from trainer.tasks.reconstruction import Reconstruction

    matrix: dict[tuple[type, str], type[Task]] = {
        (CNN, "image"): Classification,
        (RNN, "image"): Classification,
        (RNN, "text"): LanguageModel,
        (Transformer, "image"): Classification,
        (Transformer, "text"): LanguageModel,
        (GAN, "image"): Adversarial,
        (Autoencoder, "image"): Reconstruction,
    }
    if kind not in KINDS:
        raise ValueError(f"unknown kind of data {kind!r}")
    return next((task for (known, on), task in matrix.items()
                 if issubclass(model_class, known) and on == kind), None)


def task_for(model_cfg: DictConfig, spec: DataSpec, trainer_cfg: Any = None) -> Task:
    """The task for this model and data, or a UserError naming the data the model accepts (or
    saying that a classification option of `trainer_cfg` does not apply)."""
    from trainer.tasks.classification import Classification

    model_class = check_pairing(model_cfg, spec.kind, spec.name)
    task = task_class(model_class, spec.kind)
    options = {key: (trainer_cfg or {}).get(key, default)
               for key, default in CLASSIFICATION_OPTIONS.items()}
    if task is Classification:
        _check_classes(model_class.__name__, spec)
        names = spec.classes or tuple(str(c) for c in range(spec.num_classes))
        return Classification(names, **options)
    for key, value in options.items():
        if value != CLASSIFICATION_OPTIONS[key]:
            default = {0.0: "0", None: "null"}[CLASSIFICATION_OPTIONS[key]]
            raise UserError(f"trainer.{key}={value} applies to classification only, and "
                            f"model={model_class.__name__.lower()} on {spec.kind} data is not "
                            f"a classifier: set it to {default}")
    return task()


def check_pairing(model_cfg: DictConfig, kind: str, data_name: str) -> type:
    """The model's class, if it trains on `kind` data; else a UserError naming the data it
    accepts. Asked before the data is read too (the data's kind is known from its config), so a
    mismatch costs no tokenizing or decoding."""
    model_class = get_class(model_cfg._target_)
    if task_class(model_class, kind):
        return model_class
    kinds = [k for k in KINDS if task_class(model_class, k)]
    if not kinds:
        raise UserError(f"model._target_={model_cfg._target_!r} is not a known architecture")
    accepted = {"image": "digits, mnist, fashion_mnist, cifar10, image_folder, hf with images",
                "text": "shakespeare, text, hf with text"}
    choices = "; ".join(accepted[k] for k in kinds)
    raise UserError(f"model={model_class.__name__.lower()} cannot train on {kind} data "
                    f"(data={data_name}); it accepts {' or '.join(kinds)} data: {choices}")


def _check_classes(model: str, spec: DataSpec) -> None:
    if spec.num_classes < 2:
        has = f"one class ({spec.classes[0]})" if spec.classes else "no classes (unlabelled images)"
        raise UserError(f"model={model.lower()} classifies images, but data={spec.name} has "
                        f"{has}: a classifier needs two or more (image_folder: a sub-folder of "
                        "images per class, DIR/cat/1.jpg, DIR/dog/2.jpg)")


def mean_of(totals: dict[str, float], *keys: str) -> dict[str, float]:
    return {key: totals[key] / totals["count"] for key in keys}


def as_count(batch_size: int, like: Tensor) -> Tensor:
    return torch.tensor(float(batch_size), device=like.device)
