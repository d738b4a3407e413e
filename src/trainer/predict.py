"""`predict`: an image classifier's labels for the user's own images, prepared exactly as its
training images were (decoded, resized to its size, its channels, scaled to [-1, 1])."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from trainer.data.files import IMAGE_SUFFIXES, decode
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
        found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.is_file():
        found = [str(path)]
    else:
        raise UserError(f"inputs={inputs!r} does not exist: give an image, a folder of images "
                        "or a .txt file listing image paths")
    if not found:
        raise UserError(f"inputs={inputs!r} holds no images (accepted: "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    return found


def prepared(paths: list[str], shape: tuple[int, ...]) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Batches of (paths, uint8 images shaped as the model's training images)."""
    channels, size = shape[0], shape[1]
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        images = []
        for path in chunk:
            try:
                images.append(decode(path, size, channels))
            except (ValueError, RuntimeError, OSError) as error:
                raise UserError(f"{path} is not a readable image ({error})") from None
        yield chunk, torch.stack(images)


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
