"""`export`: a finished run's model for a serving stack, in one of three formats.

- torch_export: a `torch.export` program (model.pt2), for `torch.export.load` or AOTInductor;
- onnx: an ONNX graph from torch.onnx's dynamo exporter, run here in onnxruntime;
- safetensors: the weights alone, with model.yaml (instantiable with Hydra) and the run's
  config.yaml beside them.

Every export is checked before it is reported: the exported copy's outputs on `count` test
inputs (a larger batch than the one traced, so the batch dimension is shown to be dynamic) must
equal the PyTorch model's within TOLERANCE. export.json says what goes in, what comes out, the
class names or vocabulary, and the difference each format showed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.export import Dim

from trainer.data import DataSpec
from trainer.errors import UserError
from trainer.loop import Setup
from trainer.targets import instantiate

log = logging.getLogger("trainer")

FILES = {"torch_export": "model.pt2", "onnx": "model.onnx", "safetensors": "model.safetensors"}
EXTRA = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors",)}
TOLERANCE = 1e-4
TRACED = 2  # inputs the graph is traced with (not 1: torch.export specialises a size of 1)
ONNX_SINGLE_FILE_BYTES = 1 << 30  # larger weights go to model.onnx.data (protobuf's 2 GiB cap)
Shapes = tuple[dict[int, Any]] | None  # torch.export's dynamic_shapes of the one input


class RandomInputs:
    """Where the run's data cannot be read (a run copied elsewhere), the test split export
    checks itself on: seeded random inputs of the data's shape, images in [-1, 1] or token ids
    of the vocabulary, one context long."""

    def __init__(self, spec: DataSpec, count: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        if spec.kind == "text":
            self.inputs = torch.randint(spec.vocab_size, (count, spec.block_size),
                                        generator=generator)
        else:
            self.inputs = torch.rand(count, *spec.in_shape, generator=generator) * 2 - 1
        self.inputs = self.inputs.to(device)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[index], torch.zeros(len(index), dtype=torch.long)


def export(s: Setup, fmt: str, folder: Path, count: int, checked_on: str = "test inputs"
           ) -> dict[str, Any]:
    """Write the run's model to folder/FILES[fmt], check it on `count` inputs of s.data.test
    (`checked_on` says what they are), and describe it in export.json. Returns the format's
    entry there: file, inputs checked, largest difference."""
    if fmt not in FILES:
        raise UserError(f"format={fmt!r} is not an export format: use one of {', '.join(FILES)}")
    missing = [name for name in EXTRA.get(fmt, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"format={fmt} needs {', '.join(missing)}: pip install 'trainer[export]'")
    s.model.eval()
    module, inputs = s.task.served(s.model, s.data.test, count)
    inputs = inputs[torch.arange(count, device=inputs.device) % len(inputs)]  # a tiny test split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[fmt]
    writer = {"torch_export": _torch_export, "onnx": _onnx, "safetensors": _safetensors}[fmt]
    try:
        with _quiet():
            shapes = _dynamic_shapes(module, inputs) if fmt != "safetensors" else None
            run_exported = writer(s, module, inputs, path, shapes)
            difference = _difference(module, run_exported, inputs, shapes)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the exporters raise many types
        path.unlink(missing_ok=True)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        model = s.cfg.model._target_.rsplit(".", 1)[-1].lower()
        raise UserError(f"model={model} cannot be exported as {fmt}: {first_line}") from None
    if not difference <= TOLERANCE:  # also catches NaN
        path.unlink()  # a wrong model must not be served
        raise UserError(f"the exported {path} disagrees with the PyTorch model: outputs differ "
                        f"by up to {difference:.3g} (more than {TOLERANCE}) on {len(inputs)} "
                        f"{checked_on}")
    entry = {"file": path.name, "inputs_checked": len(inputs), "checked_on": checked_on,
             "max_abs_diff": difference}
    if shapes:
        entry["dynamic"] = [dim.__name__ for dim in shapes[0].values()]
    _describe(s, module, inputs, folder, fmt, entry)
    return entry


def _torch_export(s: Setup, module: nn.Module, inputs: Tensor, path: Path,
                  shapes: Shapes) -> Callable:
    program = torch.export.export(module, (inputs[:TRACED],), dynamic_shapes=shapes)
    torch.export.save(program, path)
    return torch.export.load(path).module()


def _onnx(s: Setup, module: nn.Module, inputs: Tensor, path: Path,
          shapes: Shapes) -> Callable:
    import onnxruntime

    large = sum(p.numel() * p.element_size() for p in module.parameters()) > \
        ONNX_SINGLE_FILE_BYTES
    torch.onnx.export(module, (inputs[:TRACED],), path, dynamo=True, external_data=large,
                      dynamic_shapes=shapes, input_names=["input"],
                      output_names=["output"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.cpu().numpy()})[0])


def _safetensors(s: Setup, module: nn.Module, inputs: Tensor, path: Path,
                 shapes: Shapes) -> Callable:
    """The whole model's weights (a GAN's discriminator too: model.yaml rebuilds both), checked
    by loading them into a model built afresh from model.yaml."""
    from safetensors.torch import load_model, save_model

    model_yaml = OmegaConf.merge(s.cfg.model, _plain(s.task.model_sizes(s.data.spec)))
    OmegaConf.save(model_yaml, path.with_name("model.yaml"))
    OmegaConf.save(s.cfg, path.with_name("config.yaml"))
    save_model(s.model, str(path), metadata={"format": "pt"})
    rebuilt = instantiate(OmegaConf.load(path.with_name("model.yaml")))
    load_model(rebuilt, str(path), device=str(inputs.device))
    served, _ = s.task.served(rebuilt.eval(), s.data.test, 1)
    return served


@torch.no_grad()
def _difference(module: nn.Module, exported: Callable, inputs: Tensor, shapes: Shapes) -> float:
    """The largest difference between the exported copy's outputs and the model's, on all the
    inputs and, where the length is dynamic, on their first half too."""
    probes = [inputs]
    if shapes and 1 in shapes[0]:
        probes.append(inputs[:, :max(1, inputs.shape[1] // 2)])
    return max((exported(x).float() - module(x).float()).abs().max().item() for x in probes)


def _dynamic_shapes(module: nn.Module, inputs: Tensor) -> Shapes:
    """A dynamic batch always; for token inputs also a dynamic length up to the context, where
    the model allows it (an LSTM's export fixes the length: then it stays the trained one)."""
    batch = Dim("batch", min=1)
    if inputs.is_floating_point():
        return ({0: batch},)
    tokens = {0: batch, 1: Dim("tokens", min=1, max=inputs.shape[1])}
    try:
        torch.export.export(module, (inputs[:TRACED],), dynamic_shapes=(tokens,))
        return (tokens,)
    except torch._dynamo.exc.UserError:  # the length was specialised
        return ({0: batch},)


def _describe(s: Setup, module: nn.Module, inputs: Tensor, folder: Path, fmt: str,
              entry: dict[str, Any]) -> None:
    """export.json: the contract of the exported model, and what each format showed."""
    sidecar = folder / "export.json"
    formats = json.loads(sidecar.read_text()).get("formats", {}) if sidecar.is_file() else {}
    with torch.no_grad():
        output = module(inputs[:1])
    spec = s.data.spec
    description: dict[str, Any] = {
        "model": s.cfg.model._target_.rsplit(".", 1)[-1].lower(),
        "data": spec.name,
        "input": {"name": "input", "dtype": str(inputs.dtype).removeprefix("torch."),
                  "shape": ["batch", *inputs.shape[1:]], "meaning": s.task.served_input},
        "output": {"name": "output", "dtype": str(output.dtype).removeprefix("torch."),
                   "shape": ["batch", *output.shape[1:]], "meaning": s.task.served_output},
    }
    if spec.classes:
        description["classes"] = list(spec.classes)
    if spec.tokenizer is not None:
        description["tokenizer"] = _write_tokenizer(spec.tokenizer, folder)
    description["formats"] = {**formats, fmt: entry}
    sidecar.write_text(json.dumps(description, indent=2) + "\n")


def _write_tokenizer(tokenizer: Any, folder: Path) -> dict[str, Any]:
    if tokenizer.name == "char":
        return {"kind": "char", "vocabulary": tokenizer.chars}  # token id = index in the string
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    return {"kind": tokenizer.name, "file": "tokenizer.json"}


def _plain(sizes: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in sizes.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress prints, warnings and INFO logs: not for the user of an export."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
