"""init_from=RUN: a new run that starts from another run's weights, where they fit."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_train
from trainer.errors import UserError
from trainer.run.loop import build, initialise, train

SOURCE = ["logger=none", "model.dropout=0", "trainer.max_steps=60", "trainer.val_every=60"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("source")
    train(compose_train(*SOURCE), run)
    return run


def test_a_run_from_another_runs_weights_starts_where_it_ended(tmp_path, source):
    best = torch.load(source / "checkpoints" / "best.pt", weights_only=True)
    # One step at a learning rate too small to move anything: the source's own validation.
    metrics = train(compose_train(*SOURCE, f"init_from={source}", "trainer.max_steps=1",
                                  "trainer.val_every=1", "optimizer.lr=1e-12"), tmp_path)
    assert metrics["val/acc"] == pytest.approx(best["metrics"]["val/acc"])
    fresh = train(compose_train(*SOURCE, "trainer.max_steps=1", "trainer.val_every=1"),
                  tmp_path / "fresh")
    assert fresh["val/acc"] < metrics["val/acc"] - 0.3


def test_a_head_for_other_classes_starts_fresh(tmp_path, source, image_folder, caplog):
    caplog.set_level("INFO", logger="trainer")
    s = build(compose_train(*SOURCE, f"init_from={source}", "data=image_folder",
                            f"data.path={image_folder}", "data.grayscale=true",
                            "data.image_size=8"))
    initialise(s)
    saved = torch.load(source / "checkpoints" / "best.pt", weights_only=True)["model"]
    own = s.model.state_dict()
    assert own["head.5.weight"].shape[0] == 2 and saved["head.5.weight"].shape[0] == 10
    for name, tensor in own.items():
        assert torch.equal(tensor, saved[name]) == (not name.startswith("head.5")), name
    assert "tensors loaded; fresh: head.5.weight, head.5.bias" in caplog.text


def test_weights_that_fit_nothing_name_the_source_runs_model(source):
    s = build(compose_train(*SOURCE, f"init_from={source}", "model=rnn"))
    with pytest.raises(UserError, match="no weight of .* fits this model; that run trained cnn "
                                        "with model.width=32 model.depth=2"):
        initialise(s)


# LoRA (model.lora_rank): a language model fine-tuned on text of the same characters, reversed.
LM = ["logger=none", "model=transformer", "data=text", "data.block_size=16", "model.width=32",
      "trainer.val_every=40"]


def _corpus(path, reverse=False):
    lines = [f"{name} says: the {thing} is {colour}.\n" for name in ("ANNA", "BORIS", "CLARA")
             for thing in ("sky", "sea", "grass", "rose") for colour in ("blue", "green", "red")]
    text = "".join(lines) * 8
    path.write_text(text[::-1] if reverse else text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    train(compose_train(*LM, f"data.path={_corpus(folder / 'forward.txt')}",
                        "trainer.max_steps=40"), folder / "run")
    return folder / "run", _corpus(folder / "reversed.txt", reverse=True)


def test_adapters_change_nothing_at_first_and_only_they_and_the_head_train():
    from trainer.models.transformer import Transformer

    torch.manual_seed(0)
    plain = Transformer(vocab_size=20, block_size=16, width=16, depth=2, heads=2).eval()
    adapted = Transformer(vocab_size=20, block_size=16, width=16, depth=2, heads=2,
                          lora_rank=4).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(20, (3, 16))
    assert torch.equal(adapted(tokens), plain(tokens))
    trained = {name for name, weight in adapted.named_parameters() if weight.requires_grad}
    assert trained == {f"blocks.{i}.{layer}.lora_{ab}" for i in range(2) for ab in "ab"
                       for layer in ("qkv", "proj", "fc", "out")} | {"head.weight", "head.bias"}


def test_lora_fine_tunes_a_run_whose_weights_stay_as_they_were(tmp_path, language_model, caplog):
    source, reversed_text = language_model
    caplog.set_level("INFO", logger="trainer")
    run = [*LM, f"data.path={reversed_text}", f"init_from={source}", "model.lora_rank=4",
           "optimizer.lr=3e-3"]
    # One step too small to move anything: the source model on the new text.
    before = train(compose_train(*run, "trainer.max_steps=1", "trainer.val_every=1",
                                 "optimizer.lr=1e-12"), tmp_path / "before")
    after = train(compose_train(*run, "trainer.max_steps=40"), tmp_path / "lora")
    assert after["val/loss"] < before["val/loss"] - 0.3
    assert "16 LoRA adapter tensors added" in caplog.text
    tuned = torch.load(tmp_path / "lora" / "checkpoints" / "best.pt", weights_only=True)["model"]
    original = torch.load(source / "checkpoints" / "best.pt", weights_only=True)["model"]
    for name, tensor in original.items():  # frozen: as the source left them, but the head
        assert torch.equal(tensor, tuned[name]) == (not name.startswith("head.")), name
    assert tuned["blocks.0.qkv.lora_b"].abs().sum() > 0

    # Into a model without adapters, their change is merged into the weights it loads.
    merged = train(compose_train(*LM, f"data.path={reversed_text}", f"init_from={tmp_path}/lora",
                                 "trainer.max_steps=1", "trainer.val_every=1",
                                 "optimizer.lr=1e-12"), tmp_path / "merged")
    # W + BA rounds otherwise than Wx + B(Ax) in float32, more or less with the CPU's kernels and
    # threads (1.7e-4 of the loss seen); adapters lost in the merge would move it 0.3 or more.
    assert merged["val/loss"] == pytest.approx(after["val/loss"], rel=1e-3)


def test_weights_that_would_stay_frozen_and_random_are_refused(tmp_path, language_model):
    source, _ = language_model
    other = tmp_path / "other.txt"
    other.write_text("quite other characters: 0123456789 XYZ\n" * 50, encoding="utf-8")
    s = build(compose_train(*LM, f"data.path={other}", f"init_from={source}",
                            "model.lora_rank=4"))
    with pytest.raises(UserError, match="embed.weight did not fit this model, and frozen by "
                                        "model.lora_rank they would stay random"):
        initialise(s)


def test_a_resumed_lora_run_equals_the_uninterrupted_one(tmp_path, language_model):
    """Resumed, a LoRA run is frozen as its config says and needs no source run any more."""
    from omegaconf import OmegaConf

    source, reversed_text = language_model
    run = [*LM, f"data.path={reversed_text}", f"init_from={source}", "model.lora_rank=4",
           "trainer.val_every=4"]
    full = train(compose_train(*run, "trainer.max_steps=8"), tmp_path / "full")
    train(compose_train(*run, "trainer.max_steps=4"), tmp_path / "half")
    saved = torch.load(tmp_path / "half" / "checkpoints" / "last.pt", weights_only=True)
    cfg = OmegaConf.create(saved["config"])
    cfg.trainer.max_steps, cfg.resume = 8, str(tmp_path / "half")
    source.rename(source.with_name("moved"))
    try:
        assert train(cfg, tmp_path / "half") == full
    finally:
        source.with_name("moved").rename(source)


def test_text_of_fewer_characters_is_encoded_in_the_source_runs_vocabulary(
        tmp_path, language_model, caplog):
    """Its own character set would be another vocabulary, and the embedding would not fit."""
    source, _ = language_model
    caplog.set_level("INFO", logger="trainer")
    anna = tmp_path / "anna.txt"
    anna.write_text("ANNA says: the sea is blue.\nANNA says: the sky is red.\n" * 40)
    train(compose_train(*LM, f"data.path={anna}", f"init_from={source}", "model.lora_rank=4",
                        "trainer.max_steps=4", "trainer.val_every=4"), tmp_path / "run")
    assert "the text is encoded in its vocabulary of" in caplog.text
    assert "fresh" not in caplog.text  # the embedding and head were loaded
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    original = torch.load(source / "checkpoints" / "best.pt", weights_only=True)
    chars = original["data"]["tokenizer"]["chars"]
    assert saved["config"]["data"]["vocabulary"] == chars  # resumed and used alike
    assert saved["data"]["tokenizer"]["chars"] == chars
