"""Cheaper networks tried for the Fashion-MNIST preset, for `train` to build in place of its
ResNet (BENCHMARKS.md, "A cheaper Fashion-MNIST recipe"). Each is a `CNN` subclass, so the
trainer treats it as a classifier with the preset's recipe unchanged:

    PYTHONPATH=scripts train experiment=resnet_fashion_mnist device.precision=32 \\
        model._target_=fashion_mnist_candidates.Candidate +model.arch=air48 trainer.epochs=12

Their seconds a step: `python scripts/benchmark_conv_layout.py --only "fashion candidate"`.

`pooled_resnet`: the preset's ResNet with its stem's output max-pooled, so the stages run at 14,
7 and 4 pixels. `vgg`: blocks of convolutions with batch norm and ReLU, max-pooled at the end of
each block; `air`: airbench's block shape, the first convolution max-pooled at once so the rest
of the block runs at half size. Both double the channels per block and end in global average
pooling.
"""

from __future__ import annotations

from torch import nn

from trainer.models.cnn import CNN


def _conv_bn_relu(inputs: int, outputs: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
            nn.ReLU()]


def blocks(channels: int, widths: list[int], convs: int, pool_first: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        if pool_first:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(width), nn.ReLU()]
        else:
            layers += _conv_bn_relu(channels, width)
        for _ in range(convs - 1):
            layers += _conv_bn_relu(width, width)
        layers += [] if pool_first else [nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers)


# name: (channels of each block, convolutions per block, pool after the first convolution)
ARCHS: dict[str, tuple[list[int], int, bool]] = {
    "vgg32": ([32, 64, 128], 2, False),
    "air48": ([48, 96, 192], 2, True),
    "air48x3": ([48, 96, 192], 3, True),
    "air64": ([64, 128, 256], 2, True),
}


class Candidate(CNN):
    """The preset's classifier with `arch`'s layers in place of the ResNet's."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, arch: str = "air48",
                 **cnn_options: object) -> None:
        if arch == "pooled_resnet":
            super().__init__(in_shape, num_classes, **cnn_options)
            self.features.insert(3, nn.MaxPool2d(2))  # after the stem's conv, norm and ReLU
            return
        super().__init__(in_shape, num_classes, **{**cnn_options, "width": 4, "depth": 1})
        widths, convs, pool_first = ARCHS[arch]
        self.features = blocks(in_shape[0], widths, convs, pool_first)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(widths[-1], num_classes))
