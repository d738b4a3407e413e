"""MLflow and W&B beside TensorBoard: what each holds after a run, read back with its own
client (MLflow: a local sqlite store and a real `mlflow server`; W&B: an offline run's file)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import compose_train, run_dirs, run_in_process
from trainer.errors import UserError


def mlflow_run(run_dir, tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return client, client.get_run(json.loads((run_dir / "mlflow.json").read_text())["run_id"])


def artifacts(client, run_id, folder=None):
    for item in client.list_artifacts(run_id, folder):
        yield from artifacts(client, run_id, item.path) if item.is_dir else [item.path]


@pytest.mark.slow
def test_mlflow_beside_tensorboard_and_resumed_into_the_same_run(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.run.loop import train

    monkeypatch.chdir(tmp_path)  # an sqlite store keeps its artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    first = ["debug=fast", "model=autoencoder", "logger=[tensorboard,mlflow]",
             f"logger.mlflow.tracking_uri={uri}", "logger.mlflow.log_checkpoint=true"]
    train(compose_train(*first, "trainer.max_steps=4"), run)
    train(compose_train(*first, "trainer.max_steps=6", f"resume={run}"), run)

    client, found = mlflow_run(run, uri)
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert len(client.search_runs([found.info.experiment_id])) == 1  # resumed: the same run
    assert found.data.params["model.width"] == "16" and found.data.params["model"] == "autoencoder"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history if m.step > 4] == [6]  # continued where it stopped
    assert {"val/mse", "test/mse", "perf/samples_per_s"} <= set(found.data.metrics)
    assert found.data.metrics["test/mse"] == json.loads((run / "metrics.json").read_text())[
        "test/mse"]
    stored = set(artifacts(client, found.info.run_id))
    assert {"config.yaml", "metrics.json", "checkpoints/best.pt"} <= stored
    assert any(path.startswith("images/samples_reconstruction") for path in stored)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "test/mse" in events.Tags()["scalars"]


@pytest.mark.slow
def test_a_run_resumed_from_an_older_checkpoint_logs_each_step_once_to_mlflow(tmp_path,
                                                                             monkeypatch):
    from trainer.run.loop import train

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    common = ["debug=fast", "logger=[mlflow]", f"logger.mlflow.tracking_uri={uri}",
              "trainer.checkpoint_every=2", "trainer.keep_last=4"]
    train(compose_train(*common), run)  # logs steps 2, 4 and 6
    client, found = mlflow_run(run, uri)
    before = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}
    # As if killed after step 6 with its last checkpoint at step 2: steps 4 and 6 come again.
    train(compose_train(*common, f"resume={run / 'checkpoints' / 'step-000002.pt'}"), run)
    after = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in after) == [2, 4, 6]
    assert {m.step: m.value for m in after} == before


def wandb_records(run_dir):
    """(history rows, summary, config keys, run name) of the offline W&B run in run_dir."""
    from wandb.proto import wandb_internal_pb2

    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary, config, name = [], {}, set(), None
    for record in wandb_log(path, wandb_internal_pb2.Record):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({key_of(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({key_of(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config |= {i.key for i in record.config.update}
        elif kind == "run":
            name = record.run.display_name
    return history, summary, config, name


def wandb_log(path, record_type, timeout: float = 30.0) -> list:
    """The records of a finished offline run's .wandb file. run.finish() can return before
    wandb-core has written them (seen under load: the file still held only its header), so
    this waits for the run's last record, `exit`."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        records = []
        try:
            for data in leveldb_log(path.read_bytes()):
                records.append(record_type())
                records[-1].ParseFromString(data)
        except DecodeError:  # a record still being written
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.1)


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)  # "train/loss" comes as nested ["train", "loss"]


def leveldb_log(data: bytes, block: int = 32768):
    """The records of a .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB
    blocks of pieces, each with a 7-byte header: checksum, length, FULL/FIRST/MIDDLE/LAST)."""
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield pieces
            pieces = b""


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_text_and_config(tmp_path, text_file, caplog):
    from trainer.run.loop import train

    caplog.set_level(logging.INFO, logger="trainer")
    run = tmp_path / "run"
    train(compose_train("debug=fast", "model=transformer", "data=text", f"data.path={text_file}",
                        "logger=wandb", "logger.wandb.mode=offline"), run)
    history, summary, config, name = wandb_records(run)
    assert [row["_step"] for row in history if "train/loss" in row] == [2, 4, 6]
    [sample] = [row["samples/text/path"] for row in history if "samples/text/path" in row][-1:]
    [html] = (run / "wandb").glob(f"offline-run-*/files/{sample}")
    assert "<pre>" in html.read_text()
    assert summary["test/loss"] == json.loads((run / "metrics.json").read_text())["test/loss"]
    assert {"model.width", "data.block_size", "seed"} <= config and name == "run"
    assert f"upload this run later with: wandb sync {run / 'wandb'}" in caplog.text


@pytest.mark.parametrize(("uri", "message"), [
    ("file:./mlruns", "logger.mlflow: the tracking store file:./mlruns cannot be used: The "
                      "filesystem tracking backend"),
    ("http://127.0.0.1:9", "logger.mlflow.tracking_uri=http://127.0.0.1:9: no server answers "
                           "there"),
])
def test_an_unusable_mlflow_store_is_one_clear_line(tmp_path, monkeypatch, uri, message):
    from trainer.run.loop import train

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        train(compose_train("debug=fast", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}"),
              tmp_path / "run")


def test_a_missing_tracker_names_its_extra(monkeypatch):
    import importlib.util

    from trainer.config import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlflow" else real(name, *args))
    with pytest.raises(UserError, match=r"logger.mlflow needs the mlflow package, an optional "
                                        r"extra: pip install 'trainer\[mlflow\]'"):
        validate(compose_train("logger=[tensorboard,mlflow]"))


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # Without its job runner: ten more processes the test never uses, on two cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn workers it started
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_sweep_names_its_jobs_in_every_logger_on_an_mlflow_server(tmp_path, mlflow_server):
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "WANDB_MODE": "offline"}
    result = run_in_process("train", "-m", "debug=fast", "seed=0,1",
                            "logger=[tensorboard,mlflow,wandb]", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    jobs = run_dirs(tmp_path)
    assert len(jobs) == 2
    for job, seed in zip(jobs, (0, 1), strict=True):
        name = f"debug=fast,seed={seed}"
        client, found = mlflow_run(job, mlflow_server)
        assert found.info.run_name == name and found.info.status == "FINISHED"
        assert "test/acc" in found.data.metrics
        assert "metrics.json" in set(artifacts(client, found.info.run_id))
        assert wandb_records(job)[3] == name
        assert [p.name for p in (job / "tensorboard").iterdir()] == [name]


def test_wandb_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    from trainer.trackers import _wandb_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert _wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode() == "disabled"
