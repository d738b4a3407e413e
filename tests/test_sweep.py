"""Sweeps: every combination in its own job directory, failures recorded, a summary, Optuna."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAILING_MODELS, compose_train, run_cli, run_in_process
from trainer.cli import CONFIG_DIR
from trainer.run.sweep import summary_rows, write_record, write_summary
from trainer.tasks import family_of


def sweep_dir(root):
    [found] = list((root / "outputs" / "multirun").glob("*/*"))
    return found


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A grid sweep of three jobs, run once for the tests that read it: (result, sweep dir).
    A cnn of depth 4 halves an 8x8 digit to nothing: that one job fails, the other two run."""
    root = tmp_path_factory.mktemp("grid")
    result = run_in_process("train", "-m", "debug=fast", "model=cnn", "model.depth=1,2,4",
                            cwd=root)
    assert result.returncode == 0, result.stderr
    return result, sweep_dir(root)


@pytest.mark.slow
def test_a_grid_sweep_records_jobs_failures_and_a_summary(grid_sweep):
    result, sweep = grid_sweep
    records = {r["overrides"]: r for r in
               (json.loads((sweep / str(n) / "job.json").read_text()) for n in range(3))}
    failed = records["debug=fast model=cnn model.depth=4"]
    assert failed["status"] == "failed" and "halve a 8x8 image to nothing" in failed["error"]
    failed_log = (sweep / str(failed["job"]) / "train.log").read_text()
    assert "job failed: model.depth=4: 4 conv blocks" in failed_log
    assert "Traceback" not in failed_log
    completed = [r for r in records.values() if r["status"] == "completed"]
    assert len(completed) == 2
    assert {r["task"] for r in records.values()} == {"classification"}
    assert sum((sweep / str(n) / "metrics.json").is_file() for n in range(3)) == 2

    with open(sweep / "sweep_summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["status"] for row in rows] == ["completed"] * 2 + ["failed"]
    losses = [float(row["val/loss"]) for row in rows[:2]]
    assert losses == sorted(losses)  # best first by val/loss
    assert "| job | overrides | status |" in (sweep / "sweep_summary.md").read_text()
    assert "Sweep summary, best first by val/loss" in result.stdout
    assert "every job: debug=fast model=cnn\n" in result.stdout  # the table shows what differs
    assert "| model.depth=4 | failed |" in (sweep / "sweep_summary.md").read_text()

    # TensorBoard names each job's run by its overrides; the HParams entry is readable.
    [run] = (sweep / "0" / "tensorboard").iterdir()
    assert run.name == "debug=fast,model.depth=1,model=cnn"
    events = EventAccumulator(str(run))
    events.Reload()
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    assert "test/acc" in events.Tags()["scalars"]


def test_summary_orders_accuracy_high_first_and_failures_last(tmp_path):
    for job, status, acc in [(0, "completed", 0.5), (1, "failed", None), (2, "completed", 0.9)]:
        (tmp_path / str(job)).mkdir()
        write_record(tmp_path / str(job), {
            "job": job, "overrides": f"job={job}", "status": status, "seconds": 1.0,
            "error": None if acc else "boom", "metrics": {"val/acc": acc} if acc else {}})
    assert [r["job"] for r in summary_rows(tmp_path, "val/acc")] == [2, 0, 1]


def test_the_summary_ranks_jobs_of_one_task_together_never_a_gan_beside_a_classifier(tmp_path):
    jobs = [(0, "model=cnn", 0.30), (1, "model=gan", 0.01), (2, "model=cnn", 0.20),
            (3, "model=gan", 0.02)]
    for job, model, loss in jobs:
        (tmp_path / str(job)).mkdir()
        write_record(tmp_path / str(job), {  # as sweep_job records each job's task
            "job": job, "overrides": model, "status": "completed", "seconds": 1.0,
            "error": None, "metrics": {"val/loss": loss}, "task": family_of(compose_train(model))})
    rows = summary_rows(tmp_path, "val/loss")
    assert [(r["job"], r["task"]) for r in rows] == [
        (2, "classification"), (0, "classification"), (1, "adversarial"), (3, "adversarial")]
    ranked, table = write_summary(tmp_path, "val/loss")
    assert ranked == ("best first by val/loss within each task (classification, adversarial); "
                      "jobs of different tasks are not ranked against each other")
    assert table.splitlines()[0].split()[:3] == ["job", "task", "overrides"]
    assert ranked in (tmp_path / "sweep_summary.md").read_text()


def test_the_summary_names_shared_overrides_once_and_shortens_long_numbers(tmp_path):
    for job, lr in [(0, 0.004015543686135838), (1, 0.00024156772025296256)]:
        (tmp_path / str(job)).mkdir()
        write_record(tmp_path / str(job), {
            "job": job, "overrides": f"optimizer.lr={lr} debug=fast", "status": "completed",
            "seconds": 1.0, "error": None, "metrics": {"val/loss": lr}})
    ranked, text = write_summary(tmp_path, "val/loss")
    assert ranked == "best first by val/loss"
    shared, table = text.split("\n\n")
    assert shared == "every job: debug=fast"
    assert [line.split()[:2] for line in table.splitlines()[1:]] == [
        ["1", "optimizer.lr=0.0002416"], ["0", "optimizer.lr=0.004016"]]
    with open(tmp_path / "sweep_summary.csv") as file:  # the whole overrides, for scripts
        assert next(csv.DictReader(file))["overrides"] == \
            "optimizer.lr=0.00024156772025296256 debug=fast"


@pytest.mark.slow
def test_optuna_search_of_two_trials(tmp_path):
    # A search space given on the command line replaces the preset's (widths 16-128).
    result = run_in_process("train", "hparams_search=classification", "debug=fast",
                            "logger=none", "hydra.sweeper.n_trials=2", "model.width=choice(8,24)",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optimizer.lr" in best
    with open(sweep / "sweep_summary.csv") as file:
        rows = list(csv.DictReader(file))
    accuracies = [float(row["val/acc"]) for row in rows]
    assert len(accuracies) == 2 and accuracies == sorted(accuracies, reverse=True)
    assert all(" model.width=8 " in r["overrides"] or " model.width=24 " in r["overrides"]
               for r in rows)


def test_cluster_launcher_configs_compose():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for launcher in ("slurm", "submitit_slurm", "submitit_local"):
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "device.count=4"],
                          return_hydra_config=True)
            assert "submitit" in cfg.hydra.launcher._target_
        cfg = compose("train", overrides=["hydra/launcher=slurm", "device.count=4"],
                      return_hydra_config=True)
        assert cfg.hydra.launcher.gpus_per_node == 4 and cfg.hydra.launcher.timeout_min == 240


@pytest.mark.slow
def test_a_sweep_survives_failed_and_killed_jobs_and_resume_auto_finishes_it(tmp_path):
    """4 jobs two at a time; seed 0's is killed with SIGKILL and seed 1's raises in their third
    step (the first two jobs, so the sweep goes on after them). The other two finish; the same
    command again continues the failed two and keeps the finished two."""
    sweep = tmp_path / "sweep"
    command = ["train", "-m", "debug=fast", "logger=none", "trainer.checkpoint_every=2",
               "model._target_=failing_model.CrashingCNN", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "resume=auto",
               "seed=range(0,4)"]
    path = FAILING_MODELS
    first = run_cli(*command, cwd=tmp_path, env={**path, "CRASH": "seed0:kill,seed1:raise"})
    assert first.returncode == 0, first.stderr
    records = {n: json.loads((sweep / str(n) / "job.json").read_text()) for n in range(4)}
    assert {n for n, r in records.items() if r["status"] == "failed"} == {0, 1}
    assert "RuntimeError: deliberate failure" in records[1]["error"]
    assert "was killed by SIGKILL" in records[0]["error"]
    assert summary_statuses(sweep) == ["completed"] * 2 + ["failed"] * 2
    finished = {n: (sweep / str(n) / "metrics.json").stat().st_mtime_ns for n in (2, 3)}

    again = run_cli(*command, cwd=tmp_path, env=path)
    assert again.returncode == 0, again.stderr
    assert summary_statuses(sweep) == ["completed"] * 4
    for n in (0, 1):  # continued from the last.pt of step 2
        assert "at step 2" in (sweep / str(n) / "train.log").read_text()
    assert finished == {n: (sweep / str(n) / "metrics.json").stat().st_mtime_ns
                        for n in finished}


def summary_statuses(sweep):
    with open(sweep / "sweep_summary.csv") as file:
        return [row["status"] for row in csv.DictReader(file)]


@pytest.mark.slow
def test_resume_auto_refuses_a_sweep_directory_of_other_jobs(grid_sweep, tmp_path):
    # The grid sweep's directory, given to a sweep of other overrides: its job 0 is refused
    # before it trains (no child process).
    sweep = Path(shutil.copytree(grid_sweep[1], tmp_path / "sweep"))
    other = run_in_process("train", "-m", "debug=fast", "logger=none", "resume=auto",
                           f"hydra.sweep.dir={sweep}", "seed=1", cwd=tmp_path)
    assert other.returncode == 0, other.stderr  # the sweep goes on; the job is recorded failed
    record = json.loads((sweep / "0" / "job.json").read_text())
    assert record["status"] == "failed"
    assert "holds job 0 of another sweep" in record["error"]
    assert "model=cnn model.depth=1" in record["error"]
