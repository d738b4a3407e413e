"""What happens to an image batch on the device: uint8 to [-1, 1], then seeded augmentation.

Batches travel as uint8 (4x less to hold and to copy than float) and become floats where the model
runs. Augmentation works on the whole batch at once (one gather or one grid_sample), as airbench
does, and its random choices are a pure function of (seed, epoch, sample index): a resumed run
draws exactly what the uninterrupted one drew, and no two ranks share a draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK = 0xFFFFFFFF


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 pixels to floats in [-1, 1] (the range of the GAN's and autoencoder's tanh)."""
    return images.float().div_(127.5).sub_(1.0)


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (int64 tensors whose values stay below 2**32; no overflow)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    return x ^ (x >> 16)


def seeded_uniforms(seed: int, epoch: int, index: Tensor, count: int) -> Tensor:
    """(len(index), count) floats in [0, 1), each a function of (seed, epoch, index, column)
    alone: the same on every device and in every batch the sample lands in."""
    key = _mix(torch.tensor((seed * 0x9E3779B1 + epoch) & _MASK, device=index.device))
    base = _mix((index.long() * 0x27D4EB2F + key) & _MASK)
    columns = torch.arange(count, device=index.device) * 0x165667B1
    return _mix((base[:, None] + columns) & _MASK).float() / 2**32


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation of float image batches (N, C, H, W) in [-1, 1].

    - flip_crop: reflect-pad by 1/8 of the side, crop back at a random offset, flip half the
      images horizontally (the CIFAR recipe).
    - crop: the same shifts without the flip, for images a mirror changes (digits, letters).
    - random_resized_crop: a crop of 8-100% of the area with aspect ratio 3/4 to 4/3, resized back
      to the full size, flipped half the time (the ImageNet recipe).
    """

    kind: str
    seed: int

    def __call__(self, images: Tensor, index: Tensor, epoch: int) -> Tensor:
        draws = seeded_uniforms(self.seed, epoch, index.to(images.device), 5)
        if self.kind in ("flip_crop", "crop"):
            return _flip_crop(images, draws, flip=self.kind == "flip_crop")
        return _random_resized_crop(images, draws)


def make_augment(kind: str, seed: int) -> Augment | None:
    return None if kind == "none" else Augment(kind, seed)


def _flip_crop(images: Tensor, draws: Tensor, flip: bool) -> Tensor:
    n, _, height, width = images.shape
    pad = max(1, min(height, width) // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = (draws[:, 0] * (2 * pad + 1)).long()
    dx = (draws[:, 1] * (2 * pad + 1)).long()
    flipped = (draws[:, 2] < 0.5) & flip
    rows = dy[:, None] + torch.arange(height, device=images.device)  # (N, H)
    steps = torch.arange(width, device=images.device)
    cols = dx[:, None] + torch.where(flipped[:, None], width - 1 - steps, steps)  # (N, W)
    # One gather does the crop and the flip: padded[i, :, rows[i], cols[i]].
    picked = padded[torch.arange(n, device=images.device)[:, None, None], :,
                    rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()


def _random_resized_crop(images: Tensor, draws: Tensor) -> Tensor:
    area = 0.08 + 0.92 * draws[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draws[:, 1])
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the image's sides
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (2 * draws[:, 2] - 1) * (1 - crop_w)  # in grid_sample's [-1, 1] coordinates
    centre_y = (2 * draws[:, 3] - 1) * (1 - crop_h)
    flip = torch.where(draws[:, 4] < 0.5, -1.0, 1.0)
    zeros = torch.zeros_like(crop_w)
    theta = torch.stack([torch.stack([crop_w * flip, zeros, centre_x], 1),
                         torch.stack([zeros, crop_h, centre_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)
