from __future__ import annotations

from torch import Tensor, nn

from trainer.errors import UserError


class CNN(nn.Module):
    """Conv blocks that each double the channels and halve the image, then a linear classifier."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 32,
                 depth: int = 2, dropout: float = 0.1, batch_norm: bool = False) -> None:
        super().__init__()
        channels, height, width_px = in_shape
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
        return self.head(self.features(images))
