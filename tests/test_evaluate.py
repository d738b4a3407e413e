"""`evaluate run_dir=RUN data.KEY=VALUE`: a checkpoint scored on other data, prepared as the
run's was, and refused where the other data means something else to the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import Terminal, assert_clean_error, compose_train, run_in_process
from trainer.errors import UserError
from trainer.tasks.classification import per_class_table


def evaluate_on(run, split="test", **data):
    from trainer.use.jobs import evaluate_job

    return evaluate_job(OmegaConf.create({"run_dir": str(run), "checkpoint": "best",
                                          "device": None, "split": split, "data": data}))


def test_the_validation_split_gives_what_the_checkpoint_was_saved_with(finished_run, caplog):
    """Lightning's validate: the run's validation (debug=fast caps it at 2 batches) again."""
    caplog.set_level("INFO", logger="trainer")
    metrics = evaluate_on(finished_run, split="val")
    assert metrics == torch.load(finished_run / "checkpoints" / "best.pt",
                                 weights_only=True)["metrics"]
    assert "val metrics match those best.pt was saved with" in caplog.text
    with pytest.raises(UserError, match="split='train' is not accepted: choose one of test, val"):
        evaluate_on(finished_run, split="train")


@pytest.mark.parametrize("progress", [True, False])
def test_a_long_evaluation_shows_its_progress_on_a_terminal(monkeypatch, progress):
    from trainer.run.evaluation import evaluate_split
    from trainer.run.loop import build

    s = build(compose_train("debug=fast", f"trainer.progress={progress}"))
    monkeypatch.setattr("trainer.logging.PROGRESS_DELAY", 0)  # as if it had run a while
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    evaluate_split(s, s.data.test)
    drawn = "".join(terminal.drawn)
    if progress:  # 359 images in batches of 16
        assert "test split:" in drawn and "0/23 [" in drawn
    else:
        assert drawn == ""


def recorded(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_a_run_is_used_from_another_folder_than_it_trained_in(tmp_path, text_file):
    """Its data path was relative to where train ran; the run's commands, run from elsewhere
    and on another device key, still find it."""
    (tmp_path / "there").mkdir()
    shutil.copy(text_file, tmp_path / "there" / "corpus.txt")
    trained = run_in_process("train", "debug=fast", "model=rnn", "data=text",
                             "data.path=corpus.txt", "hydra.run.dir=run", cwd=tmp_path / "there")
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "there" / "run"
    result = run_in_process("evaluate", f"run_dir={run}", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == recorded(run)
    sampled = run_in_process("generate", f"run_dir={run}", "length=5", cwd=tmp_path)
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr


@pytest.mark.slow
def test_evaluate_on_another_image_folder(tmp_path, image_folder):
    from PIL import Image

    from trainer.run.loop import train

    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", "data=image_folder",
                        f"data.path={image_folder}", "data.image_size=8"), run)
    copy = shutil.copytree(image_folder, tmp_path / "copy")
    result = run_in_process("evaluate", f"run_dir={run}", f"data.path={copy}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == recorded(run)

    other = tmp_path / "other"  # the same classes, other pictures: other figures
    for label, value in (("bright", 230), ("dark", 10)):
        (other / label).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (12, 10), (value, value - i, value)).save(other / label / f"{i}.png")
    scored = evaluate_on(run, path=str(other))
    assert set(scored) == set(recorded(run)) and scored != recorded(run)

    shutil.rmtree(other / "dark")
    (other / "grey").mkdir()
    Image.new("RGB", (12, 10), (128, 128, 128)).save(other / "grey" / "0.png")
    with pytest.raises(UserError, match="does not have the run's classes \\(it lacks dark; it "
                                        "has grey besides\\): the model was trained on bright, "
                                        "dark"):
        evaluate_on(run, path=str(other))


@pytest.mark.parametrize("tokenizer", ["char", pytest.param("bpe", marks=pytest.mark.slow)])
def test_evaluate_on_another_text_in_the_run_vocabulary(tmp_path, text_file, tokenizer):
    from trainer.run.loop import train

    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", "model=transformer", "data=text",
                        f"data.path={text_file}", f"data.tokenizer={tokenizer}",
                        "data.vocab_size=270"), run)
    copy = tmp_path / "copy.txt"
    shutil.copy(text_file, copy)
    assert evaluate_on(run, path=str(copy)) == pytest.approx(recorded(run), rel=1e-6)

    fewer = tmp_path / "fewer.txt"  # fewer characters: other ids, renumbered to the run's
    fewer.write_text("the sea is green. the sky is blue.\n" * 60)
    scored = evaluate_on(run, path=str(fewer))
    assert scored["test/loss"] < 10 and scored != recorded(run)

    if tokenizer == "char":
        unseen = tmp_path / "unseen.txt"
        unseen.write_text("the sea is green. ZEBRA!\n" * 60)
        with pytest.raises(UserError, match="has characters the run's vocabulary lacks: "
                                               "'!', 'E', 'Z'; the model has no id for them"):
            evaluate_on(run, path=str(unseen))


@pytest.mark.slow
def test_evaluate_data_errors(tmp_path, finished_run):
    assert_clean_error(run_in_process("evaluate", f"run_dir={finished_run}", "data.path=elsewhere",
                                      cwd=tmp_path),
                       "data.path is not a key of this run's data (digits): its keys are")
    for source in ("mnist", 0, ""):  # a data source, or a value that is no source at all
        with pytest.raises(UserError, match=f"data={source}: evaluate keeps the run's data"):
            evaluate_on_source(finished_run, source)


def evaluate_on_source(run, source):
    from trainer.use.jobs import evaluate_job

    return evaluate_job(OmegaConf.create({"run_dir": str(run), "checkpoint": "best",
                                          "device": None, "split": "test", "data": source}))


def test_the_per_class_table_puts_the_worst_class_first_and_names_its_confusions():
    confusion = torch.tensor([[9, 1, 0],     # cat: 90%, once taken for a dog
                              [3, 5, 2],     # dog: 50%, taken for a cat 3 times, a bird twice
                              [0, 0, 10]])   # bird: 100%
    rows = per_class_table(confusion, ["cat", "dog", "bird"]).splitlines()
    assert rows[0].split() == ["class", "images", "accuracy", "most", "often", "taken", "for"]
    assert rows[1].split() == ["dog", "10", "50.0%", "cat", "(3),", "bird", "(2)"]
    assert rows[2].split() == ["cat", "10", "90.0%", "dog", "(1)"]
    assert rows[3].split() == ["bird", "10", "100.0%"]
    assert rows[5].split() == ["true", "\\", "predicted", "cat", "dog", "bird"]
    assert rows[7].split() == ["dog", "3", "5", "2"]


def test_the_per_class_table_of_many_classes_shows_the_worst_twenty():
    confusion = torch.diag(torch.arange(1, 31)) + 1  # class c: c + 2 right of c + 31
    classes = [f"c{i}" for i in range(30)]
    rows = per_class_table(confusion, classes).splitlines()
    assert [row.split()[0] for row in rows[1:21]] == classes[:20]
    assert rows[21] == "... and 10 more classes, each at 42.0% or above"
    assert "predicted" not in "\n".join(rows)  # no 30 x 30 matrix
