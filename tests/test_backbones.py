"""`model=cnn model.backbone=NAME`: a torchvision network with a new classifier, its weights
from a file (as torchvision's cache would give them; nothing is downloaded here)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import compose_train
from trainer.errors import UserError
from trainer.models.cnn import CNN


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_a_frozen_backbone_keeps_its_weights_and_trains_a_new_classifier(tmp_path,
                                                                        resnet18_file, caplog):
    from trainer.checkpoint import load
    from trainer.run.loop import train

    caplog.set_level("INFO", logger="trainer")
    run = tmp_path / "run"
    metrics = train(compose_train("debug=fast", "logger=none", "model.backbone=resnet18",
                                  f"model.weights={resnet18_file}", "model.freeze_backbone=true",
                                  "model.input_size=null"), run)
    assert {"test/acc", "test/loss"} <= set(metrics)
    trained = load(run / "checkpoints" / "last.pt")["model"]
    given = torch.load(resnet18_file, weights_only=True)
    backbone = {k: v for k, v in given.items() if not k.startswith("fc.")}
    for key, value in backbone.items():  # batch norm statistics included: frozen means frozen
        assert torch.equal(trained[f"features.1.{key}"], value), key
    assert trained["head.1.weight"].shape == (10, 512)
    frozen = sum(value.numel() for key, value in given.items()
                 if not key.startswith("fc.") and value.is_floating_point()
                 and "running" not in key)  # the backbone's parameters, not its statistics
    assert f"parameters ({frozen:,} frozen)" in caplog.text


def test_a_backbone_sees_three_channels_at_its_size_normalised_as_in_its_training():
    model = CNN((1, 8, 8), 10, backbone="resnet18", input_size=16)
    seen = model.features[0](torch.ones(2, 1, 8, 8))  # white, in [-1, 1]
    assert seen.shape == (2, 3, 16, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as resnet18's own
    assert torch.allclose(seen[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in
                                                            zip(mean, std, strict=True)]))
    assert model.features[0].size == 16
    assert CNN((1, 8, 8), 10, backbone="resnet18").features[0].size == 224  # auto


def test_backbone_errors_are_one_clear_line(tmp_path, resnet18_file, monkeypatch):
    with pytest.raises(UserError, match=r"model.backbone='resnet19' is not a torchvision "
                                        r"classification model \(did you mean resnet18"):
        CNN((1, 8, 8), 10, backbone="resnet19")
    with pytest.raises(UserError, match="model.input_size=null: convnext_tiny cannot take 8x8"):
        CNN((1, 8, 8), 10, backbone="convnext_tiny", input_size=None)
    with pytest.raises(UserError, match="is not a state_dict of mobilenet_v3_small"):
        CNN((1, 8, 8), 10, backbone="mobilenet_v3_small", weights=str(resnet18_file))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="junk.pt' is not a readable state_dict file"):
        CNN((1, 8, 8), 10, backbone="resnet18", weights=str(tmp_path / "junk.pt"))
    with pytest.raises(UserError, match="model.weights='IMAGENET9K' is neither a file nor "
                                        "weights of this backbone: use DEFAULT, IMAGENET1K_V1"):
        CNN((1, 8, 8), 10, backbone="resnet18", weights="IMAGENET9K")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError, match=f"model.weights=IMAGENET1K_V1: resnet18's weights are not "
                                        f"at {cached} and could not be downloaded"):
        CNN((1, 8, 8), 10, backbone="resnet18", weights="DEFAULT")


@pytest.mark.slow  # two runs and a predict: 5 s
def test_a_finished_run_is_used_without_its_pretrained_weights_file(tmp_path, resnet18_file):
    """The checkpoint holds the backbone's weights: evaluate, predict and a resumed run rebuild
    the model without reading model.weights (a file gone, or torchvision's cache elsewhere)."""
    import json
    import shutil

    from omegaconf import OmegaConf

    from trainer.run.loop import train
    from trainer.use.jobs import evaluate_job, restored_model

    weights = Path(shutil.copy(resnet18_file, tmp_path / "resnet18.pt"))
    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", "model.backbone=resnet18",
                        f"model.weights={weights}", "model.input_size=null"), run)
    weights.unlink()
    command = OmegaConf.create({"run_dir": str(run), "checkpoint": "best", "device": None,
                                "split": "test", "data": {}, "fid_features": None})
    assert evaluate_job(command) == json.loads((run / "metrics.json").read_text())
    model = restored_model(command).model
    trained = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())
    resumed = OmegaConf.create(torch.load(run / "checkpoints" / "last.pt",
                                          weights_only=True)["config"])
    resumed.trainer.max_steps, resumed.resume = 8, str(run)  # and training goes on
    train(resumed, run)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] == 8
