"""`evaluate run_dir=GAN fid_features=CLASSIFIER`: the Frechet distance between the GAN's
samples and the real images of a split (test, or val), in the feature space of a classifier
trained on the same data.

FID proper uses an Inception network's features; offline there are no Inception weights, so the
features are the input of the named classifier run's last linear layer (a CNN's 128 hidden units,
say). The figure compares GANs scored with the same classifier, not with published FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.errors import UserError
from trainer.tasks.classification import Classification

BATCH = 256


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of two (N, D) feature sets, in
    float64; the trace of the matrix square root comes from the eigenvalues of
    S_r^(1/2) S_f S_r^(1/2), which are those of S_r S_f."""
    real, fake = real.double(), fake.double()
    mean_r, mean_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    values, vectors = torch.linalg.eigh(cov_r)
    root_r = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_r @ cov_f @ root_r).clamp(min=0).sqrt().sum()
    distance = (mean_r - mean_f).pow(2).sum() + cov_r.trace() + cov_f.trace() - 2 * cross
    return float(distance.clamp(min=0))


@torch.no_grad()
def gan_fid(s: Any, classifier: Any, features_run: str, split: str = "test",
            seed: int = 0) -> float:
    """FID of the GAN in Setup `s` against the images of its `split`, in the feature space of
    `classifier` (the restored run `features_run`): as many seeded samples as the split has
    images."""
    if classifier.spec.in_shape != s.data.spec.in_shape or \
            not isinstance(classifier.task, Classification):
        raise UserError(f"fid_features={features_run} is not a classifier of "
                        f"{list(s.data.spec.in_shape)} images: give the run directory of a cnn "
                        "trained on the GAN's data")
    extract = _penultimate(classifier.model.eval())
    real_images = getattr(s.data, split)
    count = len(real_images)
    real = torch.cat([extract(real_images.batch(torch.arange(i, min(i + BATCH, count),
                                                             device=s.rt.device))[0])
                      for i in range(0, count, BATCH)])
    seeded = torch.Generator(device=s.rt.device).manual_seed(seed)
    generator = s.model.eval().generator
    fake = torch.cat([extract(generator(s.model.sample_latent(min(BATCH, count - i), seeded)))
                      for i in range(0, count, BATCH)])
    return frechet_distance(real.cpu(), fake.cpu())


def _penultimate(model: nn.Module) -> Any:
    """A function giving the input of the model's last Linear layer for a batch of images."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[Tensor] = []
    last.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))

    def extract(images: Tensor) -> Tensor:
        seen.clear()
        model(images)
        return seen[0].flatten(1).float()

    return extract


def check_run(path: str) -> str:
    if not (Path(path) / "checkpoints" / "best.pt").is_file():
        raise UserError(f"fid_features={path!r} is not a run directory with "
                        "checkpoints/best.pt: give the run of a classifier on the GAN's data")
    return path
