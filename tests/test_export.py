"""`export-model`: a run's model as a torch.export program, an ONNX graph and safetensors
weights, each giving the PyTorch model's outputs for a batch size it was not traced with."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODELS, assert_clean_error, compose_train, run_in_process
from trainer.errors import UserError
from trainer.use.export import INT8_AGREEMENT, INT8_TOLERANCE

TEXT_MODELS = ("rnn", "transformer")


def export_cfg(run, fmt: str = "torch_export", **keys):
    return OmegaConf.create({"run_dir": str(run), "checkpoint": "best", "format": fmt,
                             "outputs": None, "count": 16, "device": "cpu", **keys})


def restored_model(run):
    """The run's PyTorch model in eval mode, and 5 inputs of the kind it takes."""
    from trainer.use.jobs import restored_run

    s = restored_run(export_cfg(run))
    model = s.model.eval()
    if s.cfg.model._target_.endswith("GAN"):
        return model, torch.randn(5, model.latent_dim)
    return model, s.data.test.batch(torch.arange(3, 8))[0]


def onnx_outputs(path, inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])


def safetensors_model(folder):
    from hydra.utils import instantiate
    from safetensors.torch import load_model

    model = instantiate(OmegaConf.load(folder / "model.yaml"))
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


@pytest.mark.slow
def test_export_model_onnx_matches_pytorch_on_another_batch_size(tmp_path, finished_run):
    result = run_in_process("export-model", f"run_dir={finished_run}", "format=onnx",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported["max_abs_diff"] <= 1e-4 and reported["dynamic"] == ["batch"]
    folder = finished_run / "export"
    model, inputs = restored_model(finished_run)
    with torch.no_grad():
        assert torch.allclose(onnx_outputs(folder / "model.onnx", inputs), model(inputs),
                              atol=1e-4)
    described = json.loads((folder / "export.json").read_text())
    assert described["classes"] == [str(d) for d in range(10)]
    assert described["input"]["shape"] == ["batch", 1, 8, 8]


@pytest.mark.slow  # two exports in onnxruntime
def test_export_model_onnx_int8_is_smaller_and_predicts_as_pytorch(tmp_path, finished_run):
    import onnx

    result = run_in_process("export-model", f"run_dir={finished_run}", "format=onnx_int8",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "its top predictions match PyTorch's" in result.stderr
    assert "int8 weights, 0." in result.stderr  # a share of the float model's size
    path = finished_run / "export" / "model.int8.onnx"
    operators = {node.op_type for node in onnx.load(path).graph.node}
    assert "MatMulInteger" in operators and "Conv" in operators  # linear in int8, conv float
    entry = json.loads((finished_run / "export" / "export.json").read_text())["formats"][
        "onnx_int8"]
    assert entry == json.loads(result.stdout.strip().splitlines()[-1])
    assert entry["bytes"] < 0.7 * entry["float_bytes"]
    # What the export promises, whatever this CPU's int8 kernels round: the file it kept makes
    # PyTorch's top predictions on the inputs it was checked on at least INT8_AGREEMENT of the time.
    assert entry["top1_agreement"] >= INT8_AGREEMENT
    from trainer.use.jobs import restored_run

    s = restored_run(export_cfg(finished_run))
    module, inputs = s.task.served(s.model.eval(), s.data.test, entry["inputs_checked"])
    inputs = inputs[torch.arange(entry["inputs_checked"]) % len(inputs)]
    with torch.no_grad():
        same = onnx_outputs(path, inputs).argmax(-1) == module(inputs).argmax(-1)
    assert same.float().mean().item() == pytest.approx(entry["top1_agreement"])


def test_an_int8_export_that_changes_predictions_is_refused_and_removed(finished_run,
                                                                        monkeypatch):
    from trainer.use.jobs import export_job

    monkeypatch.setattr("trainer.use.export.INT8_AGREEMENT", 1.01)  # more than any export can give
    with pytest.raises(UserError, match=r"model.int8.onnx disagrees with the PyTorch model on 16 "
                                        r"test inputs: its top predictions match PyTorch's "
                                        r"[\d.]+% of the time \(less than 101%\); serve "
                                        r"format=onnx instead"):
        export_job(export_cfg(finished_run, "onnx_int8"))
    assert not (finished_run / "export" / "model.int8.onnx").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished debug=fast run per architecture (language models on a small text)."""
    from trainer.run.loop import train

    root = tmp_path_factory.mktemp("export")
    text = root / "corpus.txt"
    text.write_text("the sky is blue and the sea is green.\n" * 400)
    runs = {}
    for model in MODELS:
        data = ["data=text", f"data.path={text}"] if model in TEXT_MODELS else []
        runs[model] = root / model
        train(compose_train("debug=fast", "logger=none", f"model={model}", *data), runs[model])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_exports_to_every_format(trained, model):
    from trainer.use.jobs import export_job

    run = trained[model]
    for fmt in ("torch_export", "onnx", "safetensors"):
        assert export_job(export_cfg(run, fmt))["max_abs_diff"] <= 1e-4
    int8 = export_job(export_cfg(run, "onnx_int8"))
    assert int8["bytes"] < int8["float_bytes"]  # every model has linear layers
    # The export's promise: scores keep their top predictions, images stay close. A score's
    # size in int8 depends on the CPU's kernels and is no promise, so it is not checked.
    if "top1_agreement" in int8:
        assert int8["top1_agreement"] >= INT8_AGREEMENT
    else:
        assert int8["max_abs_diff"] <= INT8_TOLERANCE
    assert ("top1_agreement" in int8) == (model in ("cnn", "rnn", "transformer"))
    folder = run / "export"
    reference, inputs = restored_model(run)
    with torch.no_grad():
        expected = reference(inputs)
        assert torch.allclose(torch.export.load(folder / "model.pt2").module()(inputs), expected,
                              atol=1e-4)
        assert torch.allclose(onnx_outputs(folder / "model.onnx", inputs), expected, atol=1e-4)
        # The same weights; the reference runs channels-last (device.channels_last=auto), whose
        # convolutions sum in another order.
        torch.testing.assert_close(safetensors_model(folder)(inputs), expected, rtol=1e-5,
                                   atol=1e-6)
    described = json.loads((folder / "export.json").read_text())
    assert set(described["formats"]) == {"torch_export", "onnx", "onnx_int8", "safetensors"}
    if model == "transformer":  # any length up to the context, in ONNX too
        assert described["formats"]["onnx"]["dynamic"] == ["batch", "tokens"]
        with torch.no_grad():
            assert torch.allclose(onnx_outputs(folder / "model.onnx", inputs[:, :7]),
                                  reference(inputs[:, :7]), atol=1e-4)
    if model in TEXT_MODELS:
        assert described["tokenizer"]["kind"] == "char"


@pytest.mark.slow
def test_export_errors_are_one_clear_line(tmp_path, finished_run, monkeypatch):
    from trainer.run.loop import train
    from trainer.use.jobs import export_job


    assert_clean_error(run_in_process("export-model", f"run_dir={finished_run}", "format=tflite",
                                      cwd=tmp_path),
                       "format='tflite' is not an export format: use one of torch_export, onnx")
    with pytest.raises(UserError, match="count=2 is out of range: it must be >= 3"):
        export_job(export_cfg(finished_run, count=2))
    (tmp_path / "a-file").write_text("kept")
    with pytest.raises(UserError, match="outputs='.*a-file' is a file: give a folder"):
        export_job(export_cfg(finished_run, outputs=str(tmp_path / "a-file")))
    assert (tmp_path / "a-file").read_text() == "kept"
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name))
    with pytest.raises(UserError, match=r"format=onnx needs onnxruntime: pip install "
                                        r"'trainer\[export\]'"):
        export_job(export_cfg(finished_run, "onnx"))
    monkeypatch.undo()
    monkeypatch.setenv("TRAINER_TRUSTED_TARGETS", "failing_model")  # its model comes back
    run = tmp_path / "unexportable"
    train(compose_train("debug=fast", "logger=none",
                        "model._target_=failing_model.UnexportableCNN"), run)
    with pytest.raises(UserError, match="model=unexportablecnn cannot be exported as "
                                        "torch_export: "):
        export_job(export_cfg(run))
    assert not (run / "export" / "model.pt2").exists()


@pytest.mark.slow
def test_export_without_the_run_data_checks_on_random_inputs(tmp_path, text_file):
    """A run copied where its data is not: the export is checked on random inputs of the data's
    shape (token ids here) instead of test inputs, and says so."""
    from trainer.run.loop import train
    from trainer.use.jobs import export_job

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text_file.read_text())
    run = tmp_path / "run"
    train(compose_train("debug=fast", "logger=none", "model=transformer", "data=text",
                        f"data.path={corpus}", "data.block_size=16"), run)
    assert export_job(export_cfg(run))["checked_on"] == "test inputs"
    corpus.unlink()
    entry = export_job(export_cfg(run, "onnx"))
    assert entry["checked_on"] == "random inputs" and entry["max_abs_diff"] <= 1e-4
    formats = json.loads((run / "export" / "export.json").read_text())["formats"]
    assert formats["onnx"]["checked_on"] == "random inputs"
    assert formats["torch_export"]["checked_on"] == "test inputs"


def test_a_lora_run_exports_with_its_adapters_merged(tmp_path):
    """Served as the plain model it amounts to: no adapter tensors, the LoRA model's outputs."""
    from trainer.run.loop import train
    from trainer.use.jobs import export_job

    text = tmp_path / "corpus.txt"
    text.write_text("the sky is blue and the sea is green.\n" * 400)
    run = tmp_path / "lora"
    train(compose_train("debug=fast", "logger=none", "model=transformer", "data=text",
                        f"data.path={text}", "model.lora_rank=2", "optimizer.lr=0.05"), run)
    reference, inputs = restored_model(run)  # with its adapters, as trained
    assert reference.blocks[0].qkv.lora_b.abs().sum() > 0  # they changed something
    assert export_job(export_cfg(run))["max_abs_diff"] <= 1e-4
    program = torch.export.load(run / "export" / "model.pt2")
    assert not [name for name in program.state_dict if "lora" in name]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(inputs), reference(inputs), rtol=1e-4,
                                   atol=1e-4)
