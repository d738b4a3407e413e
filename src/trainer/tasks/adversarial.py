from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data import DataSpec, Split
from trainer.tasks.base import Task, as_count, mean_of


class Adversarial(Task):
    """A GAN: the discriminator's step, then the generator's (non-saturating loss).

    Evaluation scores real images against fakes from a fixed latent seed, so a checkpoint's test
    metrics are reproducible.
    """

    monitor = None  # no loss says which GAN checkpoint is best: best.pt is the latest
    use_command = "predict run_dir=RUN count=64"  # samples, and a grid of them
    samples = 64
    stages = ("d_", "g_")  # train/d_grad_norm, train/g_grad_norm

    served_input = "latent vectors drawn from a standard normal distribution"
    served_scores = False
    served_output = "generated images in [-1, 1] (pixel = (x + 1) * 127.5), channels first"

    def model_sizes(self, spec: DataSpec) -> dict[str, Any]:
        return {"in_shape": spec.in_shape}

    def param_groups(self, model: nn.Module) -> list[list[dict[str, Any]]]:
        """Discriminator, then generator; both with Adam's beta1 at 0.5, as GANs need since
        DCGAN (Radford et al., 2015): the default 0.9 lets the discriminator win and G collapse.
        This overrides optimizer.betas for the GAN."""
        return [[{"params": list(net.parameters()), "betas": (0.5, 0.999)}]
                for net in (model.discriminator, model.generator)]

    def distribute(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> Any:
        """Each network wrapped on its own, so a step runs one forward through each wrapper."""
        networks = SimpleNamespace(generator=wrap(model.generator),
                                   discriminator=wrap(model.discriminator),
                                   sample_latent=model.sample_latent)
        if hasattr(networks.generator, "no_sync"):
            networks.no_sync = lambda: _both(networks.generator.no_sync(),
                                             networks.discriminator.no_sync())
        return networks

    def training_step(self, model: Any, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        real = batch[0]
        latent = model.sample_latent(len(real))
        if stage == 0:
            with torch.no_grad():
                fake = model.generator(latent)
            scores = _scores(model, real, fake)
            return scores["d_loss"], {k: scores[k] for k in ("d_loss", "d_real", "d_fake")}
        fake_logits = model.discriminator(model.generator(latent))
        g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        return g_loss, {"g_loss": g_loss}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        real = batch[0]
        seeded = torch.Generator(device=real.device).manual_seed(0)
        fake = model.generator(model.sample_latent(len(real), seeded))
        scores = _scores(model, real, fake)
        return {**{k: v * len(real) for k, v in scores.items()},
                "count": as_count(len(real), real)}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        metrics = mean_of(totals, "d_loss", "g_loss", "d_real", "d_fake")
        return {"loss": metrics["d_loss"] + metrics["g_loss"], **metrics}

    def show(self, model: nn.Module, split: Split, logger: Any, step: int) -> None:
        seeded = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
        with torch.no_grad():
            images = model.generator(model.sample_latent(self.samples, seeded))
        logger.images("samples/generated", images, step)

    def served(self, model: nn.Module, split: Split, count: int) -> tuple[nn.Module, Tensor]:
        """The generator alone, and seeded latent vectors."""
        seeded = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
        return model.generator, model.sample_latent(count, seeded)


@contextlib.contextmanager
def _both(first: AbstractContextManager, second: AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


def _scores(model: Any, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
    """Discriminator loss on a real and a fake batch, the generator's loss, and D's mean beliefs.

    One discriminator call on both batches: a DDP-wrapped module runs one forward per backward.
    """
    real_logits, fake_logits = model.discriminator(torch.cat([real, fake])).split(len(real))
    ones, zeros = torch.ones_like(real_logits), torch.zeros_like(fake_logits)
    d_loss = F.binary_cross_entropy_with_logits(real_logits, ones) + \
        F.binary_cross_entropy_with_logits(fake_logits, zeros)
    g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    return {"d_loss": d_loss, "g_loss": g_loss, "d_real": torch.sigmoid(real_logits).mean(),
            "d_fake": torch.sigmoid(fake_logits).mean()}
