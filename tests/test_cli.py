"""The real console scripts as a user types them: in a subprocess where the process is what is
tested (a whole run, its exit, what it imports, a terminal), else called in this process."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios

import pytest
import torch

from conftest import (
    MODELS,
    PYTHON,
    assert_clean_error,
    compose_train,
    run_cli,
    run_dirs,
    run_in_process,
)
from trainer.run.loop import train


def test_train_leaves_a_complete_run_directory(tmp_path):
    result = run_cli("train", "debug=fast", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert run.parent.parent.name == "outputs"  # outputs/DATE/TIME
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "train.log",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"test/loss", "test/acc"}
    log = (run / "train.log").read_text()
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert (f"test of best.pt (step {best['progress']['step']}, "
            f"val/acc={best['metrics']['val/acc']:.4g}) | test/loss=") in log
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    expected = {"model", "optimizers", "schedulers", "scaler", "progress", "rng", "config"}
    assert expected <= set(state)
    assert state["progress"]["step"] == 6 and state["config"]["model"]["width"] == 16
    # What the run trains, said before its first step (the plain CNN has no buffers).
    weights = {part: sum(tensor.numel() for name, tensor in state["model"].items()
                         if name.startswith(part)) for part in ("features", "head")}
    assert f"run {run.relative_to(tmp_path)}: 6 steps of 16 images" in log
    assert (f"model=cnn: {sum(weights.values()):,} parameters in features "
            f"{weights['features']:,}, head {weights['head']:,} | digits: 1,258 / 180 / 359 "
            "images (train / val / test) of 1x8x8, 10 classes") in log
    assert "device=cpu, 1 process, precision 32" in log
    # Last, the commands that use the run, spelled out; as printed, they work from here.
    where = run.relative_to(tmp_path)
    commands = log.split("to use the run:\n")[1].split("\n")
    assert [c.strip() for c in commands if c] == [
        f"predict run_dir={where} inputs=IMAGES", f"evaluate run_dir={where}",
        f"export-model run_dir={where}", f"tensorboard --logdir {where}"]
    evaluated = run_in_process(*commands[1].split(), cwd=tmp_path)
    assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == metrics


def test_help_lists_groups_and_options(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for line in ("model: autoencoder, cnn, gan, rnn, transformer",
                 "optimizer: adam, adamw, sgd", "device: auto, cpu, cuda, mps"):
        assert line in result.stdout
    assert "data: cifar10, digits, fashion_mnist, hf, image_folder, mnist, shakespeare, text" \
        in result.stdout


@pytest.mark.slow
def test_a_folder_of_your_own_configs_adds_options(tmp_path):
    """Hydra's --config-dir: a user's experiment and model options beside the bundled ones, in
    training, in --help, and a missing folder refused in one line."""
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    (tmp_path / "mine" / "model").mkdir()
    (tmp_path / "mine" / "experiment" / "quick.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: small_rnn\n"
        "optimizer:\n  lr: 0.004\n")
    (tmp_path / "mine" / "model" / "small_rnn.yaml").write_text(
        "_target_: trainer.models.rnn.RNN\nwidth: 12\n")
    result = run_in_process("train", "--config-dir", "mine", "experiment=quick", "debug=fast",
                            "logger=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    saved = (run / ".hydra" / "config.yaml").read_text()
    assert "trainer.models.rnn.RNN" in saved and "lr: 0.004" in saved
    shown = run_in_process("train", "-cd", "mine", "--help", cwd=tmp_path).stdout
    assert "model: autoencoder, cnn, gan, rnn, small_rnn, transformer" in shown
    assert "experiment: airbench_cifar10" in shown and ", quick, " in shown
    for command in (["--config-dir=nowhere"], ["-cd", "nowhere", "--help"]):
        assert_clean_error(run_in_process("train", *command, cwd=tmp_path),
                           "error: --config-dir nowhere is not a folder")


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch):
    """Hydra names a run by the second it starts; a second run of that second (another job of a
    script, another user) takes TIME_1, then TIME_2, rather than writing into the first's."""
    from hydra.types import RunMode

    from trainer.cli import run_dirs

    monkeypatch.setattr(run_dirs, "_claimed", {})
    new = str(tmp_path / "outputs" / "2026-11-29" / "10-00-00")
    assert run_dirs.run_dir(None, new, RunMode.RUN) == new  # created: the first run's
    monkeypatch.setattr(run_dirs, "_claimed", {})  # another process, in the same second
    assert run_dirs.run_dir(None, new, RunMode.RUN) == f"{new}_1"
    assert run_dirs.run_dir(None, new, RunMode.RUN) == f"{new}_1"  # resolved again: the same
    monkeypatch.setattr(run_dirs, "_claimed", {})
    assert run_dirs.run_dir(None, new, RunMode.RUN) == f"{new}_2"
    # A sweep claims nothing here (its jobs go under hydra.sweep.dir), resume=auto continues.
    assert run_dirs.run_dir(None, str(tmp_path / "x"), RunMode.MULTIRUN) == str(tmp_path / "x")
    assert run_dirs.run_dir("auto", new, RunMode.RUN) == new
    assert not (tmp_path / "x").exists()


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli(PYTHON, "-m", "trainer", "model=rnn", "optimizer.lr=0.01", "--cfg", "job",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "_target_: trainer.models.rnn.RNN" in result.stdout and "lr: 0.01" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # the fast tier resumes in-process (test_loop.py)
def test_resume_continues_in_the_same_run_directory(tmp_path):
    assert run_in_process("train", "debug=fast", cwd=tmp_path).returncode == 0  # its lock let go
    [run] = run_dirs(tmp_path)
    original_config = (run / ".hydra" / "config.yaml").read_text()
    result = run_in_process("train", f"resume={run}", "trainer.max_steps=9", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert run_dirs(tmp_path) == [run]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 9
    assert (run / ".hydra" / "config.yaml").read_text() == original_config
    assert list((run / ".hydra").glob("resumed-*/overrides.yaml"))
    assert "resumed from" in (run / "train.log").read_text()


@pytest.mark.parametrize("model", [
    "cnn", *(pytest.param(m, marks=pytest.mark.slow) for m in MODELS if m != "cnn")])
def test_evaluate_reproduces_the_test_metrics(tmp_path, model):
    run = tmp_path / "run"
    train(compose_train("debug=fast", f"model={model}"), run)
    result = run_in_process("evaluate", f"run_dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads((run / "metrics.json").read_text())
    assert "test metrics match metrics.json" in (run / "evaluate.log").read_text()
    if model in ("cnn", "rnn", "transformer"):  # classifiers: the same table of classes
        table = (run / "samples" / "per_class.txt").read_text()
        assert table.startswith("class  images  accuracy  most often taken for")
        assert table in (run / "evaluate.log").read_text()


@pytest.mark.parametrize("command", ["train --help", "train --cfg job", "evaluate --help",
                                     "generate --help", "predict --help",
                                     "export-model --help", "train model=rnn -h"])
def test_commands_that_train_nothing_never_import_torch(tmp_path, command):
    name, *args = command.split()
    function = name.replace("-", "_")
    script = (f"import sys; sys.argv = {[name, *args]!r}; from trainer import cli; "
              f"cli.{function}(); "
              "assert 'torch' not in sys.modules, 'torch was imported'")
    result = run_cli(PYTHON, "-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("model:" if name == "train" else "run_dir:") in result.stdout


def _on_a_terminal(args: list[str], cwd) -> str:
    """What a command prints on a terminal (a pseudo-terminal 120 columns wide)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command has exited and closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


@pytest.mark.slow
def test_the_progress_bar_is_drawn_on_a_terminal_only(tmp_path):
    command = ["train", "debug=fast", "trainer.progress=true", "logger=none"]
    piped = run_in_process(*command, cwd=tmp_path)  # output to files, not a terminal
    assert piped.returncode == 0 and "step 6 validation" in piped.stderr + piped.stdout
    assert "step/s" not in piped.stderr + piped.stdout and "\r" not in piped.stderr
    shown = _on_a_terminal(command, tmp_path)
    assert "6/6 [" in shown and "step/s" in shown and "step 6 validation" in shown
