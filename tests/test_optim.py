"""Weight decay reaches the weights that multiply and nothing else, and runs saved before the
optimizers had their two groups still resume."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import trainer.run.loop
from conftest import compose_train
from trainer.models.gan import GAN
from trainer.models.rnn import RNN
from trainer.models.transformer import Transformer
from trainer.optim import decay_groups, regrouped
from trainer.run.loop import train


def decayed_names(model: nn.Module, entry: list) -> set[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)] for group in decay_groups(entry, model) if group.get("weight_decay") != 0
            for p in group["params"]}


def test_only_the_weights_of_linear_and_conv_layers_decay():
    lm = Transformer(vocab_size=30, block_size=16, width=32, depth=1, heads=2)
    assert decayed_names(lm, list(lm.parameters())) == {
        name for name, p in lm.named_parameters() if name.endswith("weight") and p.dim() == 2
        and "embed" not in name}
    untouched = {name for name, _ in lm.named_parameters()} - decayed_names(
        lm, list(lm.parameters()))
    assert {"position", "blocks.0.norm1.weight", "blocks.0.qkv.bias"} <= untouched
    assert any("embed" in name for name in untouched)  # the token embedding

    tied = Transformer(vocab_size=30, block_size=16, width=32, depth=1, heads=2,
                       tie_embeddings=True)
    assert any("embed" in name for name in decayed_names(tied, list(tied.parameters())))

    lstm = RNN(in_shape=(1, 8, 8), num_classes=3, width=8, depth=1)
    assert decayed_names(lstm, list(lstm.parameters())) >= {
        name for name, _ in lstm.named_parameters() if name.split(".")[-1].startswith("weight_")}


def test_a_gan_keeps_its_betas_in_both_groups_and_spectral_norm_weights_decay():
    gan = GAN(in_shape=(1, 16, 16), conv=True, spectral_norm=True)
    entry = [{"params": list(gan.discriminator.parameters()), "betas": (0.5, 0.999)}]
    groups = decay_groups(entry, gan)
    assert [g["betas"] for g in groups] == [(0.5, 0.999)] * 2
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    assert any("original" in name for name in decayed_names(gan, entry))


def test_decay_shrinks_weights_and_leaves_norms_and_embeddings_alone():
    lm = Transformer(vocab_size=30, block_size=16, width=32, depth=1, heads=2)
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    optimizer = torch.optim.AdamW(decay_groups(list(lm.parameters()), lm), lr=0.1,
                                  weight_decay=1.0)
    for p in lm.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is then zero: only decay moves a weight
    optimizer.step()
    decayed = decayed_names(lm, list(lm.parameters()))
    for name, p in lm.named_parameters():
        expected = before[name] * (0.9 if name in decayed else 1.0)
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_a_state_with_named_parameters_is_regrouped_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(decay_groups(list(model.parameters()), model))
    names = [name for name, _ in model.named_parameters()]
    saved = {"state": {name: {"step": torch.tensor(1.0)} for name in names},
             "param_groups": [{"params": names, "lr": 0.5, "weight_decay": 0.01}]}
    schedule = {"base_lrs": [0.5], "_last_lr": [0.25], "last_epoch": 3}
    state, schedule = regrouped(saved, schedule, optimizer, list(model.parameters()))
    assert [g["params"] for g in state["param_groups"]] == [["0.weight"],
                                                            ["0.bias", "1.weight", "1.bias"]]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.01, 0.0]
    assert [g["lr"] for g in state["param_groups"]] == [0.5, 0.5]
    assert state["state"] == saved["state"]
    assert schedule == {"base_lrs": [0.5, 0.5], "_last_lr": [0.25, 0.25], "last_epoch": 3}


@pytest.mark.parametrize("model", ["transformer", "gan"])
def test_a_run_saved_with_one_group_per_optimizer_resumes_exactly(tmp_path, monkeypatch, model):
    """Without weight decay the grouping changes nothing, so an old-layout checkpoint resumed
    must give the weights of a run never stopped. (Without gradient clipping too: the norm's sum
    over the parameters follows the groups' order, which moves its last digits.)"""
    run = ["debug=fast", "logger=none", f"model={model}", "optimizer=adam",
           "trainer.grad_clip=0", "trainer.val_every=4"]
    train(compose_train(*run, "trainer.max_steps=8"), tmp_path / "whole")
    with monkeypatch.context() as patch:  # the optimizers as they were built before the split
        patch.setattr(trainer.run.loop, "decay_groups", lambda entry, model: entry)
        train(compose_train(*run, "trainer.max_steps=4"), tmp_path / "old")
    saved = torch.load(tmp_path / "old/checkpoints/last.pt", weights_only=True)
    assert all(len(state["param_groups"]) == 1 for state in saved["optimizers"])

    cfg = OmegaConf.create(saved["config"])
    cfg.trainer.max_steps, cfg.resume = 8, str(tmp_path / "old")
    train(cfg, tmp_path / "old")
    resumed, whole = (torch.load(tmp_path / run_dir / "checkpoints/last.pt",
                                 weights_only=True) for run_dir in ("old", "whole"))
    assert all(len(state["param_groups"]) == 2 for state in resumed["optimizers"])
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_optimizers_use_their_fused_kernel_on_cuda_unless_the_config_says_otherwise():
    from trainer.optim import device_options
    from trainer.targets import instantiate

    adamw, cuda = instantiate(compose_train().optimizer), torch.device("cuda", 0)
    assert device_options(adamw, cuda) == {"fused": True}
    assert device_options(adamw, torch.device("cpu")) == {}
    assert device_options(instantiate(compose_train("+optimizer.fused=false").optimizer),
                          cuda) == {}
    assert device_options(functools.partial(torch.optim.LBFGS), cuda) == {}  # has no fused kernel
