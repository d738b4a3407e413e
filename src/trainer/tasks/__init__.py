"""Per-family behaviour behind one small interface, and the model x data matrix that picks it.

A task builds its model from the data's spec, says which parameters each optimizer owns, computes
a training step's loss for each optimizer (a GAN has two: discriminator, then generator), sums an
evaluation batch into totals that add up across batches and ranks, and shows samples.

May import: models, data and the leaves; never run, use or cli.
"""

from __future__ import annotations

import re
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig

from trainer.data import KINDS, DataSpec, configured_kind
from trainer.errors import UserError
from trainer.models.autoencoder import Autoencoder
from trainer.models.cnn import CNN
from trainer.models.gan import GAN
from trainer.models.rnn import RNN
from trainer.models.transformer import Transformer
from trainer.tasks.adversarial import Adversarial
from trainer.tasks.base import Task, as_count, mean_of
from trainer.tasks.classification import Classification
from trainer.tasks.language_model import LanguageModel
from trainer.tasks.reconstruction import Reconstruction

__all__ = ["Task", "as_count", "mean_of", "task_class", "task_for", "check_pairing",
           "check_configured_pairing", "family_of"]


# trainer.* keys that only a classifier takes, and their defaults.
CLASSIFICATION_OPTIONS: dict[str, Any] = {"label_smoothing": 0.0, "class_weights": None}


def task_class(model_class: type, kind: str) -> type[Task] | None:
    """The model x data matrix: the task of this architecture on image or text data, if any."""

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


def check_configured_pairing(cfg: DictConfig) -> None:
    """`check_pairing` for a whole config, before its data is read: the data's kind is known from
    its config (not a Hugging Face set's, whose columns decide: `task_for` checks once read)."""
    kind = configured_kind(cfg.data)
    if kind:
        check_pairing(cfg.model, kind, cfg.data._target_.rsplit(".", 1)[-1])


def family_of(cfg: DictConfig) -> str:
    """The task a config trains (classification, language_model, adversarial, reconstruction),
    known before its data is read; the model's name where the data decides (Hugging Face)."""
    model_class = get_class(cfg.model._target_)
    kind = configured_kind(cfg.data)
    task = task_class(model_class, kind) if kind else None
    return re.sub(r"(?<!^)(?=[A-Z])", "_", (task or model_class).__name__).lower()


def _check_classes(model: str, spec: DataSpec) -> None:
    if spec.num_classes < 2:
        has = f"one class ({spec.classes[0]})" if spec.classes else "no classes (unlabelled images)"
        raise UserError(f"model={model.lower()} classifies images, but data={spec.name} has "
                        f"{has}: a classifier needs two or more (image_folder: a sub-folder of "
                        "images per class, DIR/cat/1.jpg, DIR/dog/2.jpg)")
