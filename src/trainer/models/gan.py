from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainer.errors import UserError


class GAN(nn.Module):
    """A generator and a discriminator, two submodules of one module (one state_dict).

    By default both are MLPs, so any image size works; batch norm in the generator and dropout
    in the discriminator keep the small GAN from collapsing onto a few modes. With `conv` they
    are DCGAN's (Radford et al., 2015): transposed convolutions with batch norm up from a small
    grid, strided convolutions with leaky ReLUs down, each doubling or halving the image
    (`width` channels next to the image, doubled per level). The discriminator has no batch
    norm, unlike DCGAN's: it scores real and fake images in one batch (one forward per backward,
    as DDP needs), whose mixed statistics would tell it which half is which; `spectral_norm`
    normalises its layers instead.
    """

    def __init__(self, in_shape: tuple[int, int, int], width: int = 256, depth: int = 2,
                 latent_dim: int = 32, dropout: float = 0.3, conv: bool = False,
                 spectral_norm: bool = False) -> None:
        super().__init__()
        self.in_shape, self.latent_dim = tuple(in_shape), latent_dim
        if conv:
            self.generator, self.discriminator = _dcgan(self.in_shape, width, latent_dim,
                                                        spectral_norm)
            return
        pixels = math.prod(in_shape)
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


def _dcgan(in_shape: tuple[int, int, int], width: int, latent_dim: int, spectral: bool
           ) -> tuple[nn.Module, nn.Module]:
    """DCGAN's networks for this image shape: as many doublings as keep the starting grid at
    4 pixels or more (28: 7 -> 14 -> 28; 32: 4 -> 8 -> 16 -> 32)."""
    channels, height, width_px = in_shape
    levels = 0
    while all(s % 2 ** (levels + 1) == 0 and s >> (levels + 1) >= 4 for s in (height, width_px)):
        levels += 1
    if levels == 0:
        raise UserError(f"model.conv=true: a {height}x{width_px} image cannot be halved to a grid "
                        "of 4 pixels or more; use images of 8 pixels and up with even sides, "
                        "or model.conv=false (the MLP GAN)")
    sizes = [width * 2**i for i in range(levels)]  # channels next to the image first
    grid = (sizes[-1], height >> levels, width_px >> levels)
    norm = nn.utils.parametrizations.spectral_norm if spectral else (lambda layer: layer)
    up: list[nn.Module] = []
    down: list[nn.Module] = []
    for inner, outer in zip(sizes[::-1], [*sizes[::-1][1:], channels], strict=True):
        up += [nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1)]
        up += [nn.BatchNorm2d(outer), nn.ReLU()] if outer != channels else [nn.Tanh()]
    for outer, inner in zip([channels, *sizes[:-1]], sizes, strict=True):
        down += [norm(nn.Conv2d(outer, inner, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
    generator = nn.Sequential(nn.Linear(latent_dim, math.prod(grid)), nn.Unflatten(1, grid),
                              nn.BatchNorm2d(grid[0]), nn.ReLU(), *up)
    discriminator = nn.Sequential(*down, nn.Flatten(), norm(nn.Linear(math.prod(grid), 1)),
                                  nn.Flatten(0))
    return generator, discriminator
