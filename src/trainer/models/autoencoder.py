from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainer.errors import UserError


def mlp(sizes: list[int], activation: nn.Module) -> list[nn.Module]:
    """Linear layers through `sizes`, with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for inputs, outputs in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(inputs, outputs), activation]
    return layers[:-1]


class Autoencoder(nn.Module):
    """An encoder to `latent_dim` numbers and a mirrored decoder back to the image: MLPs, or
    with `conv` strided convolutions (each halving the image) and transposed ones.

    - `variational`: a VAE. The encoder gives a mean and a log-variance per latent number; in
      training the decoder gets a sample of them (reparameterised) and the forward pass also
      returns the KL divergence from the standard normal prior; in eval mode it decodes the
      mean, so reconstructions are deterministic.
    - `denoise`: in training, Gaussian noise of this standard deviation (in the [-1, 1] pixel
      scale) corrupts the input; the task still compares with the clean image.
    """

    def __init__(self, in_shape: tuple[int, int, int], width: int = 256, depth: int = 2,
                 latent_dim: int = 16, conv: bool = False, variational: bool = False,
                 denoise: float = 0.0) -> None:
        super().__init__()
        self.latent_dim, self.variational, self.denoise = latent_dim, variational, denoise
        codes = 2 * latent_dim if variational else latent_dim  # mean and log-variance
        if conv:
            self.encoder, self.decoder = _conv_pair(tuple(in_shape), width, depth, latent_dim,
                                                    codes)
        else:
            pixels, hidden = math.prod(in_shape), [width] * depth
            self.encoder = nn.Sequential(nn.Flatten(), *mlp([pixels, *hidden, codes], nn.ReLU()))
            self.decoder = nn.Sequential(*mlp([latent_dim, *hidden, pixels], nn.ReLU()),
                                         nn.Tanh(), nn.Unflatten(1, tuple(in_shape)))

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The latent code (a VAE's mean) and, for a VAE, the log-variance."""
        codes = self.encoder(images)
        if not self.variational:
            return codes, None
        mean, log_var = codes.chunk(2, dim=-1)
        return mean, log_var

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.training and self.denoise:
            images = images + self.denoise * torch.randn_like(images)
        mean, log_var = self.encode(images)
        if log_var is None or not self.training:
            return self.decoder(mean)
        latent = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return self.decoder(latent), kl_divergence(mean, log_var)


def kl_divergence(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)) per image, in nats: (B,)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(dim=-1)


def _conv_pair(in_shape: tuple[int, int, int], width: int, depth: int, latent_dim: int,
               codes: int) -> tuple[nn.Module, nn.Module]:
    channels, height, width_px = in_shape
    if height % 2**depth or width_px % 2**depth:
        raise UserError(f"model.depth={depth}: a convolutional autoencoder halves the image "
                        f"{depth} times, which {height}x{width_px} does not allow; use a depth "
                        f"whose 2**depth divides the image size, or model.conv=false")
    sizes = [channels] + [width * 2**i for i in range(depth)]
    down: list[nn.Module] = []
    up: list[nn.Module] = []
    for inputs, outputs in zip(sizes, sizes[1:], strict=False):
        down += [nn.Conv2d(inputs, outputs, 4, stride=2, padding=1), nn.BatchNorm2d(outputs),
                 nn.ReLU()]
        up = [nn.ConvTranspose2d(outputs, inputs, 4, stride=2, padding=1),
              nn.BatchNorm2d(inputs), nn.ReLU(), *up]
    grid = (sizes[-1], height >> depth, width_px >> depth)
    encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(math.prod(grid), codes))
    decoder = nn.Sequential(nn.Linear(latent_dim, math.prod(grid)), nn.Unflatten(1, grid),
                            *up[:-2], nn.Tanh())  # no norm or ReLU on the image itself
    return encoder, decoder
