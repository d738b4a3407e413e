"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases (optional extras).

Each takes the calls TensorBoardLogger takes (logging.py) and is built by `build_loggers` on
rank 0 only. A resumed run (purge_step > 1) continues its own tracker run, whose id is kept in the
run directory, so one run directory is one tracker run however often it was resumed.
"""

from __future__ import annotations

import html
import json
import logging
import netrc
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import Tensor

from trainer.errors import UserError
from trainer.logging import grid, hparams_of

log = logging.getLogger("trainer")


class MLflowLogger:
    """Params, every metric at its step, the config and metrics.json as artifacts, samples
    (images and text), and optionally the best checkpoint, in an MLflow run."""

    requires = "mlflow"  # the extra: pip install 'trainer[mlflow]'

    def __init__(self, run_dir: str | Path, purge_step: int | None = None,
                 tracking_uri: str | None = None, experiment: str = "trainer",
                 name: str | None = None, log_checkpoint: bool = False) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.run_dir, self.log_checkpoint = Path(run_dir), log_checkpoint
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # null: MLflow's own choice (MLFLOW_TRACKING_URI, else ./mlflow.db).
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            _check_reachable(self.client.tracking_uri)
            self._start(experiment, name, purge_step)
        except MlflowException as error:  # a store MLflow refuses, a server that refuses us
            first = str(error.message).strip().splitlines()[0]
            raise UserError(f"logger.mlflow: the tracking store {uri} cannot be used: "
                            f"{first}") from None
        log.info("MLflow run %s in %s", self.run_id, self.client.tracking_uri)

    def _start(self, experiment: str, name: str | None, purge_step: int | None) -> None:
        """Continue this run directory's MLflow run, or create one in `experiment`."""
        record = self.run_dir / "mlflow.json"
        resumed = purge_step and purge_step > 1 and record.is_file()
        self.logged_to: dict[str, int] = {}  # each metric's last step already in the run
        if resumed:
            self.run_id = json.loads(record.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_to = {key: max(m.step for m in self.client.get_metric_history(
                self.run_id, key)) for key in self.client.get_run(self.run_id).data.metrics}
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else \
                self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=name or self.run_dir.name,
                                         tags={"run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            record.write_text(json.dumps({"run_id": self.run_id,
                                          "tracking_uri": self.client.tracking_uri}) + "\n")

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _milliseconds()
        # MLflow cannot delete points, so where TensorBoard purges what a killed run logged after
        # its last checkpoint, the resumed run keeps those points (the same values, resumed
        # exactly) rather than adding a second one at each step.
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if step > self.logged_to.get(key, -1)]
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def images(self, tag: str, images: Tensor, step: int, per_row: int = 8) -> None:
        pixels = grid(images, per_row).mul(255).round().byte().permute(1, 2, 0).numpy()
        self.client.log_image(self.run_id, pixels, key=tag.replace("/", "_"), step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step:06d}.txt")

    def config(self, yaml: str) -> None:
        from mlflow.entities import Param

        self.client.log_text(self.run_id, yaml, "config.yaml")
        params = [Param(key, str(value)[:6000]) for key, value in
                  hparams_of(OmegaConf.create(yaml)).items()]
        for start in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The test metrics are logged as scalars already; nothing more to add."""

    def close(self) -> None:
        metrics = self.run_dir / "metrics.json"
        if metrics.is_file():
            self.client.log_artifact(self.run_id, str(metrics))
        best = self.run_dir / "checkpoints" / "best.pt"
        if self.log_checkpoint and best.is_file():
            self.client.log_artifact(self.run_id, str(best), "checkpoints")
        self.client.set_terminated(self.run_id, status="FINISHED")


class WandbLogger:
    """Metrics at their steps, the config, sample images and text, and the test metrics in the
    run summary, in a W&B run under run_dir/wandb. Without a network it runs offline; upload
    later with `wandb sync RUN_DIR/wandb/offline-run-*`."""

    requires = "wandb"  # the extra: pip install 'trainer[wandb]'

    def __init__(self, run_dir: str | Path, purge_step: int | None = None,
                 project: str = "trainer", entity: str | None = None, name: str | None = None,
                 mode: str = "auto") -> None:
        import wandb

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = self.run_dir / "wandb-run-id"
        resumed = bool(purge_step and purge_step > 1 and record.is_file())
        run_id = record.read_text().strip() if resumed else uuid.uuid4().hex[:12]
        record.write_text(run_id + "\n")
        mode = _wandb_mode() if mode == "auto" else mode
        self.run = wandb.init(project=project, entity=entity, name=name or self.run_dir.name,
                              id=run_id, resume="allow", dir=str(self.run_dir), mode=mode,
                              settings=wandb.Settings(silent=True, console="off"))
        if mode == "offline":
            log.info("W&B is offline: upload this run later with: wandb sync %s",
                     Path(self.run.dir).parent)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def images(self, tag: str, images: Tensor, step: int, per_row: int = 8) -> None:
        import wandb

        pixels = grid(images, per_row).mul(255).round().byte().permute(1, 2, 0).numpy()
        self.run.log({tag: wandb.Image(pixels)}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def config(self, yaml: str) -> None:
        self.run.config.update(hparams_of(OmegaConf.create(yaml)), allow_val_change=True)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


def _wandb_mode() -> str:
    """online with an API key (WANDB_API_KEY or ~/.netrc, as `wandb login` writes) and
    api.wandb.ai in reach; else offline. WANDB_MODE, when set, decides."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or \
            netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        has_key = False
    if not has_key:
        return "offline"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
        return "online"
    except OSError:
        return "offline"


def _check_reachable(uri: str) -> None:
    """A tracking server that does not answer fails at once, rather than after MLflow's
    retries (minutes)."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as error:
        raise UserError(f"logger.mlflow.tracking_uri={uri}: no server answers there "
                        f"({error.strerror or error}); start `mlflow server` or fix the "
                        "address") from None


def _milliseconds() -> int:
    return int(time.time() * 1000)
