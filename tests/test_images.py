"""Image data at scale: in memory or streamed from disk (the same pixels either way), seeded
augmentation on the device, exact resume of a streamed run, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, compose_train, run_in_process
from trainer.data.files import FileImageSplit, decode
from trainer.data.images import ImageSplit, digits
from trainer.data.images import image_folder as load_image_folder
from trainer.data.transforms import Augment, seeded_uniforms
from trainer.run.loop import train


def every_batch(split, batch_size=7):
    return list(split.stream(torch.arange(len(split)).split(batch_size), epoch=0))


def test_streamed_folder_gives_the_pixels_held_in_memory(image_folder):
    held = load_image_folder(str(image_folder), image_size=8, in_memory=True, num_workers=0)
    streamed = load_image_folder(str(image_folder), image_size=8, in_memory=False,
                                 num_workers=2)
    assert isinstance(held.train, ImageSplit) and isinstance(streamed.train, FileImageSplit)
    assert held.train.images.dtype == torch.uint8
    for split in ("train", "val", "test"):
        for (a, y_a), (b, y_b) in zip(every_batch(getattr(held, split)),
                                      every_batch(getattr(streamed, split)), strict=True):
            assert torch.equal(a, b) and torch.equal(y_a, y_b)
            assert a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1


def test_in_memory_auto_holds_small_folders(image_folder):
    data = load_image_folder(str(image_folder), image_size=8)
    assert isinstance(data.train, ImageSplit)
    assert data.spec.classes == ("bright", "dark") and data.spec.in_shape == (3, 8, 8)


def test_draws_depend_on_seed_epoch_and_sample_only():
    index = torch.tensor([5, 9, 2])
    draws = seeded_uniforms(0, 3, index, 4)
    again = seeded_uniforms(0, 3, torch.tensor([9, 7, 5, 2]), 4)
    assert torch.equal(draws, again[[2, 0, 3]])  # the batch a sample lands in does not matter
    assert not torch.equal(draws, seeded_uniforms(0, 4, index, 4))
    assert not torch.equal(draws, seeded_uniforms(1, 3, index, 4))
    many = seeded_uniforms(0, 0, torch.arange(20_000), 2)
    assert many.min() >= 0 and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("kind", ["crop", "flip_crop", "random_resized_crop"])
def test_augmentation_moves_pixels_deterministically(kind):
    images = digits().train.batch(torch.arange(32))[0]
    augment = Augment(kind, seed=0)
    index = torch.arange(32)
    out = augment(images, index, epoch=0)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, augment(images, index, epoch=0))
    assert not torch.equal(out, augment(images, index, epoch=1))
    changed = (out - images).flatten(1).abs().amax(1) > 0
    assert changed.float().mean() > 0.5  # most images moved


def test_flip_crop_only_moves_pixels():
    image = torch.arange(64.0).view(1, 1, 8, 8) / 64
    out = Augment("flip_crop", seed=0)(image, torch.tensor([3]), epoch=0)
    assert set(out.flatten().tolist()) <= set(image.flatten().tolist())  # no interpolation


def test_crop_shifts_as_flip_crop_does_and_never_mirrors():
    images, index = digits().train.batch(torch.arange(64))[0], torch.arange(64)
    crop = Augment("crop", seed=0)(images, index, epoch=0)
    flip_crop = Augment("flip_crop", seed=0)(images, index, epoch=0)
    same = (crop == flip_crop).flatten(1).all(1)
    mirrored = (crop.flip(-1) == flip_crop).flatten(1).all(1)
    assert same.any() and (~same).any()  # flip_crop flipped some of them, crop none
    assert (same | mirrored).all()


def test_only_training_batches_are_augmented():
    data = digits(augment="flip_crop")
    assert data.train.augment is not None and data.val.augment is None
    assert data.test.augment is None


STREAMED = ["debug=fast", "logger=none", "data=image_folder", "data.image_size=8",
            "data.in_memory=false", "data.num_workers=2", "data.augment=random_resized_crop",
            "data.batch_size=8", "trainer.val_every=5", "model.dropout=0.2"]


def test_a_resumed_streamed_run_equals_the_uninterrupted_one(tmp_path, image_folder):
    from omegaconf import OmegaConf

    common = [*STREAMED, f"data.path={image_folder}"]
    full = train(compose_train(*common, "trainer.max_steps=9"), tmp_path / "full")
    half = tmp_path / "half"
    train(compose_train(*common, "trainer.max_steps=5"), half)  # mid-epoch, at a validation
    saved = torch.load(half / "checkpoints" / "last.pt", weights_only=True)
    assert saved["progress"]["batch"] not in (0, None)
    cfg = OmegaConf.create(saved["config"])
    cfg.trainer.max_steps, cfg.resume = 9, str(half)
    assert train(cfg, half) == full
    expected = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(half / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(expected["model"][k], v) for k, v in resumed["model"].items())


def test_non_images_are_ignored(image_folder):
    (image_folder / "bright" / "notes.txt").write_text("not an image")
    (image_folder / "bright" / ".DS_Store").write_bytes(b"\0\1")
    data = load_image_folder(str(image_folder), image_size=8)
    assert len(data.train) + len(data.val) + len(data.test) == 40


@pytest.mark.parametrize("suffix", ["jpg", "png", "tiff"])  # tiff: decoded by PIL
def test_photos_are_decoded_upright(tmp_path, suffix):
    """A phone photo stored sideways with an EXIF orientation (6: turn 90 degrees clockwise to
    view) is decoded as it is viewed: the stored top half becomes the right half."""
    from PIL import Image

    pixels = np.zeros((8, 16), np.uint8)
    pixels[:4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo.{suffix}"
    Image.fromarray(pixels).save(path, exif=exif)
    image = decode(str(path), size=8, channels=1)[0].float()
    assert image[:, 5:].mean() > 200 and image[:, :3].mean() < 50
    assert torch.equal(decode(path.read_bytes(), size=8, channels=1)[0].float(), image)


@pytest.mark.parametrize("in_memory", [pytest.param("true", marks=pytest.mark.slow), "false"])
def test_a_corrupt_image_is_named(tmp_path, image_folder, in_memory):
    (image_folder / "dark" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_in_process("train", "debug=fast", "data=image_folder", f"data.path={image_folder}",
                            f"data.in_memory={in_memory}", "data.image_size=8", cwd=tmp_path)
    assert_clean_error(result, "broken.jpg cannot be read as an image",
                       "data.skip_bad_files=true")


@pytest.mark.parametrize("in_memory", [True, False])
def test_bad_files_can_be_skipped_and_counted(image_folder, in_memory, caplog):
    (image_folder / "dark" / "broken.png").write_bytes(b"garbage")
    data = load_image_folder(str(image_folder), image_size=8, in_memory=in_memory,
                             skip_bad_files=True, num_workers=0)
    seen = sum(len(labels) for split in (data.train, data.val, data.test)
               for _, labels in every_batch(split))
    assert seen == 40  # the 41st file is skipped
    assert "broken.png" in caplog.text


def flat_folder(image_folder, path):
    """The images of both classes in one folder, without class sub-folders."""
    path.mkdir()
    for image in image_folder.rglob("*.png"):
        (path / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    return path


@pytest.mark.parametrize("model", ["gan", "autoencoder"])
def test_a_folder_without_classes_trains_generative_models(tmp_path, image_folder, model):
    path = flat_folder(image_folder, tmp_path / "flat")
    data = load_image_folder(str(path), image_size=8)
    assert data.spec.classes == () and len(data.train) + len(data.val) + len(data.test) == 40
    metrics = train(compose_train("debug=fast", f"model={model}", "data=image_folder",
                                  f"data.path={path}", "data.image_size=8"), tmp_path / "run")
    assert metrics["test/loss"] > 0


@pytest.mark.parametrize(("layout", "fragment"), [
    ("empty_class", "the class folder 'empty' holds no images"),
    ("no_classes", "model=cnn classifies images, but data=flat has no classes (unlabelled"),
    ("one_class", "model=cnn classifies images, but data=images has one class (bright): a "
                  "classifier needs two or more"),
    # The whole suite only: each costs a process that imports torch (2 s); the fast tier keeps
    # the others.
    pytest.param("no_images", "nothing' holds no images (accepted: .jpg",
                 marks=pytest.mark.slow),
    pytest.param("split_folders", "train/, val/ and test/ must hold the same class folders; "
                 "test/ has dark, train/ has bright, dark", marks=pytest.mark.slow),
    ("empty_split", "too few images for a train/val/test split: 36 / 0 / 4 by "
                    "data.val_fraction=0.001 and data.test_fraction=0.1; each split needs an "
                    "image at least: add images or raise the fractions"),
])
def test_folder_layout_errors(tmp_path, image_folder, layout, fragment):
    path = image_folder
    if layout == "empty_class":
        (image_folder / "empty").mkdir()
    elif layout == "no_classes":
        path = flat_folder(image_folder, tmp_path / "flat")
    elif layout == "one_class":
        for image in (image_folder / "dark").iterdir():
            image.unlink()
        (image_folder / "dark").rmdir()
    elif layout == "no_images":
        path = tmp_path / "nothing"
        path.mkdir()
    elif layout == "split_folders":
        path = tmp_path / "split"
        for part in ("train", "val", "test"):
            for label in ("bright", "dark") if part != "test" else ("dark",):
                (path / part / label).mkdir(parents=True)
                (path / part / label / "0.png").write_bytes((image_folder / label / "0.png")
                                                            .read_bytes())
    extra = ["data.val_fraction=0.001"] if layout == "empty_split" else []
    result = run_in_process("train", "debug=fast", "data=image_folder", f"data.path={path}", *extra,
                            cwd=tmp_path)
    assert_clean_error(result, fragment)


@pytest.mark.parametrize(("key", "fragment"), [
    ("data.augment=mixup", "data.augment='mixup' is not accepted: choose one of none, crop"),
    ("data.in_memory=maybe", "data.in_memory='maybe' is not accepted: choose one of auto, true"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range"),
])
def test_bad_data_options(tmp_path, image_folder, key, fragment):
    result = run_in_process("train", "debug=fast", "data=image_folder", f"data.path={image_folder}",
                            key, cwd=tmp_path)
    assert_clean_error(result, fragment)


def test_streaming_ranks_decode_their_share_of_every_global_batch(image_folder):
    """What two ranks stream of an epoch, side by side, is what one rank streams at twice the
    batch: the same images, augmented alike."""
    from trainer.data import train_batches

    data = load_image_folder(str(image_folder), image_size=8, in_memory=False, num_workers=0,
                             augment="flip_crop")

    def streamed(rank, world, batch_size):
        order = train_batches(len(data.train), batch_size, 0, 2, rank, world)
        return list(data.train.stream(order, epoch=2))

    for whole, *shares in zip(streamed(0, 1, 8), streamed(0, 2, 4), streamed(1, 2, 4),
                              strict=True):
        assert torch.equal(whole[0], torch.cat([share[0] for share in shares]))
        assert torch.equal(whole[1], torch.cat([share[1] for share in shares]))
