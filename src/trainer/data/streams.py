"""Image datasets read as a stream (`data=hf data.streaming=true`): rows arrive in order from the
hub or from files, without the Arrow copy on disk that a map-style dataset needs.

A stream has no random access, so positions stand in for indices. Epoch e of the training split
is the stream shuffled with (seed + e) through a buffer; global batch g is its next
`batch_size x world` rows and rank r takes the r-th slice, as with data held in memory, so N ranks
train exactly as one. A resumed run skips the rows its earlier steps took (read again, not
decoded). Evaluation reads its split in order, rank r taking every world-th row. Rows are decoded
by DataLoader workers, a few batches ahead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from trainer.data import Batch
from trainer.data.files import BadFiles, decode, loader, on_device
from trainer.data.transforms import Augment


class _RowDecoder(Dataset):
    """Decodes the rows the batch sampler hands it: a stream's "indices" are its rows
    (position, encoded image, label), so DataLoader's workers decode them in order, a few
    batches ahead. An unreadable row gets label -1, a blank image, and the reason."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = size, channels

    def __getitem__(self, row: tuple[int, Any, int]) -> tuple[Tensor, int, int, str]:
        position, encoded, label = row
        try:
            return decode(encoded, self.size, self.channels), label, position, ""
        except ValueError as error:
            blank = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8)
            return blank, -1, position, str(error) or "unreadable"


@dataclass
class StreamedRows:
    """How BadFiles names a bad row and says why (the row itself is gone by then)."""

    name: str
    size: int
    channels: int
    reasons: dict[int, str] = field(default_factory=dict)

    def describe(self, position: int) -> str:
        return f"{self.name} row {position}"

    def load(self, position: int) -> Tensor:
        raise ValueError(self.reasons.pop(position, "it could not be decoded"))


@dataclass
class HFStreamSplit:
    """One split of a streamed Hugging Face image dataset; `length` rows (from its metadata)."""

    sequential = True  # read in order: a training batch's indices say how many rows, not which

    dataset: Any  # datasets.IterableDataset: the image column undecoded, and the label column
    image_column: str
    label_column: str | None
    length: int
    rows: StreamedRows
    workers: int
    bad: BadFiles
    seed: int = 0
    shuffle_buffer: int = 0  # 0: read in order (evaluation splits)
    augment: Augment | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return self.length

    def batch(self, index: Tensor) -> Batch:
        """The rows at these positions of the unshuffled stream (to show a few samples)."""
        wanted = set(index.tolist())
        rows = [row for row in islice(self._rows(None), max(wanted) + 1) if row[0] in wanted]
        images, labels, _ = self._finish(*next(self._decoded(iter([rows]))))
        return images, labels

    def stream(self, batches: Sequence[Tensor], epoch: int) -> Iterator[Batch]:
        rank, world = _rank_and_world()
        if isinstance(batches, Tensor):  # training: this rank's slices of global batches
            per_rank = batches.shape[1]
            taken = self.length // (per_rank * world) - len(batches)  # by steps before a resume
            rows = islice(self._rows(epoch), taken * per_rank * world, None)
            mine = _slices(rows, per_rank, world, rank, len(batches))
        else:  # evaluation: every world-th row, in batches of the sizes asked for
            mine = _chunks(islice(self._rows(None), rank, None, world),
                           [len(b) for b in batches])
        for decoded in self._decoded(mine):
            images, labels, positions = self._finish(*decoded)
            yield (self.augment(images, positions, epoch) if self.augment else images), labels

    def _rows(self, epoch: int | None) -> Iterator[tuple[int, Any, int]]:
        """(position, encoded image, label) in stream order: shuffled for an epoch, else as is."""
        dataset = self.dataset
        if epoch is not None and self.shuffle_buffer:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(epoch)
        for position, row in enumerate(islice(dataset, self.length)):
            cell = row[self.image_column]
            encoded = cell["bytes"] if cell.get("bytes") is not None else cell["path"]
            yield position, encoded, int(row[self.label_column]) if self.label_column else 0

    def _decoded(self, batches: Iterator[list]) -> Iterator[tuple]:
        """(images, labels, positions, reasons) of each batch of rows, decoded by `workers`
        DataLoader processes."""
        decoder = _RowDecoder(self.rows.size, self.rows.channels)
        for images, labels, positions, reasons in loader(decoder, batches, self.workers,
                                                         self.device.type == "cuda"):
            yield images, labels, positions, {
                p: reason for p, reason in zip(positions.tolist(), reasons, strict=True)
                if reason}

    def _finish(self, images: Tensor, labels: Tensor, positions: Tensor,
                reasons: dict[int, str]) -> tuple[Tensor, Tensor, Tensor]:
        self.rows.reasons.update(reasons)
        images, labels, positions = self.bad.drop(self.rows, images, labels, positions)
        return (*on_device(images, labels, self.device), positions)

    def to(self, device: torch.device) -> HFStreamSplit:
        return replace(self, device=device)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _slices(rows: Iterator, per_rank: int, world: int, rank: int, count: int) -> Iterator[list]:
    """`count` global batches of per_rank x world rows; this rank's slice of each."""
    for _ in range(count):
        group = list(islice(rows, per_rank * world))
        yield group[rank * per_rank : (rank + 1) * per_rank]


def _chunks(rows: Iterator, sizes: list[int]) -> Iterator[list]:
    for size in sizes:
        yield list(islice(rows, size))
