from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.errors import UserError


class CNN(nn.Module):
    """Conv blocks that each double the channels and halve the image, then a small classifier;
    with `residual`, a ResNet: a stem, then `depth` stages of two residual blocks (batch norm;
    every stage but the first halves the image and doubles the channels), global average
    pooling and a linear classifier, so any image size works with a small head; or, with
    `backbone`, a torchvision classification network (pretrained with `weights`) whose
    classifier is replaced by one for the data's classes.

    A backbone sees images as it was trained to (models/pretrained.py): three channels, its own
    mean and std, and with `input_size` auto its own size (an int: that size; null: the data's).
    `freeze_backbone` trains the new classifier alone, the backbone's batch norm statistics
    frozen too. With `test_flip`, evaluation (and predict and export) scores each image and its
    mirror and averages the two (airbench's test-time augmentation): for data a mirror keeps in
    its class, such as clothes and photos; not digits. With `whiten` (residual only), the ResNet
    first sees its input through a `Whitening` layer fitted to the training images.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 32,
                 depth: int = 2, dropout: float = 0.1, batch_norm: bool = False,
                 backbone: str | None = None, weights: str | None = None,
                 freeze_backbone: bool = False, input_size: int | str | None = "auto",
                 residual: bool = False, test_flip: bool = False, whiten: bool = False) -> None:
        super().__init__()
        self.frozen = freeze_backbone and bool(backbone)
        self.test_flip = test_flip
        self.whitening: Whitening | None = None  # set from the data by `Whitening.fit`
        if whiten and (backbone or not residual):
            raise UserError("model.whiten=true needs model.residual=true and no model.backbone "
                            "(it replaces the ResNet's first layer)")
        backbone_only = {"weights": weights, "freeze_backbone": freeze_backbone,
                         "input_size": None if input_size == "auto" else input_size}
        given = [f"model.{key}={str(value).lower() if value is True else value}"
                 for key, value in backbone_only.items() if value]
        if given and not backbone:
            raise UserError(f"{', '.join(given)} applies to a torchvision backbone only: set "
                            "model.backbone=NAME (resnet18, efficientnet_b0, ...) too")
        if backbone:
            from trainer.models.pretrained import backbone as pretrained

            self.features, width_out = pretrained(backbone, weights, input_size, in_shape[-1])
            self.features.requires_grad_(not self.frozen)
            self.train()
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width_out, num_classes))
            return
        channels, height, width_px = in_shape
        if residual:
            self.features = _residual_stages(channels, width, depth)
            if whiten:
                self.whitening = Whitening(channels)
                stem = nn.Conv2d(self.whitening.out_channels, width, 3, padding=1, bias=False)
                self.features = nn.Sequential(self.whitening, nn.GELU(), stem,
                                              *self.features[1:])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                      nn.Linear(width * 2 ** (depth - 1), num_classes))
            return
        if min(height, width_px) >> depth == 0:
            raise UserError(f"model.depth={depth}: {depth} conv blocks would halve a {height}x"
                            f"{width_px} image to nothing; lower model.depth or raise the image "
                            "size")
        layers: list[nn.Module] = []
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1)]
            layers += [nn.BatchNorm2d(out)] if batch_norm else []
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        features = channels * (height >> depth) * (width_px >> depth)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(features, 128),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(self.features(images))
        if self.test_flip and not self.training:
            logits = (logits + self.head(self.features(images.flip(-1)))) / 2
        return logits

    def train(self, mode: bool = True) -> CNN:
        super().train(mode)
        if self.frozen:
            self.features.eval()  # a frozen backbone keeps its batch norm statistics
        return self


class ResidualBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), with a strided 1x1 convolution on the shortcut
    where the block changes the size or the channels (He et al., 2016)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs))
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.shortcut(x)).relu()


def _residual_stages(channels: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU()]
    for stage in range(depth):
        inputs, outputs = width * 2 ** max(stage - 1, 0), width * 2**stage
        layers += [ResidualBlock(inputs, outputs, 1 if stage == 0 else 2),
                   ResidualBlock(outputs, outputs, 1)]
    return nn.Sequential(*layers)


class Whitening(nn.Conv2d):
    """A 2x2 convolution whose filters whiten the training images' 2x2 patches (airbench's first
    layer): each output is one principal direction of the patches, centred and scaled to unit
    variance, given twice with opposite signs so the next ReLU-like layer keeps both halves.
    `fit` sets the weights from data; they stay fixed, the bias trains."""

    def __init__(self, channels: int, kernel: int = 2) -> None:
        size = channels * kernel * kernel
        super().__init__(channels, 2 * size, kernel, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def fit(self, images: Tensor, floor: float = 1e-4) -> None:
        """`images`: (N, C, H, W) floats. Directions whose variance is below `floor` times the
        largest are scaled as if they had that much, so a flat background is not blown up."""
        size = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        total, products, count = torch.zeros(size).double(), torch.zeros(size, size).double(), 0
        for chunk in images.split(256):  # all patches at once would take gigabytes
            # float64 on the CPU: sums over millions of patches (MPS has no float64)
            patches = F.unfold(chunk.to('cpu', torch.float64), self.kernel_size)
            patches = patches.transpose(1, 2).reshape(-1, size)  # (N * positions, C*k*k)
            total, products = total + patches.sum(0), products + patches.T @ patches
            count += len(patches)
        mean = total / count
        variances, directions = torch.linalg.eigh(products / count - mean.outer(mean))
        scale = variances.clamp(min=floor * variances.max()).rsqrt()
        filters = (directions * scale).T.flip(0)  # one row per direction, the largest first
        weight = torch.cat([filters, -filters]).to(self.weight.dtype)
        self.weight.copy_(weight.reshape(self.weight.shape))  # copy_ moves it to the device
        self.bias.copy_(-(weight @ mean.to(weight.dtype)))
