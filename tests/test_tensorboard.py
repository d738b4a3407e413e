"""What TensorBoard shows: read back with its own EventAccumulator and from a live server."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train
from trainer.run.loop import train


def events(run_dir):
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gan")
    train(compose_train("debug=fast", "model=gan"), run_dir)
    return run_dir


def test_scalars_images_config_and_hparams(gan_run):
    tags = events(gan_run).Tags()
    for tag in ("train/loss", "train/d_loss", "train/g_loss", "train/d_real", "train/d_fake",
                "train/d_grad_norm", "train/g_grad_norm", "train/lr", "val/loss", "test/loss",
                "test/d_loss", "perf/samples_per_s",
                "perf/step_ms", "perf/data_wait_pct", "perf/peak_mem_mb"):
        assert tag in tags["scalars"], tag
    assert "samples/generated" in tags["images"]
    assert "config/text_summary" in tags["tensors"]
    plugins = events(gan_run).PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info",
            "_hparams_/session_end_info"} <= set(plugins)


def test_language_model_logs_text_samples_and_tokens_per_second(tmp_path, text_file):
    train(compose_train("debug=fast", "model=rnn", "data=text", f"data.path={text_file}"),
          tmp_path)
    tags = events(tmp_path).Tags()
    assert "samples/text/text_summary" in tags["tensors"]
    assert {"val/loss", "val/ppl", "perf/tokens_per_s"} <= set(tags["scalars"])


def test_autoencoder_shows_inputs_beside_reconstructions(tmp_path):
    train(compose_train("debug=fast", "model=autoencoder"), tmp_path)
    assert "samples/reconstruction" in events(tmp_path).Tags()["images"]
    assert {"val/mse", "test/mse"} <= set(events(tmp_path).Tags()["scalars"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_a_live_tensorboard_server_lists_the_run_and_its_tags(gan_run):
    port = free_port()
    server = subprocess.Popen(
        ["tensorboard", "--logdir", str(gan_run), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, runs = time.monotonic() + 60, []
        while time.monotonic() < deadline and "tensorboard" not in runs:
            time.sleep(1)
            try:
                runs = get_json(f"http://127.0.0.1:{port}/data/runs")
            except OSError:
                continue
        assert "tensorboard" in runs
        scalars = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
        assert {"train/loss", "test/d_loss", "perf/step_ms"} <= set(scalars["tensorboard"])
        images = get_json(f"http://127.0.0.1:{port}/data/plugin/images/tags")
        assert "samples/generated" in images["tensorboard"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_vae_shows_samples_from_its_prior_and_reports_kl(tmp_path):
    train(compose_train("debug=fast", "model=autoencoder", "model.variational=true",
                        "model.conv=true"), tmp_path)
    tags = events(tmp_path).Tags()
    assert {"samples/prior", "samples/reconstruction"} <= set(tags["images"])
    assert {"train/kl", "val/kl", "val/mse", "test/kl"} <= set(tags["scalars"])
    assert (tmp_path / "samples" / "prior.png").is_file()


def test_a_classifier_shows_the_test_split_class_by_class(tmp_path):
    train(compose_train("debug=fast"), tmp_path)
    assert "test/per_class/text_summary" in events(tmp_path).Tags()["tensors"]
    table = (tmp_path / "samples" / "per_class.txt").read_text()
    assert len(table.split("true \\ predicted")[1].splitlines()) == 11  # a row per digit
