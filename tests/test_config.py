"""Config composition: every option of every group, the schemas, and the pre-flight checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from conftest import compose_train
from trainer.cli import CONFIG_DIR
from trainer.config import validate
from trainer.errors import UserError

GROUPS = ["model", "data", "optimizer", "scheduler", "device", "logger", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_groups_have_the_documented_options():
    assert options("model") == ["autoencoder", "cnn", "gan", "rnn", "transformer"]
    assert options("data") == ["cifar10", "digits", "fashion_mnist", "hf", "image_folder",
                               "mnist", "shakespeare", "text"]
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("scheduler") == ["constant", "cosine", "step"]
    assert options("device") == ["auto", "cpu", "cuda", "mps"]
    assert options("logger") == ["mlflow", "none", "tensorboard", "wandb"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_passes_the_checks(group):
    for option in options(group):
        required = {"image_folder": ["data.path=x"], "text": ["data.path=x", "model=rnn"],
                    "shakespeare": ["model=rnn"], "hf": ["data.name=x"]}
        validate(compose_train(f"{group}={option}",
                               *(required.get(option, []) if group == "data" else [])))


def test_defaults_are_cnn_on_digits():
    cfg = compose_train()
    assert cfg.model._target_ == "trainer.models.cnn.CNN"
    assert cfg.data._target_ == "trainer.data.images.digits"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.device.type == "auto" and cfg.seed == 0 and cfg.resume is None


def test_unknown_key_fails_while_composing():
    with pytest.raises(ConfigCompositionException, match="trainer.epoch"):
        compose_train("trainer.epoch=3")


def test_a_key_added_with_plus_is_refused_where_a_schema_types_the_node():
    from hydra import compose, initialize_config_dir

    from trainer.cli import COMMANDS_DIR
    from trainer.config import refuse_added_keys

    # A model's keys are checked against its constructor instead (validate).
    refuse_added_keys(compose_train("model=rnn", "+model.batch_norm=true"))
    with pytest.raises(UserError, match=r"unknown key device.cont \(did you mean device.count"):
        refuse_added_keys(compose_train("+device.cont=2"))
    with initialize_config_dir(config_dir=COMMANDS_DIR, version_base="1.3"):
        evaluate = compose("evaluate", overrides=["run_dir=x", "+data.path=y"])
        refuse_added_keys(evaluate)  # evaluate's data keys are the run's, checked there
        misspelt = compose("evaluate", overrides=["run_dir=x", "+chekpoint=last"])
    with pytest.raises(UserError, match=r"unknown key chekpoint \(did you mean checkpoint\?\)"):
        refuse_added_keys(misspelt)


def test_wrong_type_in_a_schema_field_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as error:
        compose_train("trainer.epochs=many")
    assert isinstance(error.value.__cause__, ValidationError)


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.lr=0", "optimizer.lr=0 is out of range: it must be > 0"),
    ("data.batch_size=-4", "data.batch_size=-4 is out of range"),
    ("device.precision=8", "device.precision='8' is not accepted: choose one of auto, 32, bf16"),
    ("device.type=tpu", "device.type='tpu' is not accepted"),
    ("optimizer.lr=fast", "optimizer.lr='fast' has the wrong type: expected float"),
    ("model.depth=2.5", "model.depth=2.5 has the wrong type: expected int"),
    ("model.batch_norm=3", "model.batch_norm=3 has the wrong type: expected bool"),
    ("model.width=null", "model.width=null is not accepted: it takes int (default 32)"),
    ("optimizer.lr=null", "optimizer.lr=null is not accepted: it takes float (default 0.001)"),
    ("model=rnn model.bidirectional=null", "model.bidirectional=null is not accepted: it takes "
                                           "bool"),
    ("optimizer.betas=abc", "optimizer.betas='abc' is not accepted: it takes a list of 2 "
                            "numbers, such as optimizer.betas=[0.9,0.999]"),
    ("optimizer.betas=[0.9,0.95,0.99]", "optimizer.betas=[0.9, 0.95, 0.99] is not accepted"),
    ("model=autoencoder model.denoise=-1", "model.denoise=-1 is out of range: it must be >= 0"),
    ("scheduler=step scheduler.gamma=0", "scheduler.gamma=0 is out of range: it must be > 0"),
    ("scheduler=cosine scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio=2 is out of range"),
    ("logger=wandb logger.wandb.mode=cloud", "logger.wandb.mode='cloud' is not accepted: choose "
                                             "one of auto, online, offline, disabled"),
])
def test_validate_names_the_bad_value(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate(compose_train(*override.split()))


def test_misspelt_key_in_a_config_file_is_caught_against_the_constructor():
    cfg = compose_train()
    OmegaConf.set_struct(cfg, False)
    cfg.model.widht = 8
    with pytest.raises(UserError, match="unknown key model.widht .*accepted: width, depth"):
        validate(cfg)


def test_precision_auto_is_bf16_where_the_hardware_has_it_else_16_or_32(monkeypatch, caplog):
    import torch

    from trainer import distributed
    from trainer.distributed import resolve_precision

    assert compose_train().device.precision == "auto"
    assert compose_train("device=cuda").device.precision == "auto"
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "32")):  # whatever this CPU has
        monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda native=native: native)
        precision, why = resolve_precision("auto", cpu)
        assert precision == expected and why.startswith("auto: this CPU has")
    with caplog.at_level("WARNING", "trainer"):
        assert resolve_precision("bf16", cpu) == ("bf16", "set")  # asked for: kept, but warned
    assert "device.precision=bf16 on a CPU without bf16 instructions" in caplog.text
    assert "slower than 32" in caplog.text
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    caplog.clear()
    assert resolve_precision("bf16", cpu) == ("bf16", "set") and not caplog.text
    for native, expected in ((True, "bf16"), (False, "16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True,
                            native=native: native and not including_emulation)
        assert resolve_precision("auto", torch.device("cuda", 0))[0] == expected


def test_tf32_is_set_so_that_torch_compile_can_still_read_it():
    import torch

    from trainer.distributed import enable_tf32

    try:
        enable_tf32()
        # inductor reads the legacy setting; the newer fp32_precision API makes this raise
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
