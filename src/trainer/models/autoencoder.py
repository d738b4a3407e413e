from __future__ import annotations

import math

from torch import Tensor, nn


def mlp(sizes: list[int], activation: nn.Module) -> list[nn.Module]:
    """Linear layers through `sizes`, with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for inputs, outputs in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(inputs, outputs), activation]
    return layers[:-1]


class Autoencoder(nn.Module):
    """An MLP encoder to `latent_dim` numbers and a mirrored decoder back to the image."""

    def __init__(self, in_shape: tuple[int, int, int], width: int = 256, depth: int = 2,
                 latent_dim: int = 16) -> None:
        super().__init__()
        pixels = math.prod(in_shape)
        hidden = [width] * depth
        self.encoder = nn.Sequential(nn.Flatten(), *mlp([pixels, *hidden, latent_dim], nn.ReLU()))
        self.decoder = nn.Sequential(*mlp([latent_dim, *hidden, pixels], nn.ReLU()), nn.Tanh(),
                                     nn.Unflatten(1, tuple(in_shape)))

    def forward(self, images: Tensor) -> Tensor:
        return self.decoder(self.encoder(images))
