"""Streaming images from disk: memory, time to the first step, and throughput against a plain
torchvision DataLoader, on a folder of JPEGs this script generates.

    python scripts/benchmark_images.py [--images 20000] [--cut 5000] [--folder /tmp/jpegs]

1. Peak memory of `train` and all its worker processes over its first 5 steps
   (scripts/first_step.py) and the seconds from starting the command to the end of the first
   training step, for the whole folder and for the folder cut to `--cut` images (same classes);
   the default CNN at 224x224, batch 32.
2. Images per second of trainer's streamed split against
   `DataLoader(ImageFolder(root, transform=Resize + ToTensor), num_workers=2)`, in this process,
   alternating, over the same files: the data path alone, then each feeding the same CNN's
   training step.
Run it alone: another torch process on the same cores distorts the times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from first_step import until_step  # noqa: E402

CLASSES = 10


def make_folder(root: Path, count: int, side: int = 256) -> None:
    """`count` JPEGs of side x side RGB in CLASSES class folders: smooth colour fields with a
    little grain (about 27 KB each, like photos of that size), each class with its own tint."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    existing = sum(1 for _ in root.rglob("*.jpg")) if root.is_dir() else 0
    for i in range(existing, count):
        label = i % CLASSES
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (48, 48, 3)).astype(np.uint8)
        coarse[..., label % 3] = coarse[..., label % 3] // 2 + 128
        smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC))
        grain = rng.integers(-6, 7, smooth.shape)
        pixels = (smooth.astype(np.int16) + grain).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def cut(source: Path, target: Path, count: int) -> None:
    """A folder of the first `count` images of `source` (symbolic links)."""
    files = sorted(source.rglob("*.jpg"))[:count]
    for file in files:
        link = target / file.parent.name / file.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file)


def first_steps(folder: Path, workdir: Path) -> tuple[float, float]:
    return until_step(["data=image_folder", f"data.path={folder}", "data.image_size=224",
                       "model=cnn", "data.batch_size=32"], workdir)


def throughput(folder: Path, batches: int, rounds: int) -> None:
    """Images per second, trainer's streamed split against a plain torchvision loader."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from trainer.data.images import image_folder
    from trainer.models.cnn import CNN

    torch.manual_seed(0)
    batch_size = 64
    ours = image_folder(str(folder), image_size=224, in_memory=False, num_workers=2,
                        val_fraction=0.01, test_fraction=0.01).train
    plain = DataLoader(datasets.ImageFolder(str(folder), transforms.Compose(
        [transforms.Resize((224, 224)), transforms.ToTensor()])), batch_size=batch_size,
        shuffle=True, num_workers=2)
    order = torch.randperm(len(ours))[: batches * batch_size].view(batches, batch_size)
    model = CNN((3, 224, 224), CLASSES)
    optimizer = torch.optim.AdamW(model.parameters())

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed(source: str, train: bool) -> float:
        start = time.perf_counter()
        stream = ours.stream(order, epoch=0) if source == "trainer" else iter(plain)
        for _, (images, labels) in zip(range(batches), stream, strict=False):
            if train:
                step(images, labels)
        return batches * batch_size / (time.perf_counter() - start)

    for train in (False, True):
        rates: dict[str, list[float]] = {"trainer": [], "plain": []}
        for _ in range(rounds):
            for source in rates:
                rates[source].append(timed(source, train))
        best = {source: max(values) for source, values in rates.items()}
        what = "data + CNN training step" if train else "data only"
        print(f"{what:<26} trainer {best['trainer']:7.1f} img/s   plain DataLoader "
              f"{best['plain']:7.1f} img/s   ratio {best['trainer'] / best['plain']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--cut", type=int, default=5_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/trainer-jpegs"))
    args = parser.parse_args()
    full, small = args.folder / f"{args.images}", args.folder / f"{args.cut}"
    started = time.perf_counter()
    make_folder(full, args.images)
    cut(full, small, args.cut)
    print(f"folder of {args.images} JPEGs ready in {time.perf_counter() - started:.0f} s "
          f"({sum(f.stat().st_size for f in full.rglob('*.jpg')) / args.images / 1e3:.0f} KB "
          "each)")
    workdir = args.folder / "runs"
    workdir.mkdir(exist_ok=True)
    print(f"{'images':>7} {'peak MB (all processes)':>24} {'first step after s':>19}")
    peaks = {}
    for count, folder in ((args.cut, small), (args.images, full)):
        first, peaks[count] = first_steps(folder, workdir)
        print(f"{count:>7} {peaks[count]:>24.0f} {first:>19.1f}")
    print(f"peak memory ratio {args.images} / {args.cut} images: "
          f"{peaks[args.images] / peaks[args.cut]:.3f}")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    throughput(full, batches=8, rounds=3)


if __name__ == "__main__":
    main()
