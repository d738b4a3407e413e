"""`evaluate run_dir=GAN fid_features=CLASSIFIER`: a Frechet distance in a classifier's feature
space, checked against what the formula must give."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train
from trainer.errors import UserError
from trainer.use.fid import frechet_distance


def test_frechet_distance_of_known_gaussians():
    torch.manual_seed(0)
    real = torch.randn(4000, 3)
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-9)
    # A shift of the mean by d adds |d|^2; scaling by 2 (cov 4I against I) adds 3 * (2 - 1)^2.
    assert frechet_distance(real, real + torch.tensor([1.0, 2.0, 0.0])) == pytest.approx(5.0)
    assert frechet_distance(real, 2 * real) == pytest.approx(3.0, rel=0.05)


def test_evaluate_scores_a_gan_in_a_classifier_feature_space(tmp_path, finished_run):
    from trainer.run.loop import train
    from trainer.use.jobs import evaluate_job

    gan = tmp_path / "gan"
    train(compose_train("debug=fast", "logger=none", "model=gan"), gan)

    def evaluate(run, features, split="test"):
        return evaluate_job(OmegaConf.create({"run_dir": str(run), "checkpoint": "best",
                                              "device": None, "split": split, "data": {},
                                              "fid_features": str(features)}))

    metrics = evaluate(gan, finished_run)
    assert metrics["test/fid"] > 0 and {"test/d_real", "test/d_fake"} <= set(metrics)
    assert evaluate(gan, finished_run)["test/fid"] == metrics["test/fid"]  # seeded samples
    # split=val scores against the validation images, and says so in the key.
    validated = evaluate(gan, finished_run, "val")
    assert "test/fid" not in validated and validated["val/fid"] > 0
    assert validated["val/fid"] != metrics["test/fid"]
    with pytest.raises(UserError, match="fid_features scores a GAN's samples"):
        evaluate(finished_run, finished_run)
    with pytest.raises(UserError, match="is not a classifier of \\[1, 8, 8\\] images"):
        evaluate(gan, gan)
