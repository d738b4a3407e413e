"""A run directory has one writer, and a run from elsewhere is data, never code
(docs/run_directory.md): a second `train` of a run that trains is refused having changed
nothing; a crafted checkpoint builds nothing and writes nothing, whichever command opens it; a
corrupt last.pt is stepped over to the newest readable copy.

The crafted-checkpoint matrix runs in this process through the functions the commands call;
a few cases go through the real console scripts."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import PYTHON, assert_clean_error, compose_train, run_in_process
from trainer import checkpoint, run_lock
from trainer.config import saved_config
from trainer.errors import UserError


def writer(canary: Path) -> dict[str, Any]:
    """A node that, built by Hydra, writes `canary`: what a shared run must never do."""
    return {"_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(canary)]}, "written"]}


# The root of each group that builds an object, and a key it has.
ROOTS = {"model": ("model", "width"), "data": ("data", "batch_size"),
         "optimizer": ("optimizer", "lr"), "scheduler": ("scheduler", "warmup_steps"),
         "logger": ("logger.tensorboard", "subdir")}


def node(config: dict, where: str) -> dict:
    for key in where.split("."):
        config = config[key]
    return config


def swapped(where: str, key: str) -> tuple:
    return (lambda c, canary: node(c, where).update(_target_="argparse.Namespace",
                                                    **{key: writer(canary)}),
            f"{where}.{key}._target_='pathlib.Path.write_text': the run's config has no "
            "_target_ there")


CRAFTED: dict[str, tuple] = {
    **{f"{group}-swapped-target": (
        lambda c, canary, where=where: node(c, where).update(_target_="argparse.Namespace"),
        f"{where}._target_='argparse.Namespace' is not accepted from a saved run")
       for group, (where, _) in ROOTS.items()},
    **{f"{group}-swapped-with-a-writer": swapped(where, "extra")
       for group, (where, _) in ROOTS.items()},
    **{f"{group}-nested-under-an-existing-key": swapped(where, key)
       for group, (where, key) in ROOTS.items()},
    "args-at-a-root": (lambda c, canary: c["optimizer"].update(_args_=[writer(canary)]),
                       "optimizer._args_="),
    "reached-through-a-module": (
        lambda c, canary: c["model"].update(_target_="trainer.models.cnn.torch.save"),
        "model._target_='trainer.models.cnn.torch.save' is not accepted"),
    "a-private-helper": (
        lambda c, canary: c["data"].update(_target_="trainer.data.token_cache._write_atomic",
                                           target=str(canary), data="written"),
        "data._target_='trainer.data.token_cache._write_atomic' is not accepted"),
    "a-scheduler-that-is-no-scheduler": (
        lambda c, canary: c["scheduler"].update(_target_="trainer.optim.flat"),
        "scheduler._target_='trainer.optim.flat' is not accepted"),
    "a-wrong-type": (lambda c, canary: c["model"].update(width="wide"),
                     "model.width='wide' has the wrong type: expected int"),
    "a-wrong-type-in-a-schema": (lambda c, canary: c["trainer"].update(epochs="many"),
                                 "trainer.epochs: Value 'many'"),
    "an-unknown-key": (lambda c, canary: c["model"].update(colour="red"),
                       "unknown key model.colour for trainer.models.cnn.CNN"),
    "an-unknown-top-level-key": (lambda c, canary: c.update(callbacks={"a": 1}),
                                 "callbacks: Key 'callbacks' not in 'TrainConfig'"),
    "a-missing-group": (lambda c, canary: c.pop("optimizer"), "optimizer is missing"),
    "a-missing-target": (lambda c, canary: c["data"].pop("_target_"),
                         "data._target_ is missing"),
    "a-tensor-for-a-number": (lambda c, canary: c["optimizer"].update(lr=torch.tensor(0.1)),
                              "optimizer.lr holds a torch.Tensor, not a config value"),
    "an-interpolation": (lambda c, canary: c["data"].update(augment="${oc.env:HOME}"),
                         "data.augment='${oc.env:HOME}': an interpolation"),
}


@pytest.fixture(scope="module")
def saved(finished_run_template: Path) -> dict[str, Any]:
    return torch.load(finished_run_template / "checkpoints" / "best.pt", weights_only=True)


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_config_is_refused_naming_the_key(case, saved, tmp_path):
    mutate, fragment = CRAFTED[case]
    config = copy.deepcopy(saved["config"])
    mutate(config, tmp_path / "canary")
    with pytest.raises(UserError) as refused:
        saved_config(config, "RUN/checkpoints/best.pt")
    message = str(refused.value)
    assert message.startswith("the config saved in RUN/checkpoints/best.pt is refused"), message
    assert fragment in message and "\n" not in message
    assert not (tmp_path / "canary").exists()


def test_a_run_config_passes_and_only_the_user_trusts_targets_of_their_own(saved,
                                                                          monkeypatch):
    config = copy.deepcopy(saved["config"])
    assert saved_config(config, "best.pt").model._target_ == "trainer.models.cnn.CNN"
    config["model"]["_target_"] = "failing_model.CrashingCNN"  # tests/: a model of one's own
    with pytest.raises(UserError, match="TRAINER_TRUSTED_TARGETS=PACKAGE"):
        saved_config(config, "best.pt")
    saved_config(config, "best.pt", trusted={"failing_model.CrashingCNN"})  # typed by the user
    monkeypatch.setenv("TRAINER_TRUSTED_TARGETS", "mine,failing_model")
    saved_config(config, "best.pt")
    config["model"]["extra"] = writer(Path("canary"))  # trusted, but data all the same
    with pytest.raises(UserError, match="model.extra._target_='pathlib.Path.write_text'"):
        saved_config(config, "best.pt")


class Writes:
    """A pickled object that writes a file when unpickled by a loader that is not weights-only."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        return Path.write_text, (self.canary, "written")


def crafted_run(template: Path, folder: Path, kind: str, canary: Path) -> Path:
    """A copy of the finished run whose best.pt and last.pt are crafted as `kind` says."""
    run = Path(shutil.copytree(template, folder))
    for name in ("best.pt", "last.pt"):
        path = run / "checkpoints" / name
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:2000])
        elif kind == "pickled-object":
            torch.save({"model": Writes(canary), "config": {}, "progress": {}}, path)
        else:
            state = torch.load(path, weights_only=True)
            where = ROOTS[kind][0]
            node(state["config"], where).update(_target_="argparse.Namespace",
                                                extra=writer(canary))
            torch.save(state, path)
    return run


def listing(run: Path) -> dict[str, tuple[int, int]]:
    """Every path under the run with its size and modification time."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in [run, *run.rglob("*")]}


def open_with_every_command(run: Path) -> list[str]:
    """What each command does first with a run (train resume=, evaluate, predict, generate,
    export-model, init_from=): the error each raises."""
    from trainer.run.init_from import load_matching
    from trainer.run.launch import resumed_config
    from trainer.use.jobs import evaluate_job, export_job, generate_job, predict_job

    common = {"run_dir": str(run), "checkpoint": "best", "device": None}
    opened = [
        lambda: resumed_config(compose_train(f"resume={run}"), [f"resume={run}"]),
        lambda: evaluate_job(OmegaConf.create({**common, "split": "test", "fid_features": None,
                                               "data": {}})),
        lambda: predict_job(OmegaConf.create({**common, "inputs": None, "outputs": None,
                                              "top_k": 1, "count": 1, "seed": 0})),
        lambda: generate_job(OmegaConf.create({**common, "prompt": None, "length": 5,
                                               "temperature": 1.0, "top_k": None, "seed": 0})),
        lambda: export_job(OmegaConf.create({**common, "format": "torch_export",
                                             "outputs": None, "count": 16})),
        lambda: load_matching(torch.nn.Linear(2, 2), str(run)),
    ]
    errors = []
    for command in opened:
        with pytest.raises(UserError) as refused:
            command()
        errors.append(str(refused.value))
    return errors


@pytest.mark.parametrize("kind", [*ROOTS, "truncated", "pickled-object"])
def test_every_command_refuses_a_crafted_run_and_writes_nothing(kind, finished_run_template,
                                                                tmp_path):
    canary = tmp_path / "canary"
    run = crafted_run(finished_run_template, tmp_path / "run", kind, canary)
    before = listing(run)
    expected = "is corrupt or not a trainer checkpoint" if kind in ("truncated",
                                                                    "pickled-object") \
        else f"{ROOTS[kind][0]}.extra._target_='pathlib.Path.write_text'"
    for error in open_with_every_command(run):
        assert expected in error and "\n" not in error, error
    assert not canary.exists()
    assert listing(run) == before


@pytest.mark.parametrize("command", [
    ["evaluate", "run_dir={run}"], ["export-model", "run_dir={run}"], ["train", "resume={run}"]])
def test_the_commands_refuse_the_crafted_run_in_one_line(command, finished_run_template,
                                                         tmp_path):
    """As reported: a data config built as argparse.Namespace with a node that writes a file,
    opened by the console scripts. Hydra writes nothing either (no .hydra/resumed-*, no log);
    and the same command again looks again."""
    canary = tmp_path / "canary"
    run = crafted_run(finished_run_template, tmp_path / "run", "data", canary)
    before = listing(run)
    for _ in range(2):
        result = run_in_process(command[0], command[1].format(run=run), cwd=tmp_path)
        assert_clean_error(result, "is refused, nothing was built: data.extra._target_="
                           "'pathlib.Path.write_text'")
    assert not canary.exists()
    assert listing(run) == before
    assert run_lock.holder(run) is None and run_lock.descriptor(run) is None


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory) -> Path:
    """A debug=fast run of 6 steps keeping step-000004.pt and step-000006.pt."""
    from trainer.run.loop import train

    run = tmp_path_factory.mktemp("kept") / "run"
    train(compose_train("debug=fast", "logger=none", "trainer.checkpoint_every=2",
                        "trainer.keep_last=2"), run)
    return run


def corrupt(path: Path) -> None:
    """Truncated, as a full disk or a torn copy leaves it (a new file: step copies of the same
    step are hard links of last.pt, and a copy elsewhere would not be)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:1000])


def test_an_unreadable_last_pt_resumes_from_the_newest_readable_step_copy(kept_run, tmp_path,
                                                                          caplog):
    run = Path(shutil.copytree(kept_run, tmp_path / "run"))
    checkpoints = run / "checkpoints"
    corrupt(checkpoints / "last.pt")
    corrupt(checkpoints / "step-000006.pt")
    path, state = checkpoint.resumable(str(run))
    assert path == checkpoints / "step-000004.pt" and state["progress"]["step"] == 4
    assert f"checkpoint {checkpoints / 'last.pt'} is corrupt" in caplog.text
    assert "resuming from step-000004.pt instead, the newest readable copy of last.pt " \
           "(step 4)" in caplog.text
    corrupt(checkpoints / "step-000004.pt")
    with pytest.raises(UserError, match=r"best.pt is readable \(step \d\): continue from it with "
                                        f"train resume={checkpoints / 'best.pt'}"):
        checkpoint.resumable(str(run))
    corrupt(checkpoints / "best.pt")
    with pytest.raises(UserError, match="no other checkpoint of this run can be read "
                                        r"\(it has best.pt, last.pt, step-000004.pt"):
        checkpoint.resumable(str(run))
    named = str(checkpoints / "last.pt")  # a file named itself is not swapped for another
    with pytest.raises(UserError, match="is corrupt"):
        checkpoint.resumable(named)


def test_train_resume_steps_over_a_corrupt_last_pt(kept_run, tmp_path):
    run = Path(shutil.copytree(kept_run, tmp_path / "run"))
    corrupt(run / "checkpoints" / "last.pt")
    result = run_in_process("train", f"resume={run}", "trainer.max_steps=7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-000006.pt instead" in result.stdout
    assert "step-000006.pt at step 6" in result.stdout
    assert checkpoint.load(run / "checkpoints" / "last.pt")["progress"]["step"] == 7


def hold_in_another_process(run: Path) -> subprocess.Popen:
    """A process holding run's lock, as a training process does, until it is killed."""
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, time; from trainer import run_lock; "
         "run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(run)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path, capsys):
    from trainer.cli.run_dirs import refuse_held_sweep

    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    holder = hold_in_another_process(run)
    recorded = (run / run_lock.LOCK).read_bytes()
    who = run_lock.holder(run)
    assert who is not None and who.startswith(f"pid {holder.pid} on host ")
    with pytest.raises(run_lock.RunHeld, match=f"is being trained by pid {holder.pid} .*: "
                       f"one process trains a run at a time.*kill -TERM {holder.pid}"):
        run_lock.acquire(run)
    with pytest.raises(SystemExit):  # train -m hydra.sweep.dir=... while a job of it trains
        refuse_held_sweep(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert capsys.readouterr().err.startswith(f"error: {run} is being trained by pid")
    assert (run / run_lock.LOCK).read_bytes() == recorded
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run_lock.holder(run) is None  # the kernel dropped it: nothing stale
    with run_lock.held(run):
        assert f'"pid": {os.getpid()}' in (run / run_lock.LOCK).read_text()
        assert run_lock.holder(run) is None  # this process's own
    assert run_lock.descriptor(run) is None


def wait_for(test: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not test():
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.1)


@pytest.mark.slow  # three train processes
def test_a_second_train_is_refused_while_the_first_trains_and_accepted_once_it_is_killed(
        tmp_path):
    from trainer.use.jobs import evaluate_job

    run = tmp_path / "run"
    first = subprocess.Popen(
        ["train", "debug=fast", "logger=none", "trainer.max_steps=100000",
         "trainer.epochs=1000", "trainer.checkpoint_every=1", f"hydra.run.dir={run}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run / "checkpoints" / "best.pt").is_file() and run_lock.holder(run),
                 "lock and best.pt")
        first.send_signal(signal.SIGSTOP)  # still holding its lock: the folder stands still
        # once it has stopped: a signal takes effect later, a checkpoint can be half written
        assert os.WIFSTOPPED(os.waitpid(first.pid, os.WUNTRACED)[1])
        before = listing(run)
        for second_command in ([f"resume={run}"], ["resume=auto", f"hydra.run.dir={run}"]):
            second = run_in_process("train", *second_command, cwd=tmp_path)
            assert_clean_error(second, f"is being trained by pid {first.pid} on host",
                               f"kill -TERM {first.pid}")
        assert listing(run) == before  # no .hydra/resumed-*, no line in train.log
        metrics = evaluate_job(OmegaConf.create({  # a reader goes on meanwhile
            "run_dir": str(run), "checkpoint": "best", "device": None, "split": "test",
            "fid_features": None, "data": {}}))
        assert "test/loss" in metrics
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = checkpoint.load(run / "checkpoints" / "last.pt")["progress"]["step"]
    third = run_in_process("train", f"resume={run}", f"trainer.max_steps={step + 1}",
                           cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert f"at step {step}" in third.stdout and run_lock.holder(run) is None
