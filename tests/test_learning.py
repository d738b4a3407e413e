"""Each architecture learns on the bundled digits within its default budget (seconds each)."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED_DATA, compose_train
from trainer.data.images import digits
from trainer.run.loop import train

pytestmark = pytest.mark.slow  # each trains for a while: the full suite, not the fast tier


def fit(tmp_path, *overrides):
    # float32 on every machine: a bf16 CPU would otherwise train these in bf16 (precision=auto)
    return train(compose_train("trainer.progress=false", "device.precision=32", *overrides),
                 tmp_path)


def test_default_cnn_passes_97_percent(tmp_path):
    assert fit(tmp_path)["test/acc"] >= 0.97


@pytest.mark.parametrize("model", ["rnn", "transformer"])
def test_sequence_classifiers_pass_90_percent(tmp_path, model):
    assert fit(tmp_path, f"model={model}")["test/acc"] >= 0.90


def test_autoencoder_error_is_far_below_the_data_variance(tmp_path):
    test = digits().test
    variance = test.batch(torch.arange(len(test)))[0].var().item()
    assert fit(tmp_path, "model=autoencoder")["test/mse"] < 0.2 * variance


def test_gan_neither_network_collapses(tmp_path):
    metrics = fit(tmp_path, "model=gan")
    # A won discriminator drives d_fake to 0 and g_loss up; a won generator drives d_real down.
    assert 0.2 < metrics["test/d_real"] < 0.9 and 0.1 < metrics["test/d_fake"] < 0.8
    assert metrics["test/g_loss"] < 3.0 and metrics["test/d_loss"] < 1.5
    assert (tmp_path / "samples" / "generated.png").is_file()


def test_character_model_beats_the_unigram_baseline(tmp_path, text_file):
    metrics = fit(tmp_path, "model=transformer", "data=text", f"data.path={text_file}",
                  "data.block_size=32", "data.batch_size=16", "trainer.max_steps=150",
                  "trainer.val_every=50")
    assert metrics["test/loss"] < 1.0  # a uniform guess over ~30 characters is ~3.4 nats
    assert "says" in (tmp_path / "samples" / "text.txt").read_text(encoding="utf-8")


def test_cnn_on_real_mnist(tmp_path):
    from conftest import shared_mnist

    root = shared_mnist(tmp_path)
    metrics = fit(tmp_path, "data=mnist", f"data.root={root}", "data.download=false",
                  "trainer.max_steps=150", "trainer.val_every=150", "trainer.eval_batches=5")
    assert metrics["test/acc"] >= 0.90
    assert SHARED_DATA.is_dir()


@pytest.mark.parametrize("kind", [["model.conv=true", "model.denoise=0.2"],
                                  ["model.conv=true", "model.variational=true"]])
def test_convolutional_denoising_and_variational_autoencoders_learn(tmp_path, kind):
    test = digits().test
    variance = test.batch(torch.arange(len(test)))[0].var().item()
    metrics = fit(tmp_path, "model=autoencoder", "model.width=32", *kind)
    # measured: 0.055 (denoising) and 0.15 (VAE) of the variance
    assert metrics["test/mse"] < (0.25 if "model.variational=true" in kind else 0.1) * variance
    if "model.variational=true" in kind:  # the code carries information: KL above zero
        assert metrics["test/kl"] > 1.0
