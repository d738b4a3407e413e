"""Several processes on the CPU over gloo: the same code path as several GPUs over NCCL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (
    FAILING_MODELS,
    assert_clean_error,
    compose_train,
    run_cli,
    run_dirs,
    run_in_process,
)
from trainer.ranks import adopt_slurm_env
from trainer.run.loop import train

pytestmark = pytest.mark.slow  # several processes each: the full suite, not the fast tier
# No dropout or batch norm, so one process at batch 16 and two at batch 8 compute the same thing.
# One validation, at the end: best.pt is then the final model in every run compared.
EXACT = ["debug=fast", "device=cpu", "model.dropout=0", "trainer.log_every=1",
         "trainer.val_every=6"]


def train_ok(tmp_path: Path, *args: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return run_dirs(tmp_path)[-1]


def scalars(run: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


def assert_same_weights(a: Path, b: Path) -> None:
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
               for run in (a, b)]
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=1e-5, atol=1e-7)


def assert_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """EXACT in one process at batch 16 (in this process: the same numbers as the command)."""
    run = tmp_path_factory.mktemp("one")
    train(compose_train(*EXACT, "data.batch_size=16"), run)
    return run


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """EXACT in two processes at batch 8 each, through the command."""
    return train_ok(tmp_path_factory.mktemp("two"), *EXACT, "data.batch_size=8", "device.count=2")


def test_two_processes_reproduce_one_with_the_same_global_batch(tmp_path, one, two):
    assert scalars(two, "train/loss") == pytest.approx(scalars(one, "train/loss"), rel=1e-5)
    assert scalars(two, "val/loss") == pytest.approx(scalars(one, "val/loss"), rel=1e-5)
    assert_close(metrics(two), metrics(one))
    assert_same_weights(two, one)
    # The ranks' confusion matrices add up to the one process's.
    per_class = [(run / "samples" / "per_class.txt").read_text() for run in (one, two)]
    assert per_class[0] == per_class[1] and "most often taken for" in per_class[0]
    # Only rank 0 wrote: one run directory, one TensorBoard event file.
    assert len(run_dirs(two.parents[2])) == 1
    assert len(list((two / "tensorboard").glob("events.*"))) == 1


def test_external_torchrun_joins_and_accumulates_the_same_global_batch(tmp_path, one):
    """Under torchrun, two ranks of two micro-batches of 4 each reproduce one process at 16
    (the loop is the same in launched and joined processes: one run covers both)."""
    result = run_cli("torchrun", "--standalone", "--nproc-per-node=2", "-m", "trainer", *EXACT,
                     "data.batch_size=4", "trainer.accumulate=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)  # one for the command, none per rank
    assert_close(metrics(run), metrics(one))


def crashed(tmp_path: Path, how: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A two-process run whose rank 1 fails (`how`, tests/failing_model.py) in its third step,
    after last.pt of step 2: the group stops, and the command fails. The others would wait
    device.timeout_s for it if nothing stopped them: an hour here, so a group left waiting
    fails the test by run_cli's timeout, whatever the machine's speed."""
    temporary = tmp_path / "tmp"  # where the launcher keeps each rank's error, and removes it
    temporary.mkdir()
    result = run_cli("train", *args, "device.count=2", "trainer.checkpoint_every=2",
                     "device.timeout_s=3600", "model._target_=failing_model.CrashingCNN",
                     cwd=tmp_path, timeout=300,
                     env={**FAILING_MODELS, "CRASH": f"rank1:{how}", "TMPDIR": str(temporary)})
    assert result.returncode != 0
    assert not [*temporary.glob("trainer-workers-*"), *temporary.glob("torchelastic_*")]
    [run] = run_dirs(tmp_path)
    return result, run


# The CNN trains in two processes in the tests above as well.
@pytest.mark.parametrize("how", ["raise", "raise_abort", "oom"])
def test_a_failing_rank_stops_the_group_and_says_how_to_resume(tmp_path, how):
    result, run = crashed(tmp_path, how, "debug=fast", "device=cpu")
    if how == "oom":  # a user error on one rank alone: its one line, and no other
        assert_clean_error(result, "error: out of memory: GPU 0 could not allocate 2 GiB more",
                           "lower data.batch_size=16", "resume from its last checkpoint with: "
                           f"train resume={run}")
        return
    # A crash in the model's code: its traceback, then the line naming the rank, even when the
    # process then aborts as it exits (seen under load).
    assert "RuntimeError: deliberate failure" in result.stderr
    assert ("error: training process rank 1 failed: RuntimeError: deliberate failure "
            "(printed above)") in result.stderr
    assert f"resume from its last checkpoint with: train resume={run}" in result.stderr


def test_a_killed_rank_stops_the_group_and_its_checkpoints_move_between_world_sizes(tmp_path,
                                                                                   one):
    """Two processes to step 2 (rank 1 killed in step 3), resumed in one to step 4, then in two
    to step 6: the same as one process never stopping. The crashing CNN is the CNN until it
    crashes, and resumed without CRASH it does not."""
    result, run = crashed(tmp_path, "kill", *EXACT, "data.batch_size=8")
    assert_clean_error(result, "error: training process rank 1 was killed by",
                       f"resume from its last checkpoint with: train resume={run}")
    per_rank = {1: "data.batch_size=16", 2: "data.batch_size=8"}
    for world, steps in ((1, 4), (2, 6)):
        result = run_cli("train", f"resume={run}", f"trainer.max_steps={steps}", per_rank[world],
                         f"device.count={world}", cwd=tmp_path, env=FAILING_MODELS)
        assert result.returncode == 0, result.stderr
        if world == 1:
            assert "resumed from" in result.stdout and "at step 2" in result.stdout
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert state["progress"]["step"] == steps and state["config"]["device"]["count"] == world
    assert (run / "metrics.json").is_file()
    assert_same_weights(run, one)


def test_a_user_error_in_the_processes_is_one_line(tmp_path):
    """Every rank diverges; whichever stops first, the user sees one line, as in one process."""
    result = run_cli("train", "debug=fast", "device=cpu", "device.count=2", "optimizer=sgd",
                     "optimizer.lr=1e12", "trainer.grad_clip=0", cwd=tmp_path)
    assert_clean_error(result, "training diverged", "optimizer.lr")
    assert "training process rank" not in result.stderr


def test_srun_task_numbers_become_torch_ranks(monkeypatch):
    environment = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    monkeypatch.setattr(os, "environ", environment)  # adopt_slurm_env writes os.environ
    adopt_slurm_env()
    assert (environment["RANK"], environment["WORLD_SIZE"], environment["LOCAL_RANK"]) == \
        ("3", "4", "1")


def test_two_nodes_through_a_rendezvous_endpoint_make_one_run(tmp_path, one):
    """Two launchers on this machine stand in for two nodes (one process each)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["train", *EXACT, "data.batch_size=8", "device.nodes=2",
            f"device.rdzv_endpoint=127.0.0.1:{port}", "device.rdzv_id=two-nodes"]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    processes = []
    for node in nodes:
        node.mkdir()
        processes.append(subprocess.Popen(args, cwd=node, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=180) for process in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    runs = [run for node in nodes for run in run_dirs(node)]
    assert len(runs) == 1
    assert_close(metrics(runs[0]), metrics(one))


def test_fsdp_shards_the_transformer_trains_resumes_and_evaluates(tmp_path):
    # Its blocks recomputed in the backward pass, as a model too big for memory would be.
    args = [*EXACT, "model=transformer", "data.batch_size=8", "device.count=2",
            "device.strategy=fsdp", "model.activation_checkpointing=true"]
    one = tmp_path / "one"
    train(compose_train(*EXACT, "model=transformer", "data.batch_size=16"), one)
    # It also keeps its sharded checkpoint of step 4, to resume below.
    whole = train_ok(tmp_path / "whole", *args, "trainer.checkpoint_every=4", "trainer.keep_last=2")
    # Float sums in another order move the last digits; Adam can enlarge them a little.
    for key, value in metrics(one).items():
        assert metrics(whole)[key] == pytest.approx(value, rel=1e-4), key
    # The gradient norm is the whole model's, gathered from the shards.
    assert scalars(whole, "train/grad_norm") == pytest.approx(scalars(one, "train/grad_norm"),
                                                              rel=1e-4)
    # The checkpoint holds the whole model: one process evaluates it.
    result = run_in_process("evaluate", f"run_dir={whole}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    for key, value in metrics(whole).items():
        assert printed[key] == pytest.approx(value, rel=1e-6), key
    # Stopped at step 4 (a copy of the run, its sharded save of step 4 as last.pt) and resumed
    # sharded: the same weights as never stopping.
    split = Path(shutil.copytree(whole, tmp_path / "split"))
    (split / "checkpoints" / "step-000006.pt").unlink()
    (split / "checkpoints" / "step-000004.pt").replace(split / "checkpoints" / "last.pt")
    result = run_cli("train", f"resume={split}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert_same_weights(split, whole)


def test_the_rank_that_failed_first_is_named_whatever_the_agent_saw_first(tmp_path):
    """The agent reports one failed rank, found at its next poll: often the peer that lost its
    connection to the rank that failed. Each rank notes how and when it ended; one that noted
    nothing died by a signal."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from trainer.launcher import ENDED, _group_failure

    def ended(rank: int, message: str, at: float | None) -> ProcessFailure:
        folder = tmp_path / "attempt_0" / str(rank)
        folder.mkdir(parents=True, exist_ok=True)
        error = {"message": message, "extraInfo": {"py_callstack": f"{message}\n",
                                                   "timestamp": "1"}}
        (folder / "error.json").write_text(json.dumps({"message": error}))
        if at is not None:
            (folder / f"error.json{ENDED}").write_text(json.dumps({"at": at, "exit": 1}))
        return ProcessFailure(rank, 4242, 1, str(folder / "error.json"))

    lost_peer = "RuntimeError: Connection reset by peer"
    seen = ended(0, lost_peer, at=1000.2)
    ended(1, "RuntimeError: deliberate failure", at=1000.1)  # still exiting when seen
    assert "rank 1 failed: RuntimeError: deliberate failure" in str(
        _group_failure(ChildFailedError("worker", {0: seen})))
    for noted in (tmp_path / "attempt_0" / "1").iterdir():  # killed: nothing noted
        noted.unlink()
    assert "rank 1 was killed by a signal" in str(
        _group_failure(ChildFailedError("worker", {0: seen})))
