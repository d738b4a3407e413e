"""The data interface: splits that hand out ready batches, and the spec models size themselves from.

Every source (images.py, text.py, hf.py) returns a `DataModule`: three splits and a `DataSpec`.
Small sets are held in memory (images as uint8) and batched by indexing; large ones stream from
disk (image files decoded in DataLoader workers, tokens from a memory map). The order of training
batches is a pure function of (seed, epoch), and each rank takes its own slice of every global
batch, so a run can be resumed bit for bit and sharded without a sampler object.

May import: the leaves (errors, logging's progress bars, ranks) and each other; never models,
tasks, run, use or cli.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig
from torch import Tensor

from trainer.errors import UserError

KINDS = ("image", "text")  # what DataSpec.kind can be; a data module's KIND says its own


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know to size itself, and what turns its outputs back into data."""

    kind: Literal["image", "text"]
    name: str
    in_shape: tuple[int, ...] = ()  # images: (channels, height, width)
    num_classes: int = 0  # images
    classes: tuple[str, ...] = ()  # images: the class names, index = label
    tokenizer: Tokenizer | None = None  # text: ids <-> text
    block_size: int = 0  # text: context length

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size if self.tokenizer else 0


def spec_record(spec: DataSpec) -> dict[str, Any]:
    """What a model's inputs and outputs mean (shape, class names, tokenizer), as plain values
    for a checkpoint: `evaluate` on other data checks that they still mean the same."""
    from trainer.data.tokenize import tokenizer_record

    record = {"kind": spec.kind, "name": spec.name, "in_shape": list(spec.in_shape),
              "num_classes": spec.num_classes, "classes": list(spec.classes),
              "block_size": spec.block_size}
    return {**record, "tokenizer": tokenizer_record(spec.tokenizer) if spec.tokenizer else None}


def spec_from_record(record: dict[str, Any]) -> DataSpec:
    from trainer.data.tokenize import tokenizer_from_record

    tokenizer = tokenizer_from_record(record["tokenizer"]) if record["tokenizer"] else None
    return DataSpec(kind=record["kind"], name=record["name"], in_shape=tuple(record["in_shape"]),
                    num_classes=record["num_classes"], classes=tuple(record["classes"]),
                    tokenizer=tokenizer, block_size=record["block_size"])


class Tokenizer(Protocol):
    """Text <-> token ids (data/tokenize.py has the implementations)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_bytes(self) -> Tensor:
        """(vocab_size,) the number of UTF-8 bytes each token stands for (for bits per byte)."""
        ...


Batch = tuple[Tensor, Tensor]


class Split(Protocol):
    """One split of a data set. Batches come out ready for the model, on the split's device:
    images as float in [-1, 1], tokens as int64."""

    def __len__(self) -> int: ...

    def batch(self, index: Tensor) -> Batch:
        """The samples at `index`, without augmentation (evaluation, samples to show)."""
        ...

    def stream(self, batches: Sequence[Tensor], epoch: int) -> Iterator[Batch]:
        """One batch per index tensor, in order (augmented, for a training split), prefetched
        where the split reads from disk."""
        ...

    def to(self, device: torch.device) -> Split: ...


@dataclass
class TokenSplit:
    """A token stream cut into consecutive windows; item i predicts window i shifted by one.

    `tokens` is a tensor (small corpora, moved to the device whole) or a memory-mapped array
    (data/token_cache.py), of which a batch reads only the pages its windows touch.
    """

    tokens: Tensor | np.ndarray
    block_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _offsets: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        on = self.tokens.device if isinstance(self.tokens, Tensor) else torch.device("cpu")
        self._offsets = torch.arange(self.block_size + 1, device=on)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def batch(self, index: Tensor) -> Batch:
        if isinstance(self.tokens, Tensor):
            positions = index.to(self.tokens.device)[:, None] * self.block_size + self._offsets
            windows = self.tokens[positions].long()
        else:
            positions = index.cpu()[:, None] * self.block_size + self._offsets
            windows = torch.from_numpy(self.tokens[positions.numpy()].astype(np.int64))
            windows = windows.to(self.device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]

    def stream(self, batches: Sequence[Tensor], epoch: int) -> Iterator[Batch]:
        if isinstance(batches, Tensor) and isinstance(self.tokens, Tensor):
            batches = batches.to(self.tokens.device)  # one copy for the epoch, not one a step
        return (self.batch(index) for index in batches)

    def to(self, device: torch.device) -> TokenSplit:
        if isinstance(self.tokens, Tensor):
            return TokenSplit(self.tokens.to(device), self.block_size, device)
        return TokenSplit(self.tokens, self.block_size, device)


@dataclass
class Subset:
    """The samples of `split` at `indices`, which stay on the CPU: trainer.overfit_batches'
    few batches, trained on epoch after epoch."""

    split: Split
    indices: Tensor

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> Tensor | None:
        labels = getattr(self.split, "labels", None)
        return None if labels is None else torch.as_tensor(labels).cpu()[self.indices]

    def batch(self, index: Tensor) -> Batch:
        return self.split.batch(self.indices[index.cpu()])

    def stream(self, batches: Sequence[Tensor], epoch: int) -> Iterator[Batch]:
        if isinstance(batches, Tensor):
            return self.split.stream(self.indices[batches.cpu()], epoch)
        return self.split.stream([self.indices[index.cpu()] for index in batches], epoch)

    def to(self, device: torch.device) -> Subset:
        return Subset(self.split.to(device), self.indices)


@dataclass
class DataModule:
    spec: DataSpec
    train: Split
    val: Split
    test: Split
    batch_size: int  # per process

    def describe(self) -> str:
        """The splits' sizes and what a model sees of the data, for the start of a run's log."""
        spec = self.spec
        if spec.kind == "text":
            tokens = " / ".join(f"{_token_count(split, spec.block_size):,}"
                                for split in (self.train, self.val, self.test))
            return (f"{tokens} tokens (train / val / test), {spec.tokenizer.name} vocabulary of "
                    f"{spec.vocab_size:,}, context {spec.block_size}")
        images = " / ".join(f"{len(split):,}" for split in (self.train, self.val, self.test))
        shape = "x".join(str(size) for size in spec.in_shape)
        classes = f"{spec.num_classes} classes" if spec.classes else "unlabelled"
        return f"{images} images (train / val / test) of {shape}, {classes}"

    def to(self, device: torch.device) -> DataModule:
        return DataModule(
            self.spec, self.train.to(device), self.val.to(device), self.test.to(device),
            self.batch_size,
        )

    def overfit(self, batches: int, seed: int, world: int) -> DataModule:
        """trainer.overfit_batches, as Lightning's: the same `batches` global batches of training
        samples every epoch, validated on as they are (unaugmented); the test split stays whole.
        A model that cannot fit them has a bug, whatever the data."""
        count = batches * self.batch_size * world
        if getattr(self.train, "sequential", False):
            raise UserError(f"trainer.overfit_batches={batches}: {self.spec.name} is streamed in "
                            "order and picks no samples by index; load it whole (not streamed)")
        if count > len(self.train):
            raise UserError(f"trainer.overfit_batches={batches}: {count:,} samples, more than the "
                            f"{len(self.train):,} training samples; give fewer batches")
        chosen = seeded_permutation(len(self.train), seed)[:count]
        held = getattr(self.train, "held", None)  # read from disk: decoded once, kept
        train = held(chosen) if held else Subset(self.train, chosen)
        return DataModule(self.spec, train, _unaugmented(train), self.test, self.batch_size)


def configured_kind(data_cfg: DictConfig) -> str | None:
    """The kind of data a data config gives, known before any is read: the KIND of its target's
    module (images.py, text.py); None where the data decides (a Hugging Face set)."""
    target = get_object(data_cfg._target_)
    return getattr(sys.modules[target.__module__], "KIND", None)


def _unaugmented(split: Split) -> Split:
    """The same samples as `split`, without its training augmentation."""
    if isinstance(split, Subset):
        return Subset(_unaugmented(split.split), split.indices)
    return replace(split, augment=None) if hasattr(split, "augment") else split


def _token_count(split: Split, block_size: int) -> int:
    """A text split's tokens: its whole stream, or the windows a Subset of it holds."""
    return len(split.tokens) if isinstance(split, TokenSplit) else len(split) * block_size


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
