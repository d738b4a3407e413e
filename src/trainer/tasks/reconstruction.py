from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from trainer.data import DataSpec, Split
from trainer.models.autoencoder import kl_divergence
from trainer.tasks.base import Task, as_count, mean_of


class Reconstruction(Task):
    """An autoencoder: mean squared error between an image and its reconstruction. For a VAE
    the loss is the negative ELBO per pixel, mse + kl / pixels (a Gaussian decoder of fixed
    variance), with the KL divergence from the prior (nats per image) reported as */kl."""

    monitor = ("val/loss", "min")
    shown = 16

    served_output = "reconstructed images in [-1, 1], the input's shape"
    served_scores = False

    def model_sizes(self, spec: DataSpec) -> dict[str, Any]:
        return {"in_shape": spec.in_shape}

    def build_model(self, cfg: DictConfig, spec: DataSpec) -> nn.Module:
        self.pixels = math.prod(spec.in_shape)
        return super().build_model(cfg, spec)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch[0]
        output = model(images)
        if isinstance(output, tuple):  # a VAE in training: the sample's image and its KL
            reconstruction, kl = output[0], output[1].mean()
            mse = F.mse_loss(reconstruction, images)
            return mse + kl / self.pixels, {"mse": mse, "kl": kl}
        mse = F.mse_loss(output, images)
        return mse, {"mse": mse}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images = batch[0]
        per_image = (model(images).float() - images).pow(2).flatten(1).mean(1)
        sums = {"mse": per_image.sum(), "count": as_count(len(images), images)}
        if model.variational:
            mean, log_var = model.encode(images)
            sums["kl"] = kl_divergence(mean.float(), log_var.float()).sum()
        return sums

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        if "kl" not in totals:
            metrics = mean_of(totals, "mse")
            return {"loss": metrics["mse"], **metrics}
        metrics = mean_of(totals, "mse", "kl")
        return {"loss": metrics["mse"] + metrics["kl"] / self.pixels, **metrics}

    def show(self, model: nn.Module, split: Split, logger: Any, step: int) -> None:
        """Inputs in the top row, their reconstructions beneath; for a VAE also images decoded
        from a fixed draw of the prior."""
        device = next(model.parameters()).device
        index = torch.arange(min(self.shown, len(split)), device=device)
        images = split.batch(index)[0]
        with torch.no_grad():
            reconstructions = model(images)
            logger.images("samples/reconstruction", torch.cat([images, reconstructions]), step,
                          per_row=len(images))
            if model.variational:
                seeded = torch.Generator(device=device).manual_seed(0)
                prior = torch.randn(64, model.latent_dim, device=device, generator=seeded)
                logger.images("samples/prior", model.decoder(prior), step)
