"""The `predict` command: a classifier's labels for image files, prepared as in training."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import assert_clean_error, compose_train, run_in_process


@pytest.fixture
def test_images(tmp_path):
    """The run's own test split (digits, seed 0) written to disk as PNGs named by their label."""
    from PIL import Image

    from trainer.data.images import digits

    test = digits(seed=0).test
    folder = tmp_path / "test-images"
    (folder / "nested").mkdir(parents=True)
    for i, (image, label) in enumerate(zip(test.images, test.labels.tolist(), strict=True)):
        sub = folder / "nested" if i % 2 else folder  # a folder is searched recursively
        Image.fromarray(image[0].numpy(), mode="L").save(sub / f"{i:03d}_label{label}.png")
    return folder


def test_predict_labels_the_test_images_as_the_test_metrics_say(tmp_path, finished_run,
                                                               test_images):
    result = run_in_process("predict", f"run_dir={finished_run}", f"inputs={test_images}",
                            "top_k=2", f"outputs={tmp_path / 'labels.csv'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "labels.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(list(test_images.rglob("*.png")))
    assert set(rows[0]) == {"path", "label", "probability", "label_2", "probability_2"}
    right = [row["label"] == row["path"].rsplit("label", 1)[1].removesuffix(".png") for row in rows]
    accuracy = sum(right) / len(rows)
    assert accuracy == pytest.approx(json.loads((finished_run / "metrics.json").read_text())
                                     ["test/acc"], abs=1e-9)
    assert all(float(row["probability"]) >= float(row["probability_2"]) for row in rows)


@pytest.mark.slow
def test_predict_one_image_to_stdout(tmp_path, finished_run, test_images):
    image = next(test_images.glob("*.png"))
    result = run_in_process("predict", f"run_dir={finished_run}", f"inputs={image}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["path"] == str(image) and row["label"] in [str(d) for d in range(10)]


@pytest.mark.slow
def test_predict_reads_a_list_of_paths_relative_to_the_list(tmp_path, finished_run, test_images):
    names = sorted(p.relative_to(test_images) for p in test_images.rglob("*.png"))[:3]
    (test_images / "three.txt").write_text("".join(f"{name}\n" for name in names))
    result = run_in_process("predict", f"run_dir={finished_run}",
                            f"inputs={test_images / 'three.txt'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["path"] for row in rows] == [str(test_images / name) for name in names]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "fragment"), [
    (["inputs=nowhere"], "inputs='nowhere' does not exist"),
    (["inputs=notes.md", "outputs=labels.csv"], "notes.md is not a readable image"),
    (["inputs=empty"], "inputs='empty' holds no images"),
    ([], "inputs=PATH is required"),
    (["inputs=notes.md", "top_k=0"], "top_k=0 is out of range: it must be >= 1"),
    (["inputs=list.txt"], "list.txt line 2: 'missing.png' does not exist"),
    (["inputs=notes.md", "chekpoint=last"], "unknown key chekpoint (did you mean checkpoint?)"),
    (["inputs=notes.md", "outputs=empty"], "outputs='empty' is a folder: give the CSV file"),
    (["inputs=notes.md", "top_k=two"], "top_k=two: Value 'two' of type 'str' could not be"),
    (["inputs=notes.md", "device=tpu"], "device='tpu' is not accepted: choose one of auto, cpu"),
])
def test_bad_predict_inputs_are_one_clear_line(tmp_path, finished_run, args, fragment):
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "list.txt").write_text("notes.md\nmissing.png\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels.csv").write_text("an earlier file")
    assert_clean_error(run_in_process("predict", f"run_dir={finished_run}", *args, cwd=tmp_path),
                       fragment)
    assert (tmp_path / "labels.csv").read_text() == "an earlier file"
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["autoencoder", "gan"])
def test_predict_writes_reconstructions_or_samples(tmp_path, test_images, model):
    from PIL import Image

    from conftest import compose_train
    from trainer.run.loop import train

    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", f"model={model}"), run)
    folder = tmp_path / "out"
    result = run_in_process("predict", f"run_dir={run}", f"inputs={test_images}", "count=5",
                            f"outputs={folder}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in folder.glob("*.png"))
    expected = len(list(test_images.rglob("*.png"))) if model == "autoencoder" else 5
    assert len(written) == expected + 1 and "grid.png" in written
    with Image.open(folder / next(n for n in written if n != "grid.png")) as image:
        assert image.size == (8, 8)  # the run's image size
    if model == "gan":  # seeded: the same samples again
        again = run_in_process("predict", f"run_dir={run}", "count=5",
                               f"outputs={tmp_path / 'again'}", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "again" / "grid.png").read_bytes() == (folder / "grid.png").read_bytes()


@pytest.mark.slow
def test_predict_needs_only_the_run_not_its_training_data(tmp_path, image_folder):
    """The model is sized by the data spec in its checkpoint: a run copied to a machine without
    its training images (here: the folder renamed) still labels images."""
    from trainer.run.loop import train

    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", "data=image_folder",
                        f"data.path={image_folder}", "data.image_size=8"), run)
    image = image_folder / "bright" / "0.png"
    before = run_in_process("predict", f"run_dir={run}", f"inputs={image}", cwd=tmp_path)
    moved = image_folder.rename(tmp_path / "moved")
    after = run_in_process("predict", f"run_dir={run}", f"inputs={moved / 'bright' / '0.png'}",
                           cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    label_and_probability = [r.stdout.splitlines()[1].split(",")[1:] for r in (before, after)]
    assert label_and_probability[0] == label_and_probability[1]
