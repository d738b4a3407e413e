"""Every valid model x data pair trains a few steps (debug preset); invalid pairs are refused."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MODELS, compose_train
from trainer.errors import UserError
from trainer.run.loop import train

IMAGE_MODELS = MODELS
TEXT_MODELS = ["rnn", "transformer"]
EXPECTED_METRICS = {
    "cnn": {"test/loss", "test/acc"},
    "rnn": {"test/loss", "test/acc"},
    "transformer": {"test/loss", "test/acc"},
    "gan": {"test/loss", "test/d_loss", "test/g_loss", "test/d_real", "test/d_fake"},
    "autoencoder": {"test/loss", "test/mse"},
}


def fit(tmp_path, *overrides):
    """Train a few steps; return the test metrics (train also returns best.pt's val metrics)."""
    cfg = compose_train("debug=fast", "logger=none", *overrides)
    metrics = train(cfg, tmp_path / "run")
    test = {k: v for k, v in metrics.items() if k.startswith("test/")}
    assert {k.replace("test/", "val/") for k in test} == set(metrics) - set(test)
    return test


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_image_models_on_digits(tmp_path, model):
    metrics = fit(tmp_path, f"model={model}")
    assert set(metrics) == EXPECTED_METRICS[model]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_image_models_on_an_image_folder(tmp_path, image_folder, model):
    metrics = fit(tmp_path, f"model={model}", "data=image_folder", f"data.path={image_folder}",
                  "data.image_size=8", "data.batch_size=8")
    assert set(metrics) == EXPECTED_METRICS[model]


@pytest.mark.parametrize("model", ["cnn", "gan"])
def test_torchvision_mnist_source(tmp_path, mnist_root, model):
    metrics = fit(tmp_path, f"model={model}", "data=mnist", f"data.root={mnist_root}",
                  "data.download=false")
    assert set(metrics) == EXPECTED_METRICS[model]


@pytest.mark.parametrize("source", ["text", "shakespeare"])
@pytest.mark.parametrize("model", TEXT_MODELS)
def test_text_models(tmp_path, text_file, model, source):
    metrics = fit(tmp_path, f"model={model}", f"data={source}", f"data.path={text_file}",
                  "data.block_size=16")
    assert set(metrics) == {"test/loss", "test/ppl", "test/bpb"}


@pytest.mark.parametrize("model", ["cnn", "gan", "autoencoder"])
def test_image_only_models_refuse_text(tmp_path, text_file, model):
    with pytest.raises(UserError, match=f"model={model} cannot train on text data .*accepts image"):
        fit(tmp_path, f"model={model}", "data=text", f"data.path={text_file}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options", [["model.cell=gru"], ["model.bidirectional=true"],
                                     ["model.cell=gru", "model.bidirectional=true"]])
def test_rnn_cells_and_directions_classify_images(tmp_path, options):
    assert set(fit(tmp_path, "model=rnn", "model.depth=2", "model.dropout=0.2", *options)) == \
        EXPECTED_METRICS["rnn"]


def test_a_gru_models_text_and_a_bidirectional_one_is_refused(tmp_path, text_file):
    text = ["model=rnn", "data=text", f"data.path={text_file}", "data.block_size=16"]
    assert "test/bpb" in fit(tmp_path, *text, "model.cell=gru")
    with pytest.raises(UserError, match="model.bidirectional=true reads each text backwards"):
        fit(tmp_path, *text, "model.bidirectional=true")
    with pytest.raises(UserError, match="model.cell='rnn' is not accepted: choose one of lstm, "
                                        "gru"):
        fit(tmp_path, *text, "model.cell=rnn")


@pytest.mark.parametrize("options", [["model.conv=true"], ["model.variational=true"],
                                     ["model.conv=true", "model.variational=true",
                                      "model.denoise=0.3"]])
def test_autoencoder_kinds_reconstruct_images(tmp_path, options):
    metrics = fit(tmp_path, "model=autoencoder", *options)
    variational = "model.variational=true" in options
    assert set(metrics) == EXPECTED_METRICS["autoencoder"] | ({"test/kl"} if variational else set())
    if variational:  # the negative ELBO per pixel
        assert metrics["test/loss"] == pytest.approx(metrics["test/mse"] + metrics["test/kl"] / 64)


def test_a_convolutional_autoencoder_too_deep_for_the_image_is_refused(tmp_path):
    with pytest.raises(UserError, match="model.depth=4: a convolutional autoencoder halves the "
                                        "image 4 times, which 8x8 does not allow"):
        fit(tmp_path, "model=autoencoder", "model.conv=true", "model.depth=4")


@pytest.mark.parametrize("options", [["model.conv=true"],
                                     ["model.conv=true", "model.spectral_norm=true"]])
def test_dcgan_generates_images(tmp_path, image_folder, options):
    metrics = fit(tmp_path, "model=gan", *options, "data=image_folder", f"data.path={image_folder}",
                  "data.image_size=16", "data.batch_size=8")
    assert set(metrics) == EXPECTED_METRICS["gan"]
    from trainer.checkpoint import load

    weights = load(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    assert weights["generator.4.weight"].dim() == 4  # transposed convolutions: a DCGAN
    spectral = any("parametrizations" in key for key in weights)
    assert spectral == ("model.spectral_norm=true" in options)


def test_a_dcgan_needs_an_image_it_can_halve(tmp_path, image_folder):
    with pytest.raises(UserError, match="model.conv=true: a 6x6 image cannot be halved"):
        fit(tmp_path, "model=gan", "model.conv=true", "data=image_folder",
            f"data.path={image_folder}", "data.image_size=6", "data.batch_size=8")


def test_a_vision_transformer_with_a_class_token(tmp_path, text_file):
    assert set(fit(tmp_path, "model=transformer", "model.pool=cls")) == \
        EXPECTED_METRICS["transformer"]
    with pytest.raises(UserError, match="model.pool=cls is for images"):
        fit(tmp_path, "model=transformer", "model.pool=cls", "data=text",
            f"data.path={text_file}")
    with pytest.raises(UserError, match="model.pool='max' is not accepted: choose one of mean, "
                                        "cls"):
        fit(tmp_path, "model=transformer", "model.pool=max")


def test_gpt_options_train_and_tie_the_embedding(tmp_path, text_file):
    from trainer.checkpoint import load

    text = ["model=transformer", "data=text", f"data.path={text_file}", "data.block_size=16"]
    assert "test/bpb" in fit(tmp_path, *text, "model.rotary=true", "model.tie_embeddings=true",
                             "model.init=gpt2")
    weights = load(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    assert torch.equal(weights["head.weight"], weights["embed.weight"])
    assert "position" not in weights and "head.bias" not in weights  # rotary; tied, no bias


@pytest.mark.parametrize("init", ["torch", "gpt2"])
def test_a_tied_embedding_starts_near_the_loss_of_guessing(init):
    """As the output layer, an embedding of N(0, 1) (PyTorch's own) would start near 15 nats."""
    import math

    import torch.nn.functional as F

    from trainer.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=65, block_size=32, width=64, depth=2, heads=4,
                        tie_embeddings=True, init=init)
    tokens = torch.randint(65, (8, 33))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(65)) < 0.5


def test_activation_checkpointing_keeps_less_for_the_same_gradients():
    """Recomputed in the backward pass, the blocks give the same loss and gradients (their
    dropout masks too) while a fraction of the activations is kept for it."""
    import torch.nn.functional as F

    from trainer.models.transformer import Transformer

    def step(checkpointing: bool):
        torch.manual_seed(0)
        model = Transformer(vocab_size=20, block_size=32, width=32, depth=4, heads=2,
                            dropout=0.1, activation_checkpointing=checkpointing)
        tokens = torch.randint(20, (8, 32), generator=torch.Generator().manual_seed(1))
        kept = []

        def keep(tensor):
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}, sum(kept)

    plain_loss, plain_grads, plain_bytes = step(False)
    loss, grads, kept_bytes = step(True)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(grads[name], grad) for name, grad in plain_grads.items())
    assert kept_bytes < plain_bytes / 4  # 4 blocks: only their inputs, and the head's


def test_former_transformer_checkpoints_load_unchanged():
    """Checkpoints written when the blocks were nn.TransformerEncoderLayer (names mapped)."""
    from trainer.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=20, block_size=16, width=16, depth=2, heads=2).eval()
    renamed = {"qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias",
               "proj.": "self_attn.out_proj.", "fc.": "linear1.", "out.": "linear2."}
    old = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index, name = key[len("blocks."):].split(".", 1)
            name = next((name.replace(a, b) for a, b in renamed.items() if name.startswith(a)),
                        name)
            key = f"blocks.layers.{index}.{name}"
        elif key.startswith("norm."):
            key = "blocks." + key
        old[key] = value
    again = Transformer(vocab_size=20, block_size=16, width=16, depth=2, heads=2).eval()
    again.load_state_dict(old)
    tokens = torch.randint(0, 20, (2, 16))
    assert torch.equal(again(tokens), model(tokens))


@pytest.mark.parametrize("size", [8, 13])
def test_a_residual_cnn_takes_any_image_size(tmp_path, image_folder, size):
    metrics = fit(tmp_path, "model.residual=true", "model.depth=3", "data=image_folder",
                  f"data.path={image_folder}", f"data.image_size={size}", "data.batch_size=8")
    assert set(metrics) == EXPECTED_METRICS["cnn"]


def test_test_flip_scores_the_mean_of_each_image_and_its_mirror(tmp_path):
    from trainer.models.cnn import CNN

    torch.manual_seed(0)
    plain = CNN((1, 8, 8), 3, width=4, depth=2, residual=True, dropout=0.0)
    flipping = CNN((1, 8, 8), 3, width=4, depth=2, residual=True, dropout=0.0, test_flip=True)
    flipping.load_state_dict(plain.state_dict())
    images = torch.randn(5, 1, 8, 8)
    assert torch.equal(flipping(images), plain(images))  # training: one view
    plain.eval(), flipping.eval()
    torch.testing.assert_close(flipping(images), (plain(images) + plain(images.flip(-1))) / 2)
    assert set(fit(tmp_path, "model.test_flip=true")) == EXPECTED_METRICS["cnn"]
