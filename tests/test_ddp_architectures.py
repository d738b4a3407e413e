"""Every architecture and each of its options trains under DDP on gloo, two processes each (apart
from test_distributed.py so that the two test workers share the multi-process tests evenly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, run_dirs

pytestmark = pytest.mark.slow  # several processes each: the full suite, not the fast tier


def metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


DDP_MODELS = ["rnn", "transformer", "gan", "autoencoder"]


def test_every_other_architecture_trains_under_ddp_in_a_sweep_of_two_process_jobs(tmp_path):
    result = run_cli("train", "-m", "debug=fast", "device=cpu", "device.count=2",
                     f"model={','.join(DDP_MODELS)}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep] = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [str(n) for n in range(len(DDP_MODELS))]
    for job in jobs:
        assert "test/loss" in metrics(sweep / job)
        assert len(list((sweep / job / "tensorboard").rglob("events.*"))) == 1
    assert len(run_dirs(tmp_path)) == len(DDP_MODELS)  # one per job, none per rank


@pytest.mark.parametrize("options", [
    ["model=gan", "model.conv=true", "model.spectral_norm=true"],
    ["model=autoencoder", "model.conv=true", "model.variational=true", "model.denoise=0.1"],
    ["model=rnn", "model.cell=gru", "model.bidirectional=true"],
    ["model=transformer", "model.pool=cls", "model.rotary=true",
     "model.activation_checkpointing=true", "model.lora_rank=2"],  # frozen weights, too
    ["model.backbone=resnet18", "model.input_size=null", "model.freeze_backbone=true"],
    ["model.residual=true", "model.test_flip=true", "data.augment=crop",  # channels-last too
     "model.whiten=true", "trainer.ema_decay=0.9", "trainer.label_smoothing=0.1"],
    # Sharded, a VAE's evaluation and prior samples call encode and decode outside forward.
    ["model=autoencoder", "model.conv=true", "model.variational=true", "device.strategy=fsdp"],
])
def test_each_architecture_option_trains_under_ddp(tmp_path, options):
    result = run_cli("train", "debug=fast", "device=cpu", "device.count=2", *options,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = run_dirs(tmp_path)
    assert "test/loss" in metrics(run)
