"""Every architecture and each of its options trains under DDP on gloo, two processes each (apart
from test_distributed.py so that the two test workers share the multi-process tests evenly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli, run_dirs

pytestmark = pytest.mark.slow  # several processes each: the full suite, not the fast tier

# Each architecture with its options, as many of them together as one model takes (the CNN's
# backbone excludes residual and whiten, so it trains twice); the CNN's defaults train in
# two processes in test_distributed.py as well.
OPTIONS = {
    "gan": ["model=gan", "model.conv=true", "model.spectral_norm=true"],
    "vae": ["model=autoencoder", "model.conv=true", "model.variational=true", "model.denoise=0.1"],
    "rnn": ["model=rnn", "model.cell=gru", "model.bidirectional=true"],
    "transformer": ["model=transformer", "model.pool=cls", "model.rotary=true",
                    "model.activation_checkpointing=true", "model.lora_rank=2"],  # frozen weights
    "backbone": ["model.backbone=resnet18", "model.input_size=null", "model.freeze_backbone=true"],
    "resnet": ["model.residual=true", "model.test_flip=true", "data.augment=crop",  # channels-last
               "model.whiten=true", "trainer.ema_decay=0.9", "trainer.label_smoothing=0.1"],
    # Sharded, a VAE's evaluation and prior samples call encode and decode outside forward.
    "vae_fsdp": ["model=autoencoder", "model.conv=true", "model.variational=true",
                 "device.strategy=fsdp"],
}


def metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


def write_experiment(folder: Path, name: str, options: list[str]) -> None:
    """The options as the user's own experiment file (for `--config-dir`): a `model=NAME` choice
    in its defaults, the other keys as values."""
    config = OmegaConf.to_container(
        OmegaConf.from_dotlist([o for o in options if not o.startswith("model=")]))
    choices = [o.split("=", 1)[1] for o in options if o.startswith("model=")]
    if choices:
        config = {"defaults": [{"override /model": choices[0]}], **config}
    (folder / "experiment").mkdir(parents=True, exist_ok=True)
    (folder / "experiment" / f"{name}.yaml").write_text(
        "# @package _global_\n" + OmegaConf.to_yaml(config))


def test_each_architecture_option_trains_under_ddp_in_a_sweep_of_two_process_jobs(tmp_path):
    """One sweep, a job per option set: the jobs share the sweep's process (each a launcher of
    two workers) where separate commands would each start one more."""
    for name, options in OPTIONS.items():
        write_experiment(tmp_path / "mine", name, options)
    result = run_cli("train", "-m", "--config-dir", str(tmp_path / "mine"), "debug=fast",
                     "device=cpu", "device.count=2", f"experiment={','.join(OPTIONS)}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep] = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [str(n) for n in range(len(OPTIONS))]
    for job, name in zip(jobs, OPTIONS, strict=True):
        record = json.loads((sweep / job / "job.json").read_text())
        assert record["status"] == "completed", (name, record["error"], result.stderr)
        assert "test/loss" in metrics(sweep / job), name
        assert len(list((sweep / job / "tensorboard").rglob("events.*"))) == 1, name
    assert len(run_dirs(tmp_path)) == len(OPTIONS)  # one per job, none per rank
