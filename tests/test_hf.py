"""Hugging Face datasets from local files (tests build them; nothing is downloaded)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import Terminal, assert_clean_error, compose_train, run_cli, run_in_process
from trainer.data.hf import hf
from trainer.run.loop import train


@pytest.fixture
def image_parquet(tmp_path):
    """A folder with train and test parquet files: bright and dark 10x12 PNGs, a ClassLabel."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    generator = torch.Generator().manual_seed(0)
    rows = {"picture": [], "kind": []}
    for i in range(60):
        noise = torch.randint(0, 40, (10, 12, 3), generator=generator)
        pixels = ((200 if i % 2 else 40) + noise).to(torch.uint8).numpy()
        encoded = io.BytesIO()
        PILImage.fromarray(pixels).save(encoded, format="PNG")
        rows["picture"].append({"bytes": encoded.getvalue(), "path": None})
        rows["kind"].append(i % 2)
    features = Features({"picture": Image(), "kind": ClassLabel(names=["dark", "bright"])})
    dataset = Dataset.from_dict(rows, features=features)
    folder = tmp_path / "squares" / "data"
    folder.mkdir(parents=True)
    dataset.select(range(40)).to_parquet(folder / "train-00000-of-00001.parquet")
    dataset.select(range(40, 60)).to_parquet(folder / "test-00000-of-00001.parquet")
    return folder.parent


@pytest.fixture
def streamable(image_parquet, monkeypatch):
    """The same set with a validation split too: a stream cannot draw one."""
    import datasets

    # datasets sleeps 5 s whenever a shuffled parquet stream closes (a guard for an Arrow issue
    # at interpreter exit): one epoch of a real data set does not notice, these tests would.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    folder = image_parquet / "data"
    (folder / "train-00000-of-00001.parquet").rename(folder / "all.parquet")
    from datasets import Dataset

    every = Dataset.from_parquet(str(folder / "all.parquet"))
    every.select(range(32)).to_parquet(folder / "train-00000-of-00001.parquet")
    every.select(range(32, 40)).to_parquet(folder / "validation-00000-of-00001.parquet")
    (folder / "all.parquet").unlink()
    return image_parquet


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_columns_and_class_names_come_from_the_dataset(image_parquet, in_memory):
    data = hf(str(image_parquet), image_size=8, in_memory=in_memory, num_workers=0,
              val_fraction=0.25)
    assert data.spec.classes == ("dark", "bright") and data.spec.in_shape == (3, 8, 8)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)  # val drawn
    images, labels = data.test.batch(torch.arange(4))
    assert labels.tolist() == [0, 1, 0, 1]
    assert (images[1].mean() > images[0].mean()).item()  # bright is brighter


def test_a_cnn_learns_from_a_parquet_dataset(tmp_path, image_parquet):
    metrics = train(compose_train("debug=fast", "logger=none", "data=hf",
                                  f"data.name={image_parquet}", "data.image_size=8",
                                  "trainer.max_steps=12"), tmp_path)
    assert metrics["test/acc"] >= 0.9


def test_a_dataset_without_labels_trains_a_gan_and_no_classifier(tmp_path, image_parquet):
    from datasets import load_dataset

    from trainer.errors import UserError

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for part in ("train", "test"):
        found = load_dataset("parquet", data_files=str(image_parquet / "data" / f"{part}-*"))
        found["train"].remove_columns("kind").to_parquet(unlabelled / f"{part}.parquet")
    assert hf(str(unlabelled), image_size=8, num_workers=0).spec.classes == ()
    common = ("debug=fast", "logger=none", "data=hf", f"data.name={unlabelled}",
              "data.image_size=8")
    assert "test/d_loss" in train(compose_train(*common, "model=gan"), tmp_path / "gan")
    with pytest.raises(UserError, match="has no classes .unlabelled images.: a classifier"):
        train(compose_train(*common), tmp_path / "cnn")


def test_writing_a_text_column_out_shows_its_progress_on_a_terminal(tmp_path, monkeypatch):
    from datasets import Dataset

    Dataset.from_dict({"line": [f"row {i}" for i in range(300)]}).to_json(tmp_path / "t.jsonl")
    monkeypatch.setattr("trainer.logging.PROGRESS_DELAY", 0)  # as if it had run a while
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    hf(str(tmp_path / "t.jsonl"), block_size=8)
    assert "writing line rows:" in "".join(terminal.drawn)


def test_text_column_trains_a_language_model(tmp_path):
    from datasets import Dataset

    lines = [f"{who} sees the {what}." for who in ("Ann", "Bob", "Cy") for what in
             ("sea", "sky", "moon", "sun")] * 20
    folder = tmp_path / "lines"
    folder.mkdir()
    Dataset.from_dict({"id": list(range(len(lines))), "line": lines}).to_json(
        folder / "train.jsonl")
    cfg = compose_train("debug=fast", "logger=none", "model=transformer", "data=hf",
                        f"data.name={folder / 'train.jsonl'}", "data.block_size=16",
                        "trainer.max_steps=30", "optimizer.lr=3e-3")
    metrics = train(cfg, tmp_path / "run")
    vocab = len(set("\n".join(lines) + "\n"))
    assert metrics["test/loss"] < 0.75 * math.log(vocab)  # well below guessing uniformly
    assert "test/bpb" in metrics


@pytest.mark.parametrize(("args", "fragment"), [
    (["data.image_column=photo"], "data.image_column='photo' is not a column of"),
    (["data.splits.train=everything"], "has no split 'everything'"),
])
def test_bad_hf_options(tmp_path, image_parquet, args, fragment):
    result = run_in_process("train", "debug=fast", "data=hf", f"data.name={image_parquet}", *args,
                            cwd=tmp_path)
    assert_clean_error(result, fragment)


@pytest.mark.slow  # a process of its own
def test_a_missing_dataset_offline(tmp_path):
    # A process of its own: the Hugging Face libraries read their offline switches on import.
    result = run_cli("train", "debug=fast", "data=hf", "data.name=nobody/no-such-set",
                     cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_clean_error(result, "data.name='nobody/no-such-set' could not be loaded")


STREAMING = ["debug=fast", "logger=none", "data=hf", "data.streaming=true", "data.image_size=8",
             "data.batch_size=8", "data.augment=flip_crop", "data.shuffle_buffer=16"]


def test_a_streamed_dataset_trains_and_resumes_exactly(tmp_path, streamable):
    from omegaconf import OmegaConf

    common = [*STREAMING, f"data.name={streamable}", "model.dropout=0.2",
              "trainer.val_every=3"]
    full = train(compose_train(*common, "trainer.max_steps=7"), tmp_path / "full")
    half = tmp_path / "half"
    train(compose_train(*common, "trainer.max_steps=3"), half)  # mid-epoch, at a validation
    saved = torch.load(half / "checkpoints" / "last.pt", weights_only=True)
    assert saved["progress"]["batch"] == 3
    cfg = OmegaConf.create(saved["config"])
    cfg.trainer.max_steps, cfg.resume = 7, str(half)
    assert train(cfg, half) == full
    assert full["test/acc"] >= 0.9
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
               for run in (tmp_path / "full", half)]
    assert all(torch.equal(weights[0][k], v) for k, v in weights[1].items())


def test_streamed_ranks_split_every_global_batch_of_one_rank(streamable, monkeypatch):
    from trainer.data import streams, train_batches

    def taken(world, rank, batch_size, workers):
        monkeypatch.setattr(streams, "_rank_and_world", lambda: (rank, world))
        data = hf(str(streamable), streaming=True, image_size=8, num_workers=workers,
                  shuffle_buffer=16, augment="flip_crop")
        order = train_batches(len(data.train), batch_size, 0, 1, rank, world)[1:]  # resumed
        return [batch for batch in data.train.stream(order, epoch=1)]

    one = taken(1, 0, 8, workers=2)
    ranks = [taken(2, rank, 4, workers=0) for rank in (0, 1)]
    for whole, (first, second) in zip(one, zip(*ranks, strict=True), strict=True):
        assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
        assert torch.equal(whole[1], torch.cat([first[1], second[1]]))


def test_a_streamed_dataset_cannot_overfit_a_few_batches(streamable):
    from trainer.errors import UserError

    data = hf(str(streamable), streaming=True, image_size=8, num_workers=0)
    with pytest.raises(UserError, match="overfit_batches=1: squares is streamed in order"):
        data.overfit(1, seed=0, world=1)


def test_balanced_class_weights_need_labels_a_stream_has_not_read_yet(streamable):
    from omegaconf import OmegaConf

    from trainer.errors import UserError
    from trainer.tasks import task_for

    data = hf(str(streamable), streaming=True, image_size=8, num_workers=0)
    task = task_for(OmegaConf.create({"_target_": "trainer.models.cnn.CNN"}), data.spec,
                    {"class_weights": "balanced"})
    with pytest.raises(UserError, match="class_weights=balanced needs the training split's labels"):
        task.fit_loss_to_data(data.train, torch.device("cpu"))


def test_streaming_needs_every_split(tmp_path, image_parquet):
    result = run_in_process("train", *STREAMING, f"data.name={image_parquet}", cwd=tmp_path)
    assert_clean_error(result, "data.streaming=true cannot draw a val split out of a stream",
                       "data.splits.val")


def test_a_bad_streamed_image_is_named_or_skipped(streamable):
    from datasets import Dataset

    from trainer.errors import UserError

    test_file = streamable / "data" / "test-00000-of-00001.parquet"
    rows = Dataset.from_parquet(str(test_file)).to_dict()
    rows["picture"][2] = {"bytes": b"not an image", "path": None}
    Dataset.from_dict(rows, features=Dataset.from_parquet(str(test_file)).features) \
        .to_parquet(test_file)
    whole = [torch.arange(0, 10), torch.arange(10, 20)]
    data = hf(str(streamable), streaming=True, image_size=8, num_workers=0)
    with pytest.raises(UserError, match="squares test row 2 cannot be read as an image"):
        list(data.test.stream(whole, epoch=0))
    data = hf(str(streamable), streaming=True, image_size=8, num_workers=0,
              skip_bad_files=True)
    assert [len(labels) for _, labels in data.test.stream(whole, epoch=0)] == [9, 10]
