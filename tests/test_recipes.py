"""The pieces of airbench's recipe: label smoothing, an average of the weights, the whitening
first layer, and the CIFAR-10 preset that puts them together."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_train
from trainer.averaging import WeightAverage
from trainer.config import validate
from trainer.data import DataSpec
from trainer.errors import UserError
from trainer.models.cnn import CNN, Whitening
from trainer.run.loop import train
from trainer.tasks import task_for

EMA_RUN = ["debug=fast", "logger=none", "model.residual=true", "trainer.ema_decay=0.9",
           "trainer.val_every=4"]


def checkpoint(run_dir, name="last"):
    return torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)


def test_label_smoothing_trains_against_smoothed_targets_and_validates_plain():
    spec = DataSpec(kind="image", name="digits", in_shape=(1, 8, 8), num_classes=10)
    task = task_for(OmegaConf.create({"_target_": "trainer.models.cnn.CNN"}), spec,
                    {"label_smoothing": 0.2})
    model = CNN((1, 8, 8), 10, width=4, dropout=0.0).eval()
    images, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    loss, _ = task.training_step(model, (images, labels), 0)

    log_p = model(images).log_softmax(-1)
    smoothed = 0.8 * F.nll_loss(log_p, labels) - 0.2 * log_p.mean(-1).mean()
    torch.testing.assert_close(loss, smoothed)
    plain = task.eval_step(model, (images, labels))["loss"] / 16
    torch.testing.assert_close(plain, F.cross_entropy(model(images), labels))


def test_label_smoothing_is_refused_for_a_model_that_does_not_classify():
    spec = DataSpec(kind="image", name="digits", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(UserError, match="trainer.label_smoothing=0.1 applies to classification "
                                        "only, and model=gan on image data is not a classifier"):
        task_for(OmegaConf.create({"_target_": "trainer.models.gan.GAN"}), spec,
                 {"label_smoothing": 0.1})


def test_balanced_class_weights_weigh_each_class_by_its_rarity():
    from trainer.data.images import ImageSplit

    spec = DataSpec(kind="image", name="two", in_shape=(1, 8, 8), num_classes=2,
                    classes=("common", "rare"))
    task = task_for(OmegaConf.create({"_target_": "trainer.models.cnn.CNN"}), spec,
                    {"class_weights": "balanced"})
    labels = torch.tensor([0] * 30 + [1] * 10)
    task.fit_loss_to_data(ImageSplit(torch.zeros(40, 1, 8, 8, dtype=torch.uint8), labels),
                          torch.device("cpu"))
    torch.testing.assert_close(task.class_weights, torch.tensor([40 / 60, 40 / 20]))

    model = CNN((1, 8, 8), 2, width=4, dropout=0.0).eval()
    images, batch_labels = torch.randn(8, 1, 8, 8), torch.tensor([0] * 6 + [1] * 2)
    loss, _ = task.training_step(model, (images, batch_labels), 0)
    per_image = F.cross_entropy(model(images), batch_labels, reduction="none")
    weight = task.class_weights[batch_labels]
    torch.testing.assert_close(loss, (weight * per_image).sum() / weight.sum())
    plain = task.eval_step(model, (images, batch_labels))["loss"] / 8  # validation stays plain
    torch.testing.assert_close(plain, per_image.mean())


def test_a_resumed_run_with_balanced_weights_equals_the_uninterrupted_one(tmp_path):
    common = ["debug=fast", "logger=none", "model.dropout=0", "trainer.class_weights=balanced",
              "trainer.val_every=4"]
    full = train(compose_train(*common, "trainer.max_steps=8"), tmp_path / "full")
    train(compose_train(*common, "trainer.max_steps=4"), tmp_path / "half")
    cfg = OmegaConf.create(checkpoint(tmp_path / "half")["config"])
    cfg.trainer.max_steps, cfg.resume = 8, str(tmp_path / "half")
    assert train(cfg, tmp_path / "half") == full


def test_the_average_follows_the_weights_with_a_warming_decay():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.5, every=2)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for step in range(1, 7):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 3))  # batch norm statistics and its integer step counter move
        average.update(step)
        if step % 2 == 0:  # updates 0, 1, 2: decays 0.1, 0.18..., then the cap 0.5
            decay = min(0.5, (1 + step // 2 - 1) / (10 + step // 2 - 1))
            expected = decay * expected + (1 - decay) * model[0].weight.detach()
    torch.testing.assert_close(average.model[0].weight, expected)
    assert average.model[1].num_batches_tracked == model[1].num_batches_tracked == 6
    assert not any(p.requires_grad for p in average.model.parameters())


def test_a_run_with_an_average_validates_and_hands_on_the_average(tmp_path):
    metrics = train(compose_train(*EMA_RUN, "trainer.max_steps=60"), tmp_path / "run")
    last, best = checkpoint(tmp_path / "run"), checkpoint(tmp_path / "run", "best")
    assert metrics["test/acc"] > 0.5
    differs = [k for k, v in last["model"].items()
               if v.is_floating_point() and not torch.equal(v, last["training_model"][k])]
    assert differs  # the average is not the trained weights
    assert set(best["model"]) == set(best["training_model"])

    from trainer.run.evaluation import test_checkpoint
    from trainer.run.loop import build

    s = build(compose_train(*EMA_RUN))  # the test split scored with best.pt's `model` entry
    tested, _, _ = test_checkpoint(s, tmp_path / "run" / "checkpoints" / "best.pt")
    assert tested == json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_a_resumed_run_with_an_average_equals_the_uninterrupted_one(tmp_path):
    full = train(compose_train(*EMA_RUN, "trainer.max_steps=12"), tmp_path / "full")
    half = tmp_path / "half"
    train(compose_train(*EMA_RUN, "trainer.max_steps=4"), half)
    cfg = OmegaConf.create(checkpoint(half)["config"])
    cfg.trainer.max_steps, cfg.resume = 12, str(half)
    assert train(cfg, half) == full
    for entry in ("model", "training_model"):
        expected, resumed = checkpoint(tmp_path / "full")[entry], checkpoint(half)[entry]
        assert all(torch.equal(expected[k], v) for k, v in resumed.items())


def test_an_average_is_refused_under_fsdp():
    cfg = compose_train("trainer.ema_decay=0.99", "device.strategy=fsdp", "device.count=2")
    with pytest.raises(UserError, match="trainer.ema_decay=0.99 cannot be used with "
                                        "device.strategy=fsdp"):
        validate(cfg)


def test_the_whitening_layer_whitens_the_patches_it_was_fitted_to():
    mixing = torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.3, 0.2], [0.5, 0.0, 0.1]])
    images = torch.einsum("dc,nchw->ndhw", mixing, torch.randn(400, 3, 6, 6)) + 0.3
    layer = Whitening(3)
    layer.fit(images)
    outputs = layer(images)  # (N, 24, 5, 5): 12 directions, then the same negated
    half = outputs[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(half.mean(0), torch.zeros(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(half.T), torch.eye(12), atol=0.02, rtol=0)
    torch.testing.assert_close(outputs[:, 12:], -outputs[:, :12])


def test_a_whitened_resnet_trains_its_whitening_bias_but_not_its_filters(tmp_path):
    common = ["debug=fast", "logger=none", "model.residual=true", "model.whiten=true"]
    metrics = train(compose_train(*common, "trainer.max_steps=60"), tmp_path / "run")
    trained = checkpoint(tmp_path / "run")["model"]
    from trainer.run.loop import build

    s = build(compose_train(*common))
    s.task.fit_to_data(s.model, s.data.train)  # fitted again, as train does before any step
    fitted = s.model.whitening
    assert metrics["test/acc"] > 0.5
    assert torch.equal(trained["features.0.weight"], fitted.weight)
    assert not torch.equal(trained["features.0.bias"], fitted.bias)


def test_whitening_needs_the_resnet():
    with pytest.raises(UserError, match="model.whiten=true needs model.residual=true"):
        CNN((1, 8, 8), 10, whiten=True)


def test_the_cifar10_preset_trains_on_small_colour_images(tmp_path, image_folder):
    cfg = compose_train("experiment=airbench_cifar10", "data=image_folder",
                        f"data.path={image_folder}", "data.batch_size=8", "data.image_size=32",
                        "trainer.max_steps=3", "logger=none", "trainer.progress=false")
    assert cfg.trainer.label_smoothing > 0 and cfg.trainer.ema_decay
    assert cfg.model.whiten and cfg.model.test_flip and cfg.data.augment == "flip_crop"
    metrics = train(cfg, tmp_path / "run")
    assert {"test/acc", "test/loss"} <= set(metrics)
