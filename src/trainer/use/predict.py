"""`predict`: what a finished image run makes of new inputs. Images are prepared exactly as the
run's training images were (decoded, resized to its size, its channels, scaled to [-1, 1]); a
classifier labels them (CSV), an autoencoder reconstructs them, a GAN draws samples (PNGs)."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch

from trainer.data.files import IMAGE_SUFFIXES, ImageFiles, loader, why_unreadable
from trainer.data.transforms import to_unit_range
from trainer.errors import UserError

BATCH = 64


def input_images(inputs: str) -> list[str]:
    """The images `inputs` names: one image, a folder (searched recursively, sorted), or a text
    file listing one image path per line."""
    path = Path(inputs)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file() and path.suffix.lower() == ".txt":
        found = _listed_images(path)
    elif path.is_file():
        found = [str(path)]
    else:
        raise UserError(f"inputs={inputs!r} does not exist: give an image, a folder of images "
                        "or a .txt file listing image paths")
    if not found:
        raise UserError(f"inputs={inputs!r} holds no images (accepted: "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    return found


def _listed_images(listing: Path) -> list[str]:
    """The paths a .txt file lists, one per line: as written (absolute, or relative to the
    working directory), else relative to the list's own folder."""
    found = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        given = Path(line.strip())
        path = given if given.exists() else listing.parent / given
        if not path.exists():
            raise UserError(f"{listing} line {number}: {str(given)!r} does not exist (paths are "
                            f"taken as written, else relative to {listing.parent})")
        found.append(str(path))
    return found


def prepared(paths: list[str], shape: tuple[int, ...]) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Batches of (paths, uint8 images shaped as the model's training images), decoded in
    worker processes as training streams them; a progress bar on a terminal after a second."""
    from trainer.data.images import default_workers
    from trainer.logging import progress_bar

    files = ImageFiles(paths, [0] * len(paths), size=shape[1], channels=shape[0])
    order = torch.arange(len(paths)).split(BATCH)
    decoded = loader(files, [index.tolist() for index in order], default_workers(), False)
    with progress_bar(len(paths), "image", "reading images") as bar:
        for index, (images, labels) in zip(order, decoded, strict=True):
            for i in index[labels < 0].tolist()[:1]:  # decoding failed in the worker
                raise UserError(f"{paths[i]} is not a readable image "
                                f"({why_unreadable(files, i)})")
            yield [paths[i] for i in index.tolist()], images
            bar.update(len(index))


@contextmanager
def csv_destination(outputs: str | None) -> Iterator[TextIO]:
    """stdout, or the file `outputs`, written whole or not at all: an unreadable image half way
    leaves an earlier file of that name as it was."""
    if not outputs:
        yield sys.stdout
        return
    target = Path(outputs)
    if target.is_dir():
        raise UserError(f"outputs={outputs!r} is a folder: give the CSV file to write")
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "w", newline="") as file:
            yield file
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@torch.no_grad()
def write_predictions(model: torch.nn.Module, classes: tuple[str, ...], shape: tuple[int, ...],
                      paths: list[str], top_k: int, out: TextIO, device: torch.device) -> None:
    """One CSV row per image: path, label, probability, then the next top_k - 1 guesses."""
    top_k = min(top_k, len(classes))
    writer = csv.writer(out)
    more = [f"{name}_{rank}" for rank in range(2, top_k + 1) for name in ("label", "probability")]
    writer.writerow(["path", "label", "probability", *more])
    model.eval()
    for chunk, images in prepared(paths, shape):
        probabilities = model(to_unit_range(images.to(device))).float().softmax(-1)
        best = probabilities.topk(top_k, dim=-1)
        for path, values, labels in zip(chunk, best.values.tolist(), best.indices.tolist(),
                                        strict=True):
            writer.writerow([path, *(cell for label, value in zip(labels, values, strict=True)
                                     for cell in (classes[label], f"{value:.4f}"))])


@torch.no_grad()
def write_reconstructions(model: torch.nn.Module, shape: tuple[int, ...], paths: list[str],
                          folder: Path, device: torch.device) -> None:
    """The autoencoder's reconstruction of each image as NNNN_NAME.png in `folder`, and grid.png:
    the first 16 inputs above their reconstructions."""
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    shown: list[torch.Tensor] = []
    number = 0
    for chunk, images in prepared(paths, shape):
        inputs = to_unit_range(images.to(device))
        outputs = model(inputs)
        for path, output in zip(chunk, outputs, strict=True):
            save_image(output * 0.5 + 0.5, folder / f"{number:04d}_{Path(path).stem}.png")
            number += 1
        pairs = [torch.stack([i, o]) for i, o in zip(inputs, outputs, strict=True)]
        shown += pairs[:16 - len(shown)]
    rows = torch.stack(shown).transpose(0, 1)  # (2, n, C, H, W): inputs above reconstructions
    _save_grid(rows.flatten(0, 1), len(shown), folder / "grid.png")


@torch.no_grad()
def write_samples(model: torch.nn.Module, count: int, seed: int, folder: Path,
                  device: torch.device) -> None:
    """`count` images from the GAN's generator, seeded, as sample-NNNN.png and grid.png."""
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    images = model.generator(model.sample_latent(count, generator))
    for number, image in enumerate(images):
        save_image(image * 0.5 + 0.5, folder / f"sample-{number:04d}.png")
    _save_grid(images, 8, folder / "grid.png")


def _save_grid(images: torch.Tensor, per_row: int, path: Path) -> None:
    from torchvision.utils import make_grid, save_image

    save_image(make_grid(images.float().cpu(), nrow=per_row, normalize=True, value_range=(-1, 1),
                         padding=1), path)
