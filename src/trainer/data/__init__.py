"""Data held in memory as tensors, batched by indexing, plus the spec models size themselves from.

Every source (images.py, text.py) returns a `DataModule`: three splits and a `DataSpec`. The order
of training batches is a pure function of (seed, epoch), and each rank takes its own slice of every
global batch, so a run can be resumed bit for bit and sharded without a sampler object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know to size itself."""

    kind: Literal["image", "text"]
    name: str
    in_shape: tuple[int, ...] = ()  # images: (channels, height, width)
    num_classes: int = 0  # images
    vocab: str = ""  # text: the characters, index = token id
    block_size: int = 0  # text: context length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


class Split(Protocol):
    def __len__(self) -> int: ...
    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]: ...
    def to(self, device: torch.device) -> Split: ...


@dataclass
class ImageSplit:
    """Images scaled to [-1, 1] as float (N, C, H, W) and integer labels (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def to(self, device: torch.device) -> ImageSplit:
        return ImageSplit(self.images.to(device), self.labels.to(device))


@dataclass
class TokenSplit:
    """A token stream cut into consecutive windows; item i predicts window i shifted by one."""

    tokens: Tensor
    block_size: int
    _offsets: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._offsets = torch.arange(self.block_size, device=self.tokens.device)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        positions = index[:, None] * self.block_size + self._offsets
        return self.tokens[positions], self.tokens[positions + 1]

    def to(self, device: torch.device) -> TokenSplit:
        return TokenSplit(self.tokens.to(device), self.block_size)


@dataclass
class DataModule:
    spec: DataSpec
    train: Split
    val: Split
    test: Split
    batch_size: int  # per process

    def to(self, device: torch.device) -> DataModule:
        return DataModule(
            self.spec, self.train.to(device), self.val.to(device), self.test.to(device),
            self.batch_size,
        )


def seeded_permutation(n: int, seed: int, salt: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.randperm(n, generator=generator)


def train_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> Tensor:
    """This rank's sample indices for every batch of an epoch, shape (batches, batch_size).

    A global batch is `batch_size * world` samples of a (seed, epoch) shuffle; rank r takes the r-th
    slice of it, so N processes at batch B see exactly what one process sees at batch N * B. The
    incomplete last batch is dropped so every rank steps the same number of times.
    """
    global_batch = batch_size * world
    order = seeded_permutation(n, seed, salt=epoch + 1)
    batches = order[: n // global_batch * global_batch].view(-1, world, batch_size)
    return batches[:, rank]


def eval_batches(n: int, batch_size: int, rank: int, world: int) -> list[Tensor]:
    """This rank's share of an evaluation split, in order: every sample once across ranks.

    Every rank gets the same number of batches (of at most `batch_size`), so ranks whose model
    forward is itself a collective (FSDP) stay in step.
    """
    count = math.ceil(math.ceil(n / world) / batch_size)
    return list(torch.arange(rank, n, world).tensor_split(count))


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[Tensor]:
    """Deterministic train / val / test index sets for a seed."""
    order = seeded_permutation(n, seed)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return [order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]]
