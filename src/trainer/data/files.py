"""Image splits: encoded images (files on disk, or rows of a Hugging Face dataset) found, decoded
in DataLoader workers and streamed (`FileImageSplit`), and images decoded once and held in
memory as uint8 (`ImageSplit`), which images.py and hf.py build their data modules from.

Nothing proportional to the number of images is held but the file list, and that as one numpy
byte array rather than a list of Python strings: forked workers touch a Python object's
reference count and so copy its page, which across a million paths costs each worker gigabytes.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from trainer.data import Batch
from trainer.data.transforms import Augment, to_unit_range
from trainer.errors import UserError
from trainer.logging import progress_bar
from trainer.ranks import env_rank

log = logging.getLogger("trainer")

PREFETCH = 4  # batches each decoding worker prepares ahead

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".ppm", ".pgm", ".tif",
                  ".tiff")


def list_images(root: Path) -> tuple[list[str], list[int], list[str]]:
    """Image paths under `root/<class>/` (recursively), their class indices, and the classes;
    or, in a folder without sub-folders, its images, unlabelled (no classes: a GAN or an
    autoencoder trains on them, a classifier refuses them).

    Files that are not images (by suffix) are ignored; hidden folders are not classes.
    """
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        found = sorted(entry.path for entry in os.scandir(root)
                       if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise UserError(f"data.path={str(root)!r} holds no images (accepted: "
                            f"{', '.join(IMAGE_SUFFIXES)}) and no class folders: put the images "
                            "in it, or each class's images in a sub-folder named after it "
                            "(DIR/cat/1.jpg, DIR/dog/2.jpg) to classify them")
        return found, [0] * len(found), []
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(os.path.join(folder, file)
                       for folder, _, files in os.walk(root / name, followlinks=True)
                       for file in files if file.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise UserError(f"data.path={str(root)!r}: the class folder {name!r} holds no images "
                            f"(accepted: {', '.join(IMAGE_SUFFIXES)}); remove it or add images")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def decode(source: str | bytes, size: int, channels: int) -> Tensor:
    """An encoded image (a file's path, or its bytes) as uint8 (channels, size, size):
    torchvision's decoders (JPEG, PNG, GIF, WEBP), PIL for the formats they lack (BMP, TIFF,
    PPM). Upright: a photo's EXIF orientation is applied, as a viewer (and Hugging Face's own
    decoder) would. Raises ValueError if it is not a readable image."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import resize, to_dtype

    data = source if isinstance(source, str) else torch.frombuffer(bytearray(source),
                                                                    dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.GRAY if channels == 1 else
                             ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        image = _decode_with_pil(source, channels)
    if image.ndim == 4:  # an animated GIF: its first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = to_dtype(image, torch.uint8, scale=True)
    return resize(image, [size, size], antialias=True)


def _decode_with_pil(source: str | bytes, channels: int) -> Tensor:
    from PIL import Image, ImageOps

    try:
        # From bytes even for a path: opened by name, a TIFF is read through libtiff, which
        # turns it by its orientation tag itself, and exif_transpose would turn it again.
        data = Path(source).read_bytes() if isinstance(source, str) else source
        with Image.open(io.BytesIO(data)) as file:
            upright = ImageOps.exif_transpose(file)
            pixels = np.asarray(upright.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(str(error).splitlines()[0] if str(error) else type(error).__name__) \
            from None
    return torch.from_numpy(pixels.copy()).reshape(*pixels.shape[:2], channels).permute(2, 0, 1)


class ImageSource(Dataset):
    """Item i is image i decoded and resized (uint8, channels x size x size) and its label; an
    unreadable image gives label -1 (and a blank image), so that the main process can name it
    or skip it. Subclasses say where image i's encoded bytes are."""

    def __init__(self, labels: Sequence[int] | np.ndarray, size: int, channels: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size, self.channels = size, channels

    def encoded(self, i: int) -> str | bytes:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """How an error names image i."""
        raise NotImplementedError

    def _select(self, index: np.ndarray) -> None:
        """Keep only the images at `index` (called on a copy)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Tensor:
        return decode(self.encoded(i), self.size, self.channels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            return self.load(i), int(self.labels[i])
        except ValueError:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), -1

    def subset(self, index: Sequence[int]) -> ImageSource:
        picked = copy.copy(self)
        picked.labels = self.labels[list(index)]
        picked._select(np.asarray(index, dtype=np.int64))
        return picked

    @property
    def decoded_bytes(self) -> int:
        return len(self) * self.channels * self.size**2


class ImageFiles(ImageSource):
    """Image files by path."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int,
                 channels: int) -> None:
        super().__init__(labels, size, channels)
        self.paths = np.array([os.fsencode(p) for p in paths])

    def encoded(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def describe(self, i: int) -> str:
        return self.encoded(i)

    def _select(self, index: np.ndarray) -> None:
        self.paths = self.paths[index]


class Readable(Protocol):
    """What BadFiles needs of a source: a name for image i, and its decoding (or ValueError)."""

    def describe(self, i: int) -> str: ...
    def load(self, i: int) -> Tensor: ...


@dataclass
class BadFiles:
    """What to do with unreadable images: stop naming the first, or skip and count them."""

    skip: bool
    seen: set[str] = field(default_factory=set)

    def drop(self, files: Readable, images: Tensor, labels: Tensor, index: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        bad = labels < 0  # on the host, before the copy: no device sync
        if not bad.any():
            return images, labels, index
        for i in index[bad].tolist():
            path = files.describe(i)
            if not self.skip:
                raise UserError(f"{path} cannot be read as an image ({why_unreadable(files, i)}); "
                                "remove it, or set data.skip_bad_files=true to skip such files")
            if path not in self.seen:
                self.seen.add(path)
                log.warning("skipped %s: not a readable image (%d skipped so far)", path,
                            len(self.seen))
        keep = ~bad
        return images[keep], labels[keep], index[keep]


def why_unreadable(files: Readable, i: int) -> str:
    """What decoding image i of `files` says (it gave label -1 in a worker)."""
    try:
        files.load(i)
    except ValueError as error:
        return str(error)
    return "it could not be read"


def loader(dataset: Dataset, batches: Iterable[list], workers: int, pin: bool) -> DataLoader:
    """Load `batches` (lists of what `dataset` is indexed by) in `workers` processes, in order,
    PREFETCH batches ahead of each worker; pinned for a non-blocking copy to CUDA."""
    # The decoders, imported here before the workers fork, so that each new worker (every
    # epoch and validation starts some) does not import them again: about 1 s of CPU each.
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401

    # Its own generator: a DataLoader otherwise draws its workers' seed from the global RNG,
    # which would shift dropout's draws whenever an epoch or a validation starts.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin,
                      prefetch_factor=PREFETCH if workers else None,
                      generator=torch.Generator())


def on_device(images: Tensor, labels: Tensor, device: torch.device) -> Batch:
    """A uint8 batch copied to `device` (without blocking) and made floats in [-1, 1] there."""
    images = images.to(device, non_blocking=True)
    return to_unit_range(images), labels.to(device, non_blocking=True)


def decode_all(files: ImageSource, workers: int, bad: BadFiles) -> tuple[Tensor, Tensor]:
    """Every image decoded once (in workers) into memory: uint8 images and their labels. A
    progress bar shows when it takes more than a second (tens of thousands of images)."""
    order = torch.arange(len(files)).split(256)
    batches = loader(files, [b.tolist() for b in order], workers, False)
    parts = []
    with progress_bar(len(files), "image", "decoding into memory", env_rank() == 0) as bar:
        for index, (images, labels) in zip(order, batches, strict=True):
            parts.append(bad.drop(files, images, labels, index)[:2])
            bar.update(len(index))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass
class ImageSplit:
    """Images held in memory as uint8 (N, C, H, W) with integer labels (N,)."""

    images: Tensor
    labels: Tensor
    augment: Augment | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> Batch:
        index = index.to(self.images.device)
        return to_unit_range(self.images[index]), self.labels[index]

    def stream(self, batches: Sequence[Tensor], epoch: int) -> Iterator[Batch]:
        if isinstance(batches, Tensor):
            batches = batches.to(self.images.device)  # one copy for the epoch, not one a step
        for index in batches:
            images, labels = self.batch(index)
            yield (self.augment(images, index, epoch) if self.augment else images), labels

    def to(self, device: torch.device) -> ImageSplit:
        return ImageSplit(self.images.to(device), self.labels.to(device), self.augment)


@dataclass
class FileImageSplit:
    """Images read from disk batch by batch: decoded and resized in DataLoader worker processes,
    copied as uint8 (from pinned memory, without blocking, on CUDA), made float on the device."""

    files: ImageSource
    workers: int
    bad: BadFiles
    augment: Augment | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> Tensor:
        """Every image's label, known from its folder before any is decoded."""
        return torch.from_numpy(self.files.labels)

    def held(self, index: Tensor) -> Any:
        """These images decoded into memory once, as an ImageSplit: the few batches of
        trainer.overfit_batches, trained on epoch after epoch, then cost no decoding (and no
        worker start-up) an epoch."""
        images, labels = decode_all(self.files.subset(index.tolist()), self.workers, self.bad)
        return ImageSplit(images, labels, self.augment).to(self.device)

    def batch(self, index: Tensor) -> Batch:
        index = index.cpu()
        items = [self.files[i] for i in index.tolist()]
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items])
        images, labels, _ = self.bad.drop(self.files, images, labels, index)
        return on_device(images, labels, self.device)

    def stream(self, batches: Sequence[Tensor], epoch: int) -> Iterator[Batch]:
        decoded = loader(self.files, [b.tolist() for b in batches], self.workers,
                         self.device.type == "cuda")
        for index, (images, labels) in zip(batches, decoded, strict=True):
            images, labels, index = self.bad.drop(self.files, images, labels, index.cpu())
            images, labels = on_device(images, labels, self.device)
            yield (self.augment(images, index, epoch) if self.augment else images), labels

    def to(self, device: torch.device) -> FileImageSplit:
        return FileImageSplit(self.files, self.workers, self.bad, self.augment, device)
