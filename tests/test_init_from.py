"""init_from=RUN: a new run that starts from another run's weights, where they fit."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_train
from trainer.errors import UserError
from trainer.loop import build, initialise, train

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
