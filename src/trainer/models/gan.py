from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GAN(nn.Module):
    """A generator and a discriminator, two submodules of one module (one state_dict).

    Both are MLPs, so any image size works. Batch norm in the generator and dropout in the
    discriminator keep the small GAN from collapsing onto a few modes.
    """

    def __init__(self, in_shape: tuple[int, int, int], width: int = 256, depth: int = 2,
                 latent_dim: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        pixels = math.prod(in_shape)
        self.in_shape, self.latent_dim = tuple(in_shape), latent_dim
        generator: list[nn.Module] = []
        discriminator: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            generator += [nn.Linear(latent_dim if i == 0 else width, width),
                          nn.BatchNorm1d(width), nn.LeakyReLU(0.2)]
            discriminator += [nn.Linear(pixels if i == 0 else width, width), nn.LeakyReLU(0.2),
                              nn.Dropout(dropout)]
        self.generator = nn.Sequential(*generator, nn.Linear(width, pixels), nn.Tanh(),
                                       nn.Unflatten(1, self.in_shape))
        self.discriminator = nn.Sequential(*discriminator, nn.Linear(width, 1), nn.Flatten(0))

    def sample_latent(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        device = next(self.parameters()).device
        return torch.randn(count, self.latent_dim, device=device, generator=generator)

    def forward(self, latent: Tensor) -> Tensor:
        return self.generator(latent)
