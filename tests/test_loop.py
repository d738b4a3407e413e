"""The loop's promises: exact resume, accumulation, precision, compile, early stopping."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODELS, compose_train
from trainer.errors import UserError
from trainer.run.loop import build, train
from trainer.run.step import train_step

DROPOUT_RUN = ["debug=fast", "logger=none", "model=transformer", "model.dropout=0.2",
               "trainer.val_every=4"]


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    full = train(compose_train(*DROPOUT_RUN, "trainer.max_steps=12"), tmp_path / "full")
    half = tmp_path / "half"
    train(compose_train(*DROPOUT_RUN, "trainer.max_steps=4"), half)  # stopped after step 4

    saved = torch.load(half / "checkpoints" / "last.pt", weights_only=True)
    cfg = OmegaConf.create(saved["config"])
    cfg.trainer.max_steps, cfg.resume = 12, str(half)
    resumed = train(cfg, half)

    assert resumed == full
    assert json.loads((half / "metrics.json").read_text()) == {
        k: v for k, v in full.items() if k.startswith("test/")}
    expected = weights(tmp_path / "full")
    assert all(torch.equal(expected[k], v) for k, v in weights(half).items())


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    common = ["debug=fast", "logger=none", "model.dropout=0", "trainer.grad_clip=0"]
    large = train(compose_train(*common, "data.batch_size=16"), tmp_path / "large")
    accumulated = train(compose_train(*common, "data.batch_size=8", "trainer.accumulate=2"),
                        tmp_path / "accumulated")
    assert accumulated["test/loss"] == pytest.approx(large["test/loss"], rel=1e-5)
    for key, value in weights(tmp_path / "large").items():
        torch.testing.assert_close(weights(tmp_path / "accumulated")[key], value)


def test_the_logged_gradient_norm_is_the_accumulated_gradients_before_clipping():
    s = build(compose_train("debug=fast", "model.dropout=0"))
    micro_batches = [s.data.train.batch(torch.arange(i, i + 8)) for i in (0, 8)]
    by_hand = [p.detach().clone() for p in s.model.parameters()]
    s.model.zero_grad()
    sum(s.task.training_step(s.model, b, 0)[0] for b in micro_batches).div(2).backward()
    expected = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in s.model.parameters()]))
    assert expected > 1e-3  # so clipping at 1e-3 changes the gradient
    optimizer = torch.optim.SGD(s.model.parameters(), lr=1.0)
    logs, skipped = train_step(s.task, s.model, [optimizer], torch.amp.GradScaler("cpu",
                               enabled=False), micro_batches, s.rt, grad_clip=1e-3)
    torch.testing.assert_close(logs["grad_norm"], expected)
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - q) for p, q in
                                                  zip(s.model.parameters(), by_hand, strict=True)]))
    assert moved.item() == pytest.approx(1e-3, rel=1e-3)  # the step took the clipped gradient
    assert not skipped


@pytest.mark.parametrize("precision", ["bf16", pytest.param("16", marks=pytest.mark.slow)])
def test_reduced_precision_trains(tmp_path, precision):  # float16 on a CPU: 10 s, whole suite
    metrics = train(compose_train("logger=none", "trainer.progress=false", "trainer.max_steps=60",
                                  f"device.precision={precision}"), tmp_path)
    assert metrics["test/acc"] > 0.8


@pytest.mark.slow  # inductor compiles C++ for 10-20 s; compile-once below runs in the fast tier
def test_compiled_model_trains(tmp_path):
    metrics = train(compose_train("debug=fast", "logger=none", "device.compile=true",
                                  "trainer.max_steps=30", "trainer.val_every=30"), tmp_path)
    assert metrics["test/acc"] > 0.5


@pytest.mark.parametrize("options", [  # two in the fast tier, all in the whole suite
    *([f"model={model}"] if model in ("cnn", "transformer") else
      pytest.param([f"model={model}"], marks=pytest.mark.slow) for model in MODELS),
    pytest.param(["model=transformer", "model.activation_checkpointing=true"],
                 marks=pytest.mark.slow)], ids=" ".join)
def test_compiled_models_compile_once_not_every_step(tmp_path, monkeypatch, options):
    """Dynamo's graphs, counted by a backend that runs them as they are: as many after 12 steps
    as after 4, so no step recompiles (guards on step counters or shapes would)."""
    compiled = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile,
                                                            backend=counting_backend))
    counts = []
    for steps in (4, 12):
        torch._dynamo.reset()
        compiled.clear()
        train(compose_train("debug=fast", "logger=none", *options, "device.compile=true",
                            f"trainer.max_steps={steps}", "trainer.val_every=2"),
              tmp_path / str(steps))
        counts.append(len(compiled))
    assert 0 < counts[0] == counts[1], counts


def test_early_stopping_ends_before_the_budget(tmp_path):
    train(compose_train("debug=fast", "logger=none", "optimizer.lr=1e-9", "trainer.max_steps=60",
                        "trainer.val_every=2", "trainer.patience=2",
                        "trainer.monitor=val/acc"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] < 60 and state["progress"]["stale"] == 2


def test_improvements_within_min_delta_do_not_hold_off_early_stopping():
    from trainer.run.resume import Progress
    from trainer.run.validation import _improved

    progress, stale, best = Progress(), [], []
    for loss in (1.0, 0.95, 0.94, 0.935, 0.93, 0.92):
        best.append(_improved({"val/loss": loss}, "val/loss", "min", progress, min_delta=0.02))
        stale.append(progress.stale)
    assert stale == [0, 0, 1, 2, 3, 0]  # 0.93 is 0.02 below 0.95: not more than min_delta
    assert best == [True] * 6 and progress.best == 0.92  # best.pt follows every improvement


def test_early_stopping_with_min_delta_ends_a_run_that_still_improves_a_little(tmp_path):
    train(compose_train("debug=fast", "logger=none", "trainer.max_steps=60",
                        "trainer.val_every=2", "trainer.patience=2", "trainer.min_delta=0.5"),
          tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 6  # validations at 2, 4, 6: two that did not count


def test_max_minutes_ends_training_and_counts_over_resumes(tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    run = ["debug=fast", "logger=none", "trainer.max_steps=1000000", "trainer.val_every=1000"]
    metrics = train(compose_train(*run, "trainer.max_minutes=0.005"), tmp_path)  # 0.3 s
    first = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < first["progress"]["step"] < 1000000 and first["seconds"] >= 0.3
    assert first["metrics"] and "test/acc" in metrics  # validated and tested as at the end
    assert "trainer.max_minutes=0.005 spent at step" in caplog.text

    # Resumed with the time it had already trained as its budget: spent after one more step.
    cfg = OmegaConf.create(first["config"])
    cfg.trainer.max_minutes, cfg.resume = first["seconds"] / 60, str(tmp_path)
    train(cfg, tmp_path)
    second = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert second["progress"]["step"] == first["progress"]["step"] + 1
    assert second["seconds"] > first["seconds"]


def test_the_overfit_preset_fits_one_batch(tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    train(compose_train("debug=overfit", "logger=none"), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["metrics"]
    assert last["val/acc"] == 1.0 and last["val/loss"] < 0.01  # its last validation
    assert "digits: 16 / 16 / 359 images (train / val / test)" in caplog.text
    assert "training and validating on the same 16 samples" in caplog.text


def test_a_language_model_fits_one_batch_of_windows(tmp_path, caplog, text_file):
    caplog.set_level("INFO", logger="trainer")
    train(compose_train("debug=overfit", "logger=none", "model=transformer", "data=text",
                        f"data.path={text_file}"), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["metrics"]
    assert last["val/loss"] < 0.2  # nats a character, from about 3 at the start
    assert "training and validating on the same 16 samples" in caplog.text


@pytest.mark.parametrize(("max_validations", "expected"), [(None, 40), (10, 10), (100, 40)])
def test_many_short_epochs_validate_at_most_max_validations_times(tmp_path, monkeypatch,
                                                                 max_validations, expected):
    """Batches of 512 digits: 2 steps an epoch, 40 epochs in 80 steps."""
    from trainer.run import loop

    calls, real = [], loop.validation
    monkeypatch.setattr(loop, "validation", lambda run, *a: calls.append(run.progress.step)
                        or real(run, *a))
    train(compose_train("logger=none", "trainer.progress=false", "data.batch_size=512",
                        "trainer.max_steps=80", "model.width=8", "model.depth=1",
                        f"trainer.max_validations={max_validations or 'null'}"), tmp_path)
    assert len(calls) == expected and calls[-1] == 80
    assert calls == sorted(set(calls))


def test_convolutional_models_train_channels_last_on_the_cpu_and_match_the_plain_layout(tmp_path):
    from trainer.run.loop import build

    def conv_weight_layouts(*overrides):
        model = build(compose_train("debug=fast", *overrides)).model
        return {m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in model.modules()
                # with one input channel or a 1x1 kernel both layouts are the same strides
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
                and m.in_channels > 1}

    assert conv_weight_layouts("model.residual=true") == {True}  # device.channels_last=auto
    assert conv_weight_layouts("model.residual=true", "device.channels_last=false") == {False}
    assert conv_weight_layouts("model=transformer", "device.channels_last=true") == set()

    common = ["debug=fast", "logger=none", "model.residual=true", "trainer.max_steps=6"]
    fast = train(compose_train(*common), tmp_path / "channels_last")
    plain = train(compose_train(*common, "device.channels_last=false"), tmp_path / "plain")
    assert fast["test/loss"] == pytest.approx(plain["test/loss"], rel=1e-4)
    with pytest.raises(UserError, match="device.channels_last='yes' is not accepted: choose one "
                                        "of auto, true, false"):
        train(compose_train(*common, "device.channels_last=yes"), tmp_path / "bad")
    with pytest.raises(UserError, match="channels_last=true cannot be used with device.strategy"):
        train(compose_train(*common, "device.channels_last=true", "device.strategy=fsdp",
                            "device.count=2"), tmp_path / "bad")


def test_a_long_run_says_how_long_it_will_take_after_its_first_steps(monkeypatch, caplog):
    from trainer import logging as reporting

    clock = iter([100.0, 105.0, 200.0, 200.5])  # 1 s a step, then 0.1 s a step
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("INFO", "trainer"):
        long_run = reporting.TimeEstimate(start_step=0, total_steps=1006)
        for step in range(1, 20):
            long_run.step(step)
        short_run = reporting.TimeEstimate(start_step=10, total_steps=600)  # resumed at 10
        for step in range(11, 30):
            short_run.step(step)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time: ")]
    # steps 2-6 took 5 s: 1,000 steps left at 1 s each; the second run's 59 s is not worth a line
    assert lines == ["time: 1 s a step over steps 2-6, so about 17 min for the 1,000 steps left "
                     "(validations add to it)"]
