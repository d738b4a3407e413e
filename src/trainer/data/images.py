"""Image sources: scikit-learn's digits, torchvision's datasets, and the user's own folders.

Every source loads its images once into a float tensor scaled to [-1, 1] (the range of the GAN's and
autoencoder's tanh output), so batches are plain tensor indexing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from trainer.data import DataModule, DataSpec, ImageSplit, split_indices
from trainer.errors import UserError


def _to_unit_range(images: Tensor, max_value: float) -> Tensor:
    return images.float().div(max_value / 2).sub(1.0)


def _module(name: str, images: Tensor, labels: Tensor, parts: list[Tensor], batch_size: int,
            num_classes: int) -> DataModule:
    train, val, test = (ImageSplit(images[i], labels[i]) for i in parts)
    spec = DataSpec(kind="image", name=name, in_shape=tuple(images.shape[1:]),
                    num_classes=num_classes)
    return DataModule(spec, train, val, test, batch_size)


def digits(batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.2,
           seed: int = 0) -> DataModule:
    """The 1,797 8x8 digits that ship inside scikit-learn (no network needed)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = _to_unit_range(torch.from_numpy(raw.images).unsqueeze(1), 16.0)
    labels = torch.from_numpy(raw.target).long()
    parts = split_indices(len(labels), val_fraction, test_fraction, seed)
    return _module("digits", images, labels, parts, batch_size, 10)


def _torchvision(name: str, dataset_class: type, root: str, download: bool, expected: str,
                 folder: str, batch_size: int, val_fraction: float, seed: int) -> DataModule:
    """An official train/test pair; val is drawn from the training set by seed. `expected` names
    the files torchvision looks for in `root/folder`."""
    splits = {}
    for train in (True, False):
        try:
            splits[train] = dataset_class(root, train=train, download=download)
        except (RuntimeError, OSError) as error:
            # torchvision raises RuntimeError for missing files, URLError (an OSError) offline.
            where = Path(root).resolve() / folder
            raise UserError(
                f"data={name}: the files are not under {where} and could not be downloaded "
                f"({str(error).splitlines()[0]}); put {expected} in {where} "
                "or set data.root to the folder that holds them"
            ) from None
    tensors = {}
    for train, dataset in splits.items():
        data = torch.as_tensor(dataset.data)
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        tensors[train] = (_to_unit_range(images, 255.0), torch.as_tensor(dataset.targets).long())
    (train_x, train_y), (test_x, test_y) = tensors[True], tensors[False]
    order = split_indices(len(train_y), val_fraction, 0.0, seed)
    n = len(train_y) + len(test_y)
    images, labels = torch.cat([train_x, test_x]), torch.cat([train_y, test_y])
    parts = [order[0], order[1], torch.arange(len(train_y), n)]
    return _module(name, images, labels, parts, batch_size, len(dataset.classes))


def mnist(root: str = "./data", download: bool = True, batch_size: int = 128,
          val_fraction: float = 0.1, seed: int = 0) -> DataModule:
    from torchvision.datasets import MNIST

    files = "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    files += "t10k-labels-idx1-ubyte.gz"
    return _torchvision("mnist", MNIST, root, download, files, "MNIST/raw", batch_size,
                        val_fraction, seed)


def fashion_mnist(root: str = "./data", download: bool = True, batch_size: int = 128,
                  val_fraction: float = 0.1, seed: int = 0) -> DataModule:
    from torchvision.datasets import FashionMNIST

    files = "the four Fashion-MNIST idx files (train-images-idx3-ubyte, ...)"
    return _torchvision("fashion_mnist", FashionMNIST, root, download, files,
                        "FashionMNIST/raw", batch_size, val_fraction, seed)


def cifar10(root: str = "./data", download: bool = True, batch_size: int = 128,
            val_fraction: float = 0.1, seed: int = 0) -> DataModule:
    from torchvision.datasets import CIFAR10

    files = "the extracted batch files of cifar-10-python.tar.gz"
    return _torchvision("cifar10", CIFAR10, root, download, files, "cifar-10-batches-py",
                        batch_size, val_fraction, seed)


def image_folder(path: str, image_size: int = 32, grayscale: bool = False, batch_size: int = 64,
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0) -> DataModule:
    """The user's images, one sub-folder per class; train/ val/ test/ sub-folders if present."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"data.path={path!r} is not a folder: give a folder with one sub-folder "
                        "of images per class")
    steps = [transforms.Resize((image_size, image_size))]
    steps += [transforms.Grayscale()] if grayscale else []
    transform = transforms.Compose([*steps, transforms.PILToTensor()])

    def load(folder: Path) -> tuple[Tensor, Tensor, list[str]]:
        try:
            dataset = ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, OSError) as error:
            raise UserError(f"data.path={str(folder)!r}: {error}") from None
        images = torch.stack([image for image, _ in dataset])
        return _to_unit_range(images, 255.0), torch.tensor(dataset.targets), dataset.classes

    if all((root / part).is_dir() for part in ("train", "val", "test")):
        loaded = [load(root / part) for part in ("train", "val", "test")]
        classes = loaded[0][2]
        if any(part[2] != classes for part in loaded):
            raise UserError(f"data.path={path!r}: train/, val/ and test/ must hold the same "
                            f"class folders (train/ has {', '.join(classes)})")
        sizes = [len(part[1]) for part in loaded]
        images = torch.cat([part[0] for part in loaded])
        labels = torch.cat([part[1] for part in loaded])
        ends = torch.tensor(sizes).cumsum(0).tolist()
        parts = [torch.arange(end - size, end) for size, end in zip(sizes, ends, strict=True)]
    else:
        images, labels, classes = load(root)
        parts = split_indices(len(labels), val_fraction, test_fraction, seed)
    if min(len(p) for p in parts) == 0:
        raise UserError(f"data.path={path!r} has too few images for a train/val/test split "
                        f"({len(labels)} found)")
    return _module(root.name, images, labels, parts, batch_size, len(classes))
