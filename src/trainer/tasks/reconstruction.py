from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data import DataSpec, Split
from trainer.tasks import Task, as_count, mean_of


class Reconstruction(Task):
    """An autoencoder: mean squared error between an image and its reconstruction."""

    monitor = ("val/mse", "min")
    shown = 16

    served_output = "reconstructed images in [-1, 1], the input's shape"

    def model_sizes(self, spec: DataSpec) -> dict[str, Any]:
        return {"in_shape": spec.in_shape}

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch[0]
        mse = F.mse_loss(model(images), images)
        return mse, {"mse": mse}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images = batch[0]
        per_image = (model(images).float() - images).pow(2).flatten(1).mean(1)
        return {"mse": per_image.sum(), "count": as_count(len(images), images)}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        metrics = mean_of(totals, "mse")
        return {"loss": metrics["mse"], **metrics}

    def show(self, model: nn.Module, split: Split, logger: Any, step: int) -> None:
        """Inputs in the top row, their reconstructions beneath."""
        index = torch.arange(min(self.shown, len(split)), device=next(model.parameters()).device)
        images = split.batch(index)[0]
        with torch.no_grad():
            reconstructions = model(images)
        logger.images("samples/reconstruction", torch.cat([images, reconstructions]), step,
                      per_row=len(images))
