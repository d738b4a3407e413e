"""Using a finished run: the jobs behind `evaluate`, `predict`, `generate` and `export-model`.
Each rebuilds the run's model from the config and the data spec saved in its checkpoint, so they
work where the run's data is not; `evaluate` needs the data, `export` and `generate` use it when
they can (test inputs, the default prompt). torch is imported only here."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config import DEVICE_TYPES, saved_config, validate
from trainer.errors import UserError, out_of_memory_explained
from trainer.models.pretrained import weights_from_checkpoint

log = logging.getLogger("trainer")
SPLITS = ("test", "val")  # what evaluate measures (the training split would come augmented)


def evaluate_job(cfg: DictConfig) -> dict[str, float]:
    """The test metrics of a run's checkpoint (or, split=val, its validation metrics), printed
    as JSON (the last line of stdout), and whether they match what the run recorded: its
    metrics.json, or the checkpoint's own validation (in the log). With cfg.data (keys such as
    path), the split of that other data, prepared as the run's was."""
    from trainer.run.evaluation import test_checkpoint
    from trainer.run.loop import build

    split = cfg.split
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not accepted: choose one of {', '.join(SPLITS)}")
    path, state, train_cfg = saved_run(cfg)
    data = None
    if cfg.data is not None and cfg.data != {}:  # null or {}: the run's own data
        train_cfg, data = _other_data(cfg, state, train_cfg)
    with weights_from_checkpoint():
        s = build(train_cfg, data)
    # The validation split as the run validated: up to its trainer.eval_batches.
    cap = train_cfg.trainer.eval_batches if split == "val" else None
    with out_of_memory_explained(lambda: "evaluate with a smaller batch (data.batch_size=N; "
                                 f"the run's is {s.data.batch_size}) or on another device "
                                 "(device=cpu)"):
        metrics, validated, report = test_checkpoint(s, path, state, split, cap)
    if report:
        log.info("%s split, by class:\n%s", split, report)
    saved = Path(cfg.run_dir) / "metrics.json"
    if data is None and (split == "val" or saved.is_file()):
        recorded = validated if split == "val" else json.loads(saved.read_text())
        same = all(recorded.get(k) == v for k, v in metrics.items())
        log.info("%s metrics %s %s", split, "match" if same else "differ from",
                 f"those {cfg.checkpoint}.pt was saved with" if split == "val"
                 else "metrics.json")
    if cfg.get("fid_features"):
        metrics[f"{split}/fid"] = _fid(s, cfg.fid_features, split)
    print(json.dumps(metrics))  # last line of stdout, for scripts
    return metrics


def _fid(s: Any, features_run: str, split: str) -> float:
    from trainer.tasks.adversarial import Adversarial
    from trainer.use.fid import check_run, gan_fid

    if not isinstance(s.task, Adversarial):
        raise UserError("fid_features scores a GAN's samples: this run is not a GAN")
    classifier = restored_model(OmegaConf.create({
        "run_dir": check_run(features_run), "checkpoint": "best", "device": str(s.rt.device)}))
    return gan_fid(s, classifier, features_run, split)


def _other_data(cfg: DictConfig, state: dict[str, Any], train_cfg: DictConfig
                ) -> tuple[DictConfig, Any]:
    """The run's config with cfg.data's keys changed in its data, and that data, checked to mean
    what the run's did: the same classes and image shape, or text in the run's vocabulary (a
    tokenizer trained on the run's text encodes the other text too)."""
    from trainer.data import spec_from_record
    from trainer.data.matching import matched
    from trainer.targets import instantiate

    if not isinstance(cfg.data, DictConfig):
        raise UserError(f"data={cfg.data}: evaluate keeps the run's data source and changes its "
                        "keys, such as data.path=OTHER")
    unknown = [key for key in cfg.data if key not in train_cfg.data]
    if unknown:
        raise UserError(f"data.{unknown[0]} is not a key of this run's data "
                        f"({train_cfg.data._target_.rsplit('.', 1)[-1]}): its keys are "
                        f"{', '.join(k for k in train_cfg.data if not k.startswith('_'))}")
    run_spec = spec_from_record(state["data"]) if "data" in state else \
        instantiate(train_cfg.data, seed=train_cfg.seed).spec  # a checkpoint of an older trainer
    train_cfg.data = OmegaConf.merge(train_cfg.data, cfg.data)
    tokenizer = run_spec.tokenizer
    if tokenizer is not None and tokenizer.name != "char":
        own = Path(cfg.run_dir) / "tokenizer.json"
        own.write_text(tokenizer.tokenizer.to_str(), encoding="utf-8")
        train_cfg.data.tokenizer = str(own)
    validate(train_cfg)
    other = instantiate(train_cfg.data, seed=train_cfg.seed)
    return train_cfg, matched(other, run_spec, OmegaConf.to_container(cfg.data))


def generate_job(cfg: DictConfig) -> None:
    """Sample text from a run's checkpoint, writing it to stdout as it comes."""
    import torch

    from trainer.tasks.language_model import sample

    for key, ok, accepted in (("length", cfg.length >= 1, ">= 1"),
                              ("temperature", cfg.temperature > 0, "> 0"),
                              ("top_k", cfg.top_k is None or cfg.top_k >= 1, ">= 1 or null")):
        if not ok:
            raise UserError(f"{key}={cfg[key]} is out of range: it must be {accepted}")
    run = _language_model_of(cfg)
    tokenizer = run.task.tokenizer
    ids = _default_prompt(run.cfg) if cfg.prompt is None else tokenizer.encode(cfg.prompt)
    if not ids:
        raise UserError("prompt='' gives no tokens: give some text, or leave prompt out")
    prompt = torch.tensor(ids, device=run.device)
    shown = tokenizer.decode(ids)
    sys.stdout.write(shown)
    for token in sample(run.model, prompt, cfg.length, cfg.seed, cfg.temperature,
                        top_k=cfg.top_k):
        ids.append(int(token))
        text = tokenizer.decode(ids)
        # A byte-level token may end inside a character: wait until it is whole.
        if text.startswith(shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(ids)[len(shown):] + "\n")


def _language_model_of(cfg: DictConfig) -> Restored:
    """A run's language model, its checkpoint's weights loaded."""
    from trainer.tasks.language_model import LanguageModel

    run = restored_model(cfg)
    if not isinstance(run.task, LanguageModel):
        model = run.cfg.model._target_.rsplit(".", 1)[-1]
        raise UserError(f"{cfg.run_dir} trained a {model} on images: generate needs a language "
                        "model (model=transformer or model=rnn on text data)")
    return run


def _default_prompt(train_cfg: DictConfig) -> list[int]:
    """The start of the run's validation text, as in the samples in TensorBoard: the one thing
    generate reads the run's data for."""
    import torch

    from trainer.targets import instantiate

    try:
        data = instantiate(train_cfg.data, seed=train_cfg.seed)
    except UserError as error:
        raise UserError(f"give prompt=TEXT: without one, generate starts from the run's "
                        f"validation text, and its data cannot be read here ({error})") from None
    return data.val.batch(torch.zeros(1, dtype=torch.long))[0][0, :16].tolist()


def saved_run(cfg: DictConfig, check_only: bool = False
              ) -> tuple[Path, dict[str, Any], DictConfig]:
    """The checkpoint cfg.run_dir/checkpoints/<cfg.checkpoint>.pt, its state, and the training
    config saved in it (checked: config.saved_config), moved to cfg.device when one is given.
    `check_only`: its tensors mapped rather than read, for a look before the command runs."""
    from trainer import checkpoint

    path = Path(cfg.run_dir) / "checkpoints" / f"{cfg.checkpoint}.pt"
    if not path.is_file() and path.parent.is_dir():
        names = sorted(p.stem for p in path.parent.glob("*.pt"))
        raise UserError(f"checkpoint={cfg.checkpoint}: {path} does not exist; this run has "
                        f"{', '.join(names) or 'no checkpoints'}")
    state = checkpoint.load(path, mmap=check_only)
    train_cfg = saved_config(state["config"], path)
    if cfg.device and cfg.device not in DEVICE_TYPES:
        raise UserError(f"device={cfg.device!r} is not accepted: choose one of "
                        f"{', '.join(DEVICE_TYPES)} (null: the run's own)")
    if cfg.device:
        train_cfg.device.type = cfg.device
        train_cfg.device.sync_batchnorm = False  # one process: nothing to synchronise
    return path, state, train_cfg


def restored_run(cfg: DictConfig) -> Any:
    """The Setup of a finished run, its data read and its checkpoint's weights loaded (for a
    checkpoint of an older trainer, which records no data spec; else see restored_model)."""
    from trainer import checkpoint
    from trainer.run.loop import build

    path, state, train_cfg = saved_run(cfg)
    with weights_from_checkpoint():
        s = build(train_cfg)
    with checkpoint.reported_as_mismatch(path):
        s.model.load_state_dict(state["model"])
    return s


@dataclass
class Restored:
    """A finished run's model with its checkpoint's weights, and what it needs to be used."""

    cfg: DictConfig  # the run's training config
    task: Any
    model: Any
    spec: Any  # DataSpec: what the model's inputs and outputs mean
    rt: Any  # the Runtime: device, precision

    @property
    def device(self) -> Any:
        return self.rt.device


def restored_model(cfg: DictConfig) -> Restored:
    """A finished run's model, sized by the data spec its checkpoint records: no data is read,
    so predict, generate, export and FID's classifier work where the training data is not
    (another machine), and start at once on a run of many images (which would all be decoded
    otherwise)."""
    from trainer import checkpoint
    from trainer.data import spec_from_record
    from trainer.distributed import runtime
    from trainer.run.loop import build_model

    path, state, train_cfg = saved_run(cfg)
    if "data" not in state:  # a checkpoint of an older trainer: its data says what it meant
        s = restored_run(cfg)
        return Restored(train_cfg, s.task, s.model, s.data.spec, s.rt)
    validate(train_cfg)
    rt = runtime(train_cfg.device)
    spec = spec_from_record(state["data"])
    with weights_from_checkpoint():
        task, model = build_model(train_cfg, spec, rt)
    with checkpoint.reported_as_mismatch(path):
        model.load_state_dict(state["model"])
    return Restored(train_cfg, task, model, spec, rt)


def output_folder(outputs: str | None, default: Path) -> Path:
    """The folder `outputs=` names (else `default`): it may exist, but as a folder."""
    folder = Path(outputs) if outputs else default
    if folder.exists() and not folder.is_dir():
        raise UserError(f"outputs={str(folder)!r} is a file: give a folder to write into")
    return folder


def predict_job(cfg: DictConfig) -> None:
    """What a run makes of new inputs: a classifier's labels (CSV), an autoencoder's
    reconstructions, a GAN's samples (PNGs and a grid)."""
    from trainer.tasks.adversarial import Adversarial
    from trainer.tasks.classification import Classification
    from trainer.tasks.reconstruction import Reconstruction
    from trainer.use import predict

    for key, minimum in (("top_k", 1), ("count", 1)):
        if cfg[key] < minimum:
            raise UserError(f"{key}={cfg[key]} is out of range: it must be >= {minimum}")
    run = restored_model(cfg)
    spec, device = run.spec, run.device
    if isinstance(run.task, Adversarial):
        folder = output_folder(cfg.outputs, Path("predictions"))
        predict.write_samples(run.model, cfg.count, cfg.seed, folder, device)
        log.info("wrote %d samples and grid.png to %s", cfg.count, folder)
        return
    if not isinstance(run.task, Classification | Reconstruction):
        raise UserError(f"{cfg.run_dir} is a language model: use generate run_dir=... "
                        "prompt=... for text")
    if cfg.inputs is None:
        raise UserError("inputs=PATH is required: an image, a folder of images or a .txt list")
    paths = predict.input_images(cfg.inputs)
    if isinstance(run.task, Reconstruction):
        folder = output_folder(cfg.outputs, Path("predictions"))
        predict.write_reconstructions(run.model, spec.in_shape, paths, folder, device)
        log.info("wrote %d reconstructions and grid.png to %s", len(paths), folder)
        return
    with predict.csv_destination(cfg.outputs) as out:
        predict.write_predictions(run.model, spec.classes, spec.in_shape, paths, cfg.top_k, out,
                                  device)
    log.info("labelled %d images%s", len(paths), f" into {cfg.outputs}" if cfg.outputs else "")


def export_job(cfg: DictConfig) -> dict[str, Any]:
    """The run's model in cfg.format, checked against PyTorch on test inputs, in cfg.outputs
    (default RUN/export); its export.json entry printed as JSON (the last line of stdout)."""
    from trainer.use.export import export

    if cfg.count < 3:
        raise UserError(f"count={cfg.count} is out of range: it must be >= 3 (test inputs to "
                        "check the export on: more than the 2 it is traced with)")
    folder = output_folder(cfg.outputs, Path(cfg.run_dir) / "export")
    s, checked_on = _exportable(cfg)
    entry = export(s, cfg.format, folder, cfg.count, checked_on)
    checked = f"{entry['inputs_checked']} {checked_on}"
    if "top1_agreement" in entry:
        found = (f"its top predictions match PyTorch's {entry['top1_agreement']:.1%} of the "
                 f"time on {checked}")
    else:
        found = f"outputs equal PyTorch's within {entry['max_abs_diff']:.2g} on {checked}"
    if "float_bytes" in entry:
        found += (f"; int8 weights, {entry['bytes'] / entry['float_bytes']:.2f}x the float "
                  f"model's {entry['float_bytes'] / 1e6:.2g} MB")
    log.info("exported %s: %s", folder / entry["file"], found)
    print(json.dumps(entry))
    return entry


def _adapters_merged(run: Restored) -> Restored:
    """A LoRA run's model as the plain one it serves as (peft's merge_and_unload): each adapter's
    change added into its layer's weight, so the export runs no extra matrix products."""
    from trainer.models.lora import merged
    from trainer.run.loop import build_model

    rank = run.cfg.model.get("lora_rank")
    if not rank:
        return run
    plain_cfg = OmegaConf.create(OmegaConf.to_container(run.cfg))
    plain_cfg.model.lora_rank = 0
    task, model = build_model(plain_cfg, run.spec, run.rt)
    model.load_state_dict(merged(run.model.state_dict(), run.cfg.model.lora_alpha / rank))
    log.info("model.lora_rank=%d: the adapters are merged into the weights they adapt; the "
             "export is a plain transformer", rank)
    return Restored(plain_cfg, task, model, run.spec, run.rt)


def _exportable(cfg: DictConfig) -> tuple[Any, str]:
    """The run's Setup for export, and what its checks run on: the test split of the run's data,
    or, where that cannot be read here, random inputs of its shape."""
    from trainer.data import DataModule
    from trainer.run.state import Setup
    from trainer.targets import instantiate
    from trainer.use.export import RandomInputs

    run = _adapters_merged(restored_model(cfg))
    try:
        data = instantiate(run.cfg.data, seed=run.cfg.seed)
    except UserError as error:
        log.warning("the run's data cannot be read here (%s): the export is checked on random "
                    "inputs of its shape instead of test inputs", error)
        inputs = RandomInputs(run.spec, cfg.count, run.rt.device)
        return Setup(run.cfg, run.rt, DataModule(run.spec, inputs, inputs, inputs, 1), run.task,
                     run.model), "random inputs"
    return Setup(run.cfg, run.rt, data.to(run.rt.device), run.task, run.model), "test inputs"
