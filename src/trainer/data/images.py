"""Image sources: scikit-learn's digits, torchvision's datasets, and the user's own folders.

Sets whose decoded pixels fit `IN_MEMORY_LIMIT` are held in memory as uint8 and batched by
indexing (on the GPU when training there); larger folders stream from disk (data/files.py).
Either way batches reach the model as floats in [-1, 1], augmented on the device when training.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.data import DataModule, DataSpec, split_indices
from trainer.data.files import (
    BadFiles,
    FileImageSplit,
    ImageFiles,
    ImageSource,
    ImageSplit,
    decode_all,
    list_images,
)
from trainer.data.transforms import make_augment
from trainer.errors import UserError

# `in_memory: auto` holds a set in memory when its decoded uint8 pixels take at most this much.
KIND = "image"  # every source here (data.configured_kind)
IN_MEMORY_LIMIT = 512 * 2**20


def _module(name: str, images: Tensor, labels: Tensor, parts: list[Tensor], batch_size: int,
            classes: Sequence[str], augment: str, seed: int) -> DataModule:
    train, val, test = (ImageSplit(images[i], labels[i]) for i in parts)
    train.augment = make_augment(augment, seed)
    spec = DataSpec(kind="image", name=name, in_shape=tuple(images.shape[1:]),
                    num_classes=len(classes), classes=tuple(classes))
    return DataModule(spec, train, val, test, batch_size)


def digits(batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.2,
           augment: str = "none", seed: int = 0) -> DataModule:
    """The 1,797 8x8 digits that ship inside scikit-learn (no network needed)."""
    pixels, targets = _digit_arrays()  # pixel values 0..16
    images = torch.from_numpy(pixels * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(targets).long()
    parts = split_indices(len(labels), val_fraction, test_fraction, seed)
    return _module("digits", images, labels, parts, batch_size, [str(d) for d in range(10)],
                   augment, seed)


def _digit_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits as load_digits gives them: (1797, 8, 8) pixels and their labels.
    Read from the file scikit-learn bundles, as load_digits reads it, because importing
    sklearn.datasets (scipy, pandas) costs every process that trains on digits 0.9 s; through
    load_digits itself should a release move the file."""
    import numpy as np

    package = importlib.util.find_spec("sklearn")  # finds, without importing
    folders = package.submodule_search_locations if package else None
    bundled = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if bundled is not None and bundled.is_file():
        table = np.loadtxt(bundled, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images, raw.target


def _torchvision(name: str, dataset_class: type, root: str, download: bool, expected: str,
                 folder: str, batch_size: int, val_fraction: float, augment: str,
                 seed: int) -> DataModule:
    """An official train/test pair, held in memory as uint8; val is drawn from the training set
    by seed. `expected` names the files torchvision looks for in `root/folder`."""
    tensors = _idx_pair(Path(root) / folder) if folder.endswith("MNIST/raw") else None
    if tensors is None:
        tensors = _downloaded_pair(name, dataset_class, root, download, expected, folder)
    (train_x, train_y), (test_x, test_y) = tensors[True], tensors[False]
    order = split_indices(len(train_y), val_fraction, 0.0, seed)
    n = len(train_y) + len(test_y)
    images, labels = torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
    parts = [order[0], order[1], torch.arange(len(train_y), n)]
    return _module(name, images, labels, parts, batch_size, dataset_class.classes, augment, seed)


def _downloaded_pair(name: str, dataset_class: type, root: str, download: bool, expected: str,
                     folder: str) -> dict[bool, tuple[Tensor, Tensor]]:
    """The train (True) and test (False) images and labels through torchvision's class, which
    downloads them when allowed."""
    tensors = {}
    for train in (True, False):
        try:
            dataset = dataset_class(root, train=train, download=download)
        except (RuntimeError, OSError) as error:
            # torchvision raises RuntimeError for missing files, URLError (an OSError) offline.
            where = Path(root).resolve() / folder
            raise UserError(
                f"data={name}: the files are not under {where} and could not be downloaded "
                f"({str(error).splitlines()[0]}); put {expected} in {where} "
                "or set data.root to the folder that holds them"
            ) from None
        data = torch.as_tensor(dataset.data)
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        tensors[train] = (images.contiguous(), torch.as_tensor(dataset.targets).long())
    return tensors


IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_pair(folder: Path) -> dict[bool, tuple[Tensor, Tensor]] | None:
    """MNIST's and Fashion-MNIST's four idx files, read as they are, gzipped (as published and
    copied in by hand) or not; None when one is missing. torchvision's classes read them only
    unpacked and unpack them only when downloading; this writes nothing, so a read-only copy
    works too."""
    found = {}
    for name in (n for pair in IDX_FILES.values() for n in pair):
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[name] = path
    return {train: (_read_idx(found[images]).unsqueeze(1), _read_idx(found[labels]).long())
            for train, (images, labels) in IDX_FILES.items()}


def _read_idx(path: Path) -> Tensor:
    """An idx file of unsigned bytes: a 4-byte magic number whose last byte counts the
    dimensions, each size as a big-endian int32, then the values."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        content = file.read()
    if len(content) < 4 or content[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an idx file of unsigned bytes (MNIST's format)")
    dims = content[3]
    shape = struct.unpack(f">{dims}I", content[4:4 + 4 * dims])
    values = torch.frombuffer(bytearray(content[4 + 4 * dims:]), dtype=torch.uint8)
    if values.numel() != math.prod(shape):
        raise UserError(f"{path} is cut short: {values.numel():,} values where its header says "
                        f"{math.prod(shape):,}")
    return values.reshape(shape)


def mnist(root: str = "./data", download: bool = True, batch_size: int = 128,
          val_fraction: float = 0.1, augment: str = "none", seed: int = 0) -> DataModule:
    from torchvision.datasets import MNIST

    files = "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    files += "t10k-labels-idx1-ubyte.gz"
    return _torchvision("mnist", MNIST, root, download, files, "MNIST/raw", batch_size,
                        val_fraction, augment, seed)


def fashion_mnist(root: str = "./data", download: bool = True, batch_size: int = 128,
                  val_fraction: float = 0.1, augment: str = "none", seed: int = 0) -> DataModule:
    from torchvision.datasets import FashionMNIST

    files = "the four Fashion-MNIST idx files (train-images-idx3-ubyte, ...)"
    return _torchvision("fashion_mnist", FashionMNIST, root, download, files,
                        "FashionMNIST/raw", batch_size, val_fraction, augment, seed)


def cifar10(root: str = "./data", download: bool = True, batch_size: int = 128,
            val_fraction: float = 0.1, augment: str = "none", seed: int = 0) -> DataModule:
    from torchvision.datasets import CIFAR10

    files = "the extracted batch files of cifar-10-python.tar.gz"
    return _torchvision("cifar10", CIFAR10, root, download, files, "cifar-10-batches-py",
                        batch_size, val_fraction, augment, seed)


def default_workers() -> int:
    """One decoding process per core this process may use, shared among the node's ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def image_folder(path: str, image_size: int = 32, grayscale: bool = False, batch_size: int = 64,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, augment: str = "none",
                 in_memory: bool | str = "auto", num_workers: int | None = None,
                 skip_bad_files: bool = False, seed: int = 0) -> DataModule:
    """The user's images, one sub-folder per class; train/ val/ test/ sub-folders if present.

    Images are resized to image_size x image_size. They are decoded once into memory when they
    fit (`in_memory`), else decoded batch by batch in `num_workers` processes while training.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"data.path={path!r} is not a folder: give a folder with one sub-folder "
                        "of images per class (or, for a GAN or autoencoder, a folder of images)")
    splits, classes = _folder_splits(root, image_size, 1 if grayscale else 3, val_fraction,
                                     test_fraction, seed)
    return encoded_images(root.name, splits, classes, batch_size, augment, in_memory,
                          num_workers, skip_bad_files, seed)


def encoded_images(name: str, splits: list[ImageSource], classes: Sequence[str],
                   batch_size: int, augment: str, in_memory: bool | str,
                   num_workers: int | None, skip_bad_files: bool, seed: int) -> DataModule:
    """A module over encoded images (train, val, test): decoded once into memory when their
    pixels fit (`in_memory`), else decoded batch by batch in worker processes as training runs."""
    workers = default_workers() if num_workers is None else num_workers
    bad = BadFiles(skip_bad_files)
    decoded = sum(source.decoded_bytes for source in splits)
    if in_memory is True or (in_memory == "auto" and decoded <= IN_MEMORY_LIMIT):
        held = [decode_all(source, workers, bad) for source in splits]
        train, val, test = (ImageSplit(images, labels) for images, labels in held)
    else:
        train, val, test = (FileImageSplit(source, workers, bad) for source in splits)
    train.augment = make_augment(augment, seed)
    first = splits[0]
    spec = DataSpec(kind="image", name=name, in_shape=(first.channels, first.size, first.size),
                    num_classes=len(classes), classes=tuple(classes))
    return DataModule(spec, train, val, test, batch_size)


def _folder_splits(root: Path, size: int, channels: int, val_fraction: float,
                   test_fraction: float, seed: int) -> tuple[list[ImageSource], list[str]]:
    """train/ val/ test/ sub-folders when all three exist, else one folder split by seed."""
    if all((root / part).is_dir() for part in ("train", "val", "test")):
        listed = [list_images(root / part) for part in ("train", "val", "test")]
        classes = listed[0][2]
        for part, (_, _, other) in zip(("val", "test"), listed[1:], strict=True):
            if other != classes:
                raise UserError(f"data.path={str(root)!r}: train/, val/ and test/ must hold the "
                                f"same class folders; {part}/ has {', '.join(other) or 'none'}, "
                                f"train/ has {', '.join(classes) or 'none'}")
        splits = [ImageFiles(paths, labels, size, channels) for paths, labels, _ in listed]
        how, remedy = "in train/, val/ and test/", "add images to the empty one"
    else:
        paths, labels, classes = list_images(root)
        every = ImageFiles(paths, labels, size, channels)
        parts = split_indices(len(every), val_fraction, test_fraction, seed)
        splits = [every.subset(part.tolist()) for part in parts]
        how = f"by data.val_fraction={val_fraction} and data.test_fraction={test_fraction}"
        remedy = "add images or raise the fractions"
    if min(len(files) for files in splits) == 0:
        counts = " / ".join(str(len(files)) for files in splits)
        raise UserError(f"data.path={str(root)!r} has too few images for a train/val/test split: "
                        f"{counts} {how}; each split needs an image at least: {remedy}")
    return splits, classes
