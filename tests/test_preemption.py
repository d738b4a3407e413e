"""A run survives: SIGTERM and Ctrl-C save and say how to resume, timed and kept checkpoints,
resume=latest and resume=auto, skipped non-finite steps."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import assert_clean_error, compose_train, run_dirs, run_in_process
from trainer.run import loop
from trainer.signals import STOPPED_EXIT, Stopped

RUN = ["debug=fast", "logger=none", "model=transformer", "model.dropout=0.2",
       "trainer.val_every=100"]


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def signal_at(monkeypatch, step: int, number: int = signal.SIGTERM) -> None:
    """Send this process `number` while training step `step` runs."""
    real, calls = loop.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), number)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_then_signal)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_step_saves_and_the_run_resumes_exactly(tmp_path, monkeypatch,
                                                                   number):
    full = loop.train(compose_train(*RUN, "trainer.max_steps=10"), tmp_path / "full")
    signal_at(monkeypatch, 4, number)
    with pytest.raises(Stopped, match=f"stopped by {signal.Signals(number).name} at step 4"):
        loop.train(compose_train(*RUN, "trainer.max_steps=10"), tmp_path / "stopped")
    monkeypatch.undo()
    saved = state(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert saved["progress"]["step"] == 4
    cfg = OmegaConf.create(saved["config"])
    cfg.resume = str(tmp_path / "stopped")
    assert loop.train(cfg, tmp_path / "stopped") == full
    final = [state(run / "checkpoints" / "last.pt")["model"]
             for run in (tmp_path / "full", tmp_path / "stopped")]
    assert all(torch.equal(final[0][k], v) for k, v in final[1].items())


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    real, calls = loop.train_step, []

    def step_then_interrupt_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks to stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # the second does not wait
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_then_interrupt_twice)
    with pytest.raises(KeyboardInterrupt):
        loop.train(compose_train(*RUN, "trainer.max_steps=10"), tmp_path / "run")
    assert len(calls) == 2


COMMANDS = {"one process": ["train"], "launched ranks": ["train", "device.count=2"],
            "torchrun": ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "trainer"]}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigterm_to_the_command_exits_with_the_resume_command(tmp_path, command):
    """The real CLI in one process, in two gloo ranks under its launcher or under torchrun:
    SIGTERM mid-run."""
    args = [*COMMANDS[command], "debug=fast", "logger=none", "trainer.max_steps=100000",
            "trainer.log_every=1", "trainer.val_every=100000", "device=cpu"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "step 3/" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    [run] = run_dirs(tmp_path)
    assert f"Resume with: train resume={run}" in stderr
    if command == "torchrun":  # torchrun reports the signal it got in a traceback of its own
        assert stderr.count("Traceback") == 1 and "SignalException" in stderr, stderr
    else:
        assert process.returncode == STOPPED_EXIT, stderr
        assert "Traceback" not in stderr
    step = state(run / "checkpoints" / "last.pt")["progress"]["step"]
    assert 3 <= step < 100000
    result = run_in_process("train", f"resume={run}", f"trainer.max_steps={step + 2}",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert state(run / "checkpoints" / "last.pt")["progress"]["step"] == step + 2


@pytest.mark.slow
def test_kept_checkpoints_and_resuming_from_one(tmp_path):
    run = tmp_path / "run"
    loop.train(compose_train(*RUN, "trainer.max_steps=8", "trainer.checkpoint_every=2",
                             "trainer.keep_last=2"), run)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert kept == ["step-000006.pt", "step-000008.pt"]
    assert state(run / "checkpoints" / "step-000006.pt")["progress"]["step"] == 6
    result = run_in_process("train", f"resume={run / 'checkpoints' / 'step-000006.pt'}",
                            "trainer.max_steps=9", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step-000006.pt at step 6" in result.stdout
    assert state(run / "checkpoints" / "last.pt")["progress"]["step"] == 9


def best_copies(run: Path) -> dict[int, float]:
    """The kept best-step copies: step -> the val/acc saved with it."""
    return {state(path)["progress"]["step"]: state(path)["metrics"]["val/acc"]
            for path in (run / "checkpoints").glob("best-step-*.pt")}


def test_the_best_validations_are_kept_and_a_resumed_run_keeps_the_same(tmp_path):
    # digits at 2 steps a validation: accuracies that rise, fall back and tie.
    keep = ["debug=fast", "trainer.max_steps=12", "trainer.val_every=2", "trainer.keep_best=3"]
    run = tmp_path / "whole"
    loop.train(compose_train(*keep), run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    accuracy = {event.step: event.value for event in events.Scalars("val/acc")}
    expected = sorted(accuracy, key=lambda step: (-accuracy[step], step))[:3]
    assert sorted(best_copies(run)) == sorted(expected)
    assert all(value == pytest.approx(accuracy[step]) for step, value in best_copies(run).items())
    assert len(set(accuracy.values())) < len(accuracy) - 1  # ties were broken by step

    half = tmp_path / "half"
    loop.train(compose_train(*keep, "logger=none", "trainer.max_steps=6"), half)
    saved = OmegaConf.create(state(half / "checkpoints" / "last.pt")["config"])
    saved.trainer.max_steps, saved.resume = 12, str(half)
    loop.train(saved, half)
    assert best_copies(half) == best_copies(run)
    assert state(half / "checkpoints" / "last.pt")["progress"] == \
        state(run / "checkpoints" / "last.pt")["progress"]


def test_a_gan_keeps_its_newest_validations(tmp_path):
    run = tmp_path / "run"
    loop.train(compose_train("debug=fast", "logger=none", "model=gan", "trainer.val_every=2",
                             "trainer.keep_best=2"), run)
    kept = sorted(p.name for p in (run / "checkpoints").glob("best-step-*.pt"))
    assert kept == ["best-step-000004.pt", "best-step-000006.pt"]


def test_timed_checkpoints(tmp_path):
    run = tmp_path / "run"
    loop.train(compose_train(*RUN, "trainer.max_steps=5", "trainer.checkpoint_minutes=1e-9",
                             "trainer.keep_last=10"), run)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert kept == [f"step-00000{i}.pt" for i in range(1, 6)]  # every step: the time was up


@pytest.mark.slow
def test_resume_auto_and_latest(tmp_path):
    """A requeued job reruns its command: resume=auto starts afresh, then continues."""
    job = ["train", "debug=fast", "logger=none", "hydra.run.dir=outputs/slurm-42",
           "resume=auto"]
    fresh = run_in_process(*job, "trainer.max_steps=3", cwd=tmp_path)
    assert fresh.returncode == 0 and "no checkpoint yet, starting afresh" in fresh.stdout
    again = run_in_process(*job, "trainer.max_steps=4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    run = tmp_path / "outputs" / "slurm-42"
    assert state(run / "checkpoints" / "last.pt")["progress"]["step"] == 4
    latest = run_in_process("train", "resume=latest", "trainer.max_steps=5", cwd=tmp_path)
    assert latest.returncode == 0, latest.stderr
    assert f"resume=latest: continuing {run}" in latest.stdout
    assert state(run / "checkpoints" / "last.pt")["progress"]["step"] == 5


@pytest.mark.slow
def test_a_run_saved_before_newer_keys_resumes_and_is_evaluated(tmp_path):
    """A checkpoint of an older trainer lacks the keys added since: they take their defaults."""
    run = tmp_path / "old"
    loop.train(compose_train(*RUN, "trainer.max_steps=3"), run)
    for name in ("last", "best"):
        saved = state(run / "checkpoints" / f"{name}.pt")
        del saved["config"]["lr_find"], saved["config"]["trainer"]["profile"]
        torch.save(saved, run / "checkpoints" / f"{name}.pt")
    resumed = run_in_process("train", f"resume={run}", "trainer.max_steps=5", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert state(run / "checkpoints" / "last.pt")["progress"]["step"] == 5
    evaluated = run_in_process("evaluate", f"run_dir={run}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr


def test_resume_latest_without_runs(tmp_path):
    assert_clean_error(run_in_process("train", "resume=latest", cwd=tmp_path),
                       "resume=latest: no run under")


def test_non_finite_steps_are_skipped_up_to_a_limit(tmp_path, monkeypatch):
    real = loop.train_step

    def poison_once(param):
        def hook(grad):
            handle.remove()
            return grad * float("nan")

        handle = param.register_hook(hook)

    def poisoned(task, model, optimizers, *args, **kwargs):
        if poisoned.calls in (1, 3):  # the 2nd and 4th steps get a NaN gradient
            poison_once(optimizers[0].param_groups[0]["params"][0])
        poisoned.calls += 1
        return real(task, model, optimizers, *args, **kwargs)

    poisoned.calls = 0
    monkeypatch.setattr(loop, "train_step", poisoned)
    metrics = loop.train(compose_train(*RUN, "model.dropout=0", "trainer.max_steps=6",
                                       "trainer.skip_nonfinite=2"), tmp_path / "ok")
    saved = state(tmp_path / "ok" / "checkpoints" / "last.pt")
    assert saved["progress"]["skipped"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))

    poisoned.calls = 0
    from trainer.errors import UserError

    with pytest.raises(UserError, match="more than trainer.skip_nonfinite=1"):
        loop.train(compose_train(*RUN, "model.dropout=0", "trainer.max_steps=6",
                                 "trainer.skip_nonfinite=1"), tmp_path / "too_many")


def test_a_full_disk_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    import errno

    from trainer import checkpoint
    from trainer.errors import UserError

    run = tmp_path / "run"
    loop.train(compose_train(*RUN, "trainer.max_steps=2"), run)
    good = (run / "checkpoints" / "last.pt").read_bytes()
    real_save = torch.save

    def disk_fills(state, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills)
    with pytest.raises(UserError, match="No space left on device.*the previous last.pt is kept"):
        checkpoint.save(run / "checkpoints" / "last.pt", {"model": {}})
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not list((run / "checkpoints").glob("*.partial"))
    # A process killed mid-write leaves its .partial file behind; resuming never reads it.
    (run / "checkpoints" / "last.pt.partial").write_bytes(b"half a checkpoint")
    cfg = OmegaConf.create(state(run / "checkpoints" / "last.pt")["config"])
    cfg.trainer.max_steps, cfg.resume = 3, str(run)
    loop.train(cfg, run)
    assert state(run / "checkpoints" / "last.pt")["progress"]["step"] == 3


def test_kept_copies_are_made_where_hard_links_are_not_allowed(tmp_path, monkeypatch):
    """Some filesystems (exFAT, FUSE mounts of object stores) refuse hard links: the kept
    checkpoints are then copied."""
    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    run = tmp_path / "run"
    loop.train(compose_train(*RUN, "trainer.max_steps=4", "trainer.checkpoint_every=2",
                             "trainer.keep_last=2", "trainer.val_every=2",
                             "trainer.keep_best=1"), run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert {"step-000002.pt", "step-000004.pt"} <= set(names)
    assert [n for n in names if n.startswith("best-step-")] == [
        f"best-step-{state(run / 'checkpoints' / 'best.pt')['progress']['step']:06d}.pt"]
    assert not [n for n in names if n.endswith(".partial")]
    kept = state(run / "checkpoints" / "step-000004.pt")
    assert kept["progress"]["step"] == 4
