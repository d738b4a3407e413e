"""`train lr_find=true`: the learning-rate range test, its suggestion, and what it refuses."""

from __future__ import annotations

import csv
import math

import pytest

from conftest import assert_clean_error, compose_train, run_dirs, run_in_process
from trainer.run.lr_find import MAX_LR, MIN_LR, SKIP, find_lr, steepest


def test_the_suggestion_is_where_the_loss_falls_fastest():
    # A loss that falls from 2 to 1 around lr 1e-3 (a logistic in log10 lr), then diverges.
    lrs = [MIN_LR * (MAX_LR / MIN_LR) ** (i / 99) for i in range(100)]
    losses = [1 + 1 / (1 + math.exp(3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 1)
              for lr in lrs]
    assert lrs[steepest(lrs, losses)] == pytest.approx(1e-3, rel=0.2)
    assert steepest(lrs, losses) >= SKIP


def test_the_range_test_of_a_classifier_finds_a_rate_it_learns_at(tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    cfg = compose_train("debug=fast", "logger=none", "lr_find=true")
    suggested = find_lr(cfg, tmp_path, ["debug=fast"])["lr_find/suggested_lr"]

    with open(tmp_path / "lr_find.csv") as file:
        rows = [(float(lr), float(loss)) for lr, loss in list(csv.reader(file))[1:]]
    lrs, losses = zip(*rows, strict=True)
    assert lrs[0] == MIN_LR and 30 < len(rows) <= 100
    assert min(losses) < 0.9 * losses[0]  # the loss fell as the rate rose
    assert lrs[losses.index(min(losses))] >= suggested > 1e-4  # before the lowest loss
    assert f"train debug=fast optimizer.lr={suggested:.2e}" in caplog.text
    assert "<- suggested" in caplog.text
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_the_command_prints_the_train_command_with_the_suggested_rate(tmp_path):
    result = run_in_process("train", "lr_find=true", "debug=fast", "model=rnn",
                            "optimizer.lr=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert (run / "lr_find.csv").is_file() and not (run / "checkpoints").exists()
    log = (run / "train.log").read_text()
    assert "train debug=fast model=rnn optimizer.lr=" in log  # the old lr and lr_find dropped


@pytest.mark.parametrize(("args", "fragment"), [
    (["model=gan"], "lr_find=true needs one loss to minimise; model=gan trains two networks"),
    # Refused before the data is read: the missing folder is never looked for.
    (["model=gan", "data=image_folder", "data.path=no-such-folder"],
     "lr_find=true needs one loss to minimise; model=gan trains two networks"),
    (["device=cpu", "device.count=2"], "lr_find=true runs in one process: drop device.count=2"),
])
def test_what_the_range_test_refuses(tmp_path, args, fragment):
    assert_clean_error(run_in_process("train", "lr_find=true", "debug=fast", *args, cwd=tmp_path),
                       fragment)


def test_a_run_is_not_resumed_into_a_range_test(tmp_path, finished_run):
    result = run_in_process("train", "lr_find=true", f"resume={finished_run}", cwd=tmp_path)
    assert_clean_error(result, "lr_find=true starts from fresh weights: drop resume=")
