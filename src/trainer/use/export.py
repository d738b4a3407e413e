"""`export`: a finished run's model for a serving stack, in one of three formats.

- torch_export: a `torch.export` program (model.pt2), for `torch.export.load` or AOTInductor;
- onnx: an ONNX graph from torch.onnx's dynamo exporter, run here in onnxruntime;
- onnx_int8: the same graph with the weights of its matrix products in int8 (onnxruntime's
  dynamic quantization), for serving on CPUs: about 4x smaller, and faster where matrix products
  dominate;
- safetensors: the weights alone, with model.yaml (instantiable with Hydra) and the run's
  config.yaml beside them.

Every export is checked before it is reported: the exported copy's outputs on `count` test
inputs (a larger batch than the one traced, so the batch dimension is shown to be dynamic) must
equal the PyTorch model's within TOLERANCE; the int8 graph's, which cannot, must make the same
predictions (INT8_AGREEMENT) or images within INT8_TOLERANCE. export.json says what goes in,
what comes out, the class names or vocabulary, and the difference each format showed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import tempfile
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
from trainer.run.state import Setup
from trainer.targets import instantiate

log = logging.getLogger("trainer")

FILES = {"torch_export": "model.pt2", "onnx": "model.onnx", "onnx_int8": "model.int8.onnx",
         "safetensors": "model.safetensors"}
ONNX = ("onnx", "onnxscript", "onnxruntime")
EXTRA = {"onnx": ONNX, "onnx_int8": ONNX, "safetensors": ("safetensors",)}
TOLERANCE = 1e-4
INT8_AGREEMENT = 0.9  # the least share of top predictions (per row or position) kept in int8
INT8_TOLERANCE = 0.1  # the most an int8 model's image may move, in [-1, 1] (5% of the range)
# Matrix products (linear layers) and LSTMs go to int8; convolutions stay float: onnxruntime's
# int8 convolutions ran 8x slower than float ones here (a digits CNN), linear layers 2x faster.
# Embedding tables (Gather) and GRUs stay float too.
INT8_OPERATORS = ["MatMul", "Gemm", "LSTM"]
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
    writer = {"torch_export": _torch_export, "onnx": _onnx, "onnx_int8": _onnx_int8,
              "safetensors": _safetensors}[fmt]
    try:
        with _quiet():
            shapes = _dynamic_shapes(module, inputs) if fmt != "safetensors" else None
            run_exported = writer(s, module, inputs, path, shapes)
            difference = _difference(module, run_exported, inputs, shapes)
            agreement = _agreement(module, run_exported, inputs) if s.task.served_scores \
                else None
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the exporters raise many types
        path.unlink(missing_ok=True)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        model = s.cfg.model._target_.rsplit(".", 1)[-1].lower()
        raise UserError(f"model={model} cannot be exported as {fmt}: {first_line}") from None
    _refuse_if_unfaithful(path, fmt, difference, agreement, f"{len(inputs)} {checked_on}")
    entry = {"file": path.name, "inputs_checked": len(inputs), "checked_on": checked_on,
             "max_abs_diff": difference}
    if fmt == "onnx_int8":
        entry |= {"bytes": path.stat().st_size, "float_bytes": run_exported.float_bytes}
        if agreement is not None:
            entry["top1_agreement"] = agreement
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
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > \
        ONNX_SINGLE_FILE_BYTES
    torch.onnx.export(module, (inputs[:TRACED],), path, dynamo=True, external_data=large,
                      dynamic_shapes=shapes, input_names=["input"],
                      output_names=["output"])
    return OnnxSession(path)


class OnnxSession:
    """An ONNX file in onnxruntime on the CPU, called as the PyTorch model is. `float_bytes`: for
    an int8 graph, the size of the float one it was made from."""

    def __init__(self, path: Path, float_bytes: int | None = None) -> None:
        import onnxruntime

        self.float_bytes = float_bytes
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.cpu().numpy()})[0])


def _onnx_int8(s: Setup, module: nn.Module, inputs: Tensor, path: Path,
               shapes: Shapes) -> Callable:
    """The ONNX graph, its matrix products' weights quantized to int8 (scales per tensor) and
    their inputs at run time: onnxruntime's dynamic quantization. Its pre-processing folds the
    constants first, without which an LSTM's weights, computed in the graph, stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        float_path, folded = Path(scratch) / "model.onnx", Path(scratch) / "folded.onnx"
        _onnx(s, module, inputs, float_path, shapes)
        float_bytes = sum(f.stat().st_size for f in Path(scratch).iterdir())
        large = float_bytes > ONNX_SINGLE_FILE_BYTES
        # Symbolic shape inference is skipped: it gives up on the transformer's graph.
        quant_pre_process(float_path, folded, skip_symbolic_shape=True,
                          save_as_external_data=large)
        quantize_dynamic(folded, path, weight_type=QuantType.QInt8,
                         op_types_to_quantize=INT8_OPERATORS, use_external_data_format=large)
    return OnnxSession(path, float_bytes)


def _refuse_if_unfaithful(path: Path, fmt: str, difference: float, agreement: float | None,
                          checked: str) -> None:
    """Delete an export that does not serve what the model does, and say why: outputs beyond
    TOLERANCE, or for int8 predictions below INT8_AGREEMENT (images beyond INT8_TOLERANCE)."""
    if fmt != "onnx_int8":
        if difference <= TOLERANCE:  # not NaN
            return
        why = f"outputs differ by up to {difference:.3g} (more than {TOLERANCE})"
    elif agreement is not None:
        if agreement >= INT8_AGREEMENT:
            return
        why = (f"its top predictions match PyTorch's {agreement:.1%} of the time (less than "
               f"{INT8_AGREEMENT:.0%}); serve format=onnx instead")
    else:
        if difference <= INT8_TOLERANCE:
            return
        why = (f"its images differ by up to {difference:.3g} (more than {INT8_TOLERANCE}); "
               "serve format=onnx instead")
    path.unlink()  # a wrong model must not be served
    raise UserError(f"the exported {path} disagrees with the PyTorch model on {checked}: {why}")


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
    return max((exported(x).float() - module(x).float().cpu()).abs().max().item()
               for x in probes)


@torch.no_grad()
def _agreement(module: nn.Module, exported: Callable, inputs: Tensor) -> float:
    """The share of top predictions (each row's, or each position's) the copy makes as well."""
    same = exported(inputs).argmax(-1) == module(inputs).argmax(-1).cpu()
    return same.float().mean().item()


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
