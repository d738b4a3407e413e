"""Data order, sharding and splits: deterministic for a seed, each sample once per epoch."""

from __future__ import annotations

import pytest
import torch

from trainer.data import eval_batches, seeded_permutation, split_indices, train_batches
from trainer.data.images import digits, mnist
from trainer.data.images import image_folder as load_image_folder
from trainer.errors import UserError


def test_two_ranks_split_every_global_batch_of_one_rank():
    one = train_batches(100, 8, seed=3, epoch=1, rank=0, world=1)
    ranks = [train_batches(100, 4, seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat(ranks, dim=1), one)


def test_epochs_shuffle_differently_and_seeds_repeat():
    first, second = (train_batches(64, 8, seed=0, epoch=e, rank=0, world=1) for e in (0, 1))
    assert not torch.equal(first, second)
    assert torch.equal(first, train_batches(64, 8, seed=0, epoch=0, rank=0, world=1))
    assert sorted(first.flatten().tolist()) == list(range(64))  # each sample once


def test_eval_batches_cover_every_sample_once_across_ranks():
    shares = [torch.cat(eval_batches(11, 3, rank=r, world=2)) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == list(range(11))


def test_splits_are_disjoint_and_deterministic():
    parts = split_indices(50, 0.2, 0.1, seed=7)
    assert [len(p) for p in parts] == [35, 10, 5]
    assert len(set(torch.cat(parts).tolist())) == 50
    again = split_indices(50, 0.2, 0.1, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))


def test_digits_are_the_real_bundled_digits():
    data = digits(seed=0)
    assert data.spec.in_shape == (1, 8, 8) and data.spec.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.images.dtype == torch.uint8  # held 4x smaller than float
    images, _ = data.train.batch(torch.arange(len(data.train)))
    assert images.dtype == torch.float32 and images.min() == -1 and images.max() == 1


def test_digits_read_from_scikit_learns_file_are_load_digits_own(monkeypatch):
    """Read without importing sklearn.datasets (0.9 s a process), as load_digits gives them;
    and through load_digits where a release has moved the file."""
    import importlib.util

    from sklearn.datasets import load_digits

    from trainer.data.images import _digit_arrays

    raw = load_digits()
    for _ in ("bundled file", "moved"):
        pixels, labels = _digit_arrays()
        assert pixels.dtype == raw.images.dtype and (pixels == raw.images).all()
        assert labels.dtype == raw.target.dtype and (labels == raw.target).all()
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)


def test_image_folder_uses_class_folders_and_resizes(image_folder):
    data = load_image_folder(str(image_folder), image_size=8, seed=0)
    assert data.spec.in_shape == (3, 8, 8) and data.spec.num_classes == 2
    assert len(data.train) + len(data.val) + len(data.test) == 40


def test_torchvision_mnist_class_reads_idx_files(mnist_root):
    data = mnist(root=str(mnist_root), download=False, val_fraction=0.25)
    assert data.spec.in_shape == (1, 28, 28) and data.spec.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 40)


def test_mnist_gz_files_as_published_are_read_offline(mnist_root):
    """The four .gz files copied in by hand, and data.download=false: no network needed."""
    import gzip

    unpacked = mnist(root=str(mnist_root), download=False, val_fraction=0.25)
    folder = mnist_root / "MNIST" / "raw"
    for raw in folder.iterdir():
        (raw.parent / (raw.name + ".gz")).write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    published = sorted(folder.iterdir())
    data = mnist(root=str(mnist_root), download=False, val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 40)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(data, split).images, getattr(unpacked, split).images)
        assert torch.equal(getattr(data, split).labels, getattr(unpacked, split).labels)
    assert sorted(folder.iterdir()) == published  # read as they are: a read-only copy works


def test_a_cut_short_mnist_file_is_named(mnist_root):
    images = mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte is cut short: 31,355 values "
                                        r"where its header says 31,360"):
        mnist(root=str(mnist_root), download=False)


def test_overfit_batches_train_on_a_fixed_few_and_validate_on_them_unaugmented():
    whole = digits(batch_size=8, augment="crop")
    few = whole.overfit(2, seed=0, world=1)
    assert (len(few.train), len(few.val), len(few.test)) == (16, 16, len(whole.test))
    chosen = few.train.indices
    images, labels = few.val.batch(torch.arange(16))
    plain, plain_labels = whole.val.__class__(whole.train.images, whole.train.labels).batch(chosen)
    assert torch.equal(images, plain) and torch.equal(labels, plain_labels)
    # Every epoch trains on the same samples, shuffled, and augmented as the run's are.
    for epoch in (0, 1):
        order = train_batches(16, 8, seed=0, epoch=epoch, rank=0, world=1)
        streamed = list(few.train.stream(order, epoch))
        assert sorted(torch.cat([b[1] for b in streamed]).tolist()) == sorted(labels.tolist())
        assert not torch.equal(torch.cat([b[0] for b in streamed]), plain[order.flatten()])


def test_overfit_batches_of_a_streamed_folder_are_decoded_once_and_kept(image_folder):
    from trainer.data.images import ImageSplit

    streamed = load_image_folder(str(image_folder), image_size=8, batch_size=8,
                                 in_memory="false", augment="flip_crop", num_workers=0)
    few = streamed.overfit(1, seed=0, world=1)
    assert isinstance(few.train, ImageSplit) and len(few.train) == len(few.val) == 8
    assert few.train.augment is not None and few.val.augment is None
    chosen = seeded_permutation(len(streamed.train), 0)[:8]  # the samples overfit picks
    expected = streamed.train.batch(chosen)
    for got, want in zip(few.val.batch(torch.arange(8)), expected, strict=True):
        assert torch.equal(got, want)
