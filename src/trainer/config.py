"""Structured-config schemas and the checks that run before any work starts.

The schemas below type the fixed groups (device, trainer), the top level and the commands over a
finished run, so a misspelt key or a wrong type fails while Hydra composes. The groups that build
objects (model, data, optimizer, scheduler, logger) are checked against the signature of their
`_target_` instead: the constructor is the single source of truth for the keys it accepts, so no
dataclass repeats it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from trainer.errors import UserError

DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "32", "bf16", "16")  # auto: distributed.resolve_precision
AUGMENTATIONS = ("none", "crop", "flip_crop", "random_resized_crop")  # data/transforms.py


@dataclass
class DeviceConfig:
    type: str = "auto"
    count: int = 1
    nodes: int = 1
    precision: str = "auto"
    compile: bool = False
    channels_last: Any = "auto"  # auto, true or false: see distributed.memory_format
    strategy: str = "ddp"  # ddp, or fsdp: FSDP2 shards the model across the ranks
    sync_batchnorm: bool = False
    timeout_s: int = 600  # a collective that waits longer than this fails the run
    rdzv_endpoint: str | None = None  # host:port of the rendezvous for several nodes
    rdzv_id: str | None = None  # the same on every node of one job


@dataclass
class TrainerConfig:
    epochs: int = 20
    max_steps: int | None = None
    max_minutes: float | None = None  # training wall time, summed over resumes
    accumulate: int = 1
    grad_clip: float = 1.0
    log_every: int = 20
    val_every: int | None = None
    max_validations: int | None = 20  # epoch-end validations in a run, at most
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None  # also save last.pt every this many minutes
    keep_last: int = 0  # keep this many step-NNNNNN.pt copies of last.pt
    keep_best: int = 0  # keep the checkpoints of this many best validations (best-step-NNNNNN.pt)
    skip_nonfinite: int = 0  # skip up to this many steps with a non-finite gradient norm
    monitor: str | None = None
    patience: int = 0
    min_delta: float = 0.0  # early stopping: a smaller improvement does not count
    eval_batches: int | None = None
    progress: bool = True
    label_smoothing: float = 0.0  # classification: each target's share spread over the classes
    class_weights: str | None = None  # classification: balanced weighs rare classes up
    ema_decay: float | None = None  # validate and hand on an average of the weights
    ema_every: int = 1  # optimizer steps between updates of the average
    profile: int = 0  # record this many steps with torch.profiler (profile/ in the run)
    overfit_batches: int = 0  # train and validate on this many fixed batches (debugging)


@dataclass
class TrainConfig:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    resume: str | None = None
    optimized_metric: str | None = None
    lr_find: bool = False  # run the learning-rate range test instead of training
    init_from: str | None = None  # a run (its best.pt) or checkpoint to take weights from


# The commands over a finished run (configs/commands/): their YAML gives every value, the
# schema its type, so `top_k=abc` or `length=null` fails while Hydra composes.
@dataclass
class RunCommandConfig:
    run_dir: str = MISSING
    checkpoint: str = MISSING
    device: str | None = MISSING


@dataclass
class EvaluateConfig(RunCommandConfig):
    split: str = MISSING
    fid_features: str | None = MISSING
    data: Any = MISSING


@dataclass
class PredictConfig(RunCommandConfig):
    inputs: str | None = MISSING
    outputs: str | None = MISSING
    top_k: int = MISSING
    count: int = MISSING
    seed: int = MISSING


@dataclass
class GenerateConfig(RunCommandConfig):
    prompt: str | None = MISSING
    length: int = MISSING
    temperature: float = MISSING
    top_k: int | None = MISSING
    seed: int = MISSING


@dataclass
class ExportConfig(RunCommandConfig):
    format: str = MISSING
    outputs: str | None = MISSING
    count: int = MISSING


def saved_config(saved: dict[str, Any]) -> DictConfig:
    """A run's config as its checkpoint holds it, with the keys this trainer added since (such
    as trainer.profile) at their defaults, so a run saved by an older trainer resumes and is
    used as it was."""
    defaults = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    return OmegaConf.merge(defaults, saved)


def refuse_added_keys(cfg: DictConfig, where: str = "") -> None:
    """Hydra lets a key given with `+` past a schema: `+trainer.epoch=3` would be composed and
    then ignored. Such a key, where a schema (TrainConfig, TrainerConfig, ...) types the node, is
    refused as a misspelt one is."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return  # a group that builds an object: its _target_'s signature is checked instead
    known = [f.name for f in dataclasses.fields(schema)]
    for key in map(str, cfg):
        if key not in known:
            raise UserError(f"unknown key {where}{key}{did_you_mean(key, known, where)}; "
                            f"accepted: {', '.join(known)}")
        if not OmegaConf.is_missing(cfg, key) and isinstance(cfg[key], DictConfig):
            refuse_added_keys(cfg[key], f"{where}{key}.")


def did_you_mean(given: str, accepted: list[str], prefix: str, joiner: str = "") -> str:
    """' (did you mean PREFIX+JOINER+NAME?)' for the accepted name closest to `given`, or ''."""
    close = difflib.get_close_matches(given, accepted, n=1)
    return f" (did you mean {prefix}{joiner}{close[0]}?)" if close else ""


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, node in (("evaluate", EvaluateConfig), ("predict", PredictConfig),
                       ("generate", GenerateConfig), ("export", ExportConfig)):
        store.store(name=f"{name}_schema", node=node)


# Keys the code supplies when it builds each group's object; the config must not set them.
SUPPLIED_BY_CODE = {
    "model": {"in_shape", "num_classes", "vocab_size", "block_size"},
    "data": {"seed"},
    "optimizer": {"params"},
    "scheduler": {"optimizer", "total_steps"},
    "logger": {"run_dir", "purge_step"},
}

# (key, test, what is accepted); a key absent from the config is skipped.
RANGES: list[tuple[str, Any, str]] = [
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.block_size", lambda v: v >= 1, ">= 1"),
    ("data.image_size", lambda v: v >= 1, ">= 1"),
    ("data.vocab_size", lambda v: v >= 1, ">= 1"),
    ("data.shuffle_buffer", lambda v: v >= 1, ">= 1"),
    ("data.val_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
    ("data.test_fraction", lambda v: 0 < v < 1, "between 0 and 1"),
    ("model.width", lambda v: v >= 1, ">= 1"),
    ("model.depth", lambda v: v >= 1, ">= 1"),
    ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.heads", lambda v: v >= 1, ">= 1"),
    ("model.latent_dim", lambda v: v >= 1, ">= 1"),
    ("model.patch_size", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("model.denoise", lambda v: v >= 0, ">= 0 (0 turns the noise off)"),
    ("model.lora_rank", lambda v: v >= 0, ">= 0 (0: no adapters)"),
    ("model.lora_alpha", lambda v: v > 0, "> 0"),
    ("scheduler.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("scheduler.gamma", lambda v: v > 0, "> 0"),
    ("scheduler.step_size", lambda v: v >= 1, ">= 1"),
    ("scheduler.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.epochs", lambda v: v >= 1, ">= 1"),
    ("trainer.max_steps", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.max_minutes", lambda v: v is None or v > 0, "> 0 or null"),
    ("trainer.accumulate", lambda v: v >= 1, ">= 1"),
    ("trainer.grad_clip", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    ("trainer.log_every", lambda v: v >= 1, ">= 1"),
    ("trainer.val_every", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.checkpoint_every", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.checkpoint_minutes", lambda v: v is None or v > 0, "> 0 or null"),
    ("trainer.keep_last", lambda v: v >= 0, ">= 0"),
    ("trainer.keep_best", lambda v: v >= 0, ">= 0"),
    ("trainer.skip_nonfinite", lambda v: v >= 0, ">= 0"),
    ("trainer.patience", lambda v: v >= 0, ">= 0"),
    ("trainer.min_delta", lambda v: v >= 0, ">= 0"),
    ("trainer.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("trainer.ema_decay", lambda v: v is None or 0 < v < 1, "in (0, 1) or null"),
    ("trainer.ema_every", lambda v: v >= 1, ">= 1"),
    ("trainer.profile", lambda v: v >= 0, ">= 0 (0 turns profiling off)"),
    ("trainer.overfit_batches", lambda v: v >= 0, ">= 0 (0: all the data)"),
    ("trainer.max_validations", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("trainer.eval_batches", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("device.count", lambda v: v >= 1, ">= 1"),
    ("device.nodes", lambda v: v >= 1, ">= 1"),
    ("device.timeout_s", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v is None or v >= 0, ">= 0 (0 decodes in the main process) "
     "or null (one per core)"),
]
CHOICES = {"device.type": DEVICE_TYPES, "device.precision": PRECISIONS,
           "device.strategy": STRATEGIES}
# Keys that only some options have: checked where present.
OPTIONAL_CHOICES = {"device.channels_last": ("auto", "true", "false"),
                    "data.augment": AUGMENTATIONS, "data.in_memory": ("auto", "true", "false"),
                    "model.cell": ("lstm", "gru"), "model.pool": ("mean", "cls"),
                    "model.init": ("torch", "gpt2"), "trainer.class_weights": ("balanced",),
                    "logger.wandb.mode": ("auto", "online", "offline", "disabled")}


# Keys that may name a local file or folder (data.name: a Hugging Face set on disk).
PATH_KEYS = ("data.path", "data.root", "data.name", "model.weights", "init_from")


def absolute_paths(cfg: DictConfig) -> None:
    """Make the relative paths in cfg that exist absolute, so that the config a run saves finds
    its data from any working directory (evaluate, predict or resume run elsewhere). Names
    that are not paths here (a hub id, weights=DEFAULT, a root to download into) stay."""
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value and not Path(value).is_absolute() \
                and Path(value).exists():
            OmegaConf.update(cfg, key, str(Path(value).resolve()))


def validate(cfg: DictConfig) -> None:
    """Raise UserError for the first bad value in a composed train config. The `_target_`
    checks import the targets (and so torch) and come last: the rest answer at once."""
    for key, accepted in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if str(value) not in accepted:
            raise UserError(f"{key}={value!r} is not accepted: choose one of {', '.join(accepted)}")
    for key, accepted in OPTIONAL_CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        if value is not None and shown not in accepted:
            raise UserError(f"{key}={value!r} is not accepted: choose one of {', '.join(accepted)}")
    if cfg.device.nodes > 1 and not (cfg.device.rdzv_endpoint and cfg.device.rdzv_id):
        raise UserError(f"device.nodes={cfg.device.nodes} needs device.rdzv_endpoint=HOST:PORT "
                        "(a port on the first node) and device.rdzv_id=NAME, the same on every "
                        "node")
    sharded = cfg.device.strategy == "fsdp" and cfg.device.count * cfg.device.nodes > 1
    if sharded and str(cfg.device.channels_last).lower() == "true":
        raise UserError("device.channels_last=true cannot be used with device.strategy=fsdp "
                        "(FSDP2 shards contiguous parameters only): use auto or false")
    if sharded and cfg.trainer.get("ema_decay"):
        raise UserError(f"trainer.ema_decay={cfg.trainer.ema_decay} cannot be used with "
                        "device.strategy=fsdp (each rank holds a shard of the weights, not a "
                        "copy to average): use device.strategy=ddp or ema_decay=null")
    for key, test, accepted in RANGES:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and not test(value):  # not a number: the type checks below say so
            raise UserError(f"{key}={value} is out of range: it must be {accepted}")
    held_out = [OmegaConf.select(cfg, f"data.{k}_fraction", default=0) for k in ("val", "test")]
    if all(isinstance(f, int | float) for f in held_out) and sum(held_out) >= 1:
        raise UserError(f"data.val_fraction={held_out[0]} + data.test_fraction={held_out[1]} "
                        "leave no training data: together they must be below 1")
    for group in SUPPLIED_BY_CODE:
        if group == "logger" and "_target_" not in cfg.logger:  # one node per chosen logger
            for name, node in cfg.logger.items():
                check_target_node(node, "logger", f"logger.{name}")
        else:
            check_target_node(cfg[group], group)


def check_target_node(node: DictConfig, group: str, where: str | None = None) -> None:
    """Check a `_target_` node's keys and value types against its target's signature, and that
    the optional package it `requires` is installed. `where`: the node's key, if not `group`."""
    where = where or group
    target_name = node.get("_target_")
    if not target_name:
        raise UserError(f"{where} config has no _target_: name the class or function it builds")
    try:
        target = get_object(target_name)
    except Exception as error:  # Hydra wraps import failures of every kind
        raise UserError(f"{where}._target_={target_name!r} cannot be imported: {error}") from None
    extra = getattr(target, "requires", None)
    if extra and importlib.util.find_spec(extra) is None:
        raise UserError(f"{where} needs the {extra} package, an optional extra: pip install "
                        f"'trainer[{extra}]'")
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n in params if n not in SUPPLIED_BY_CODE[group] and n not in ("self", "args")]
    for key in node:
        key = str(key)
        if key in ("_target_", "_partial_", "_recursive_", "_convert_"):
            continue
        if key in SUPPLIED_BY_CODE[group] or (key not in params and not takes_any):
            raise UserError(
                f"unknown key {where}.{key} for {target_name}; accepted: {', '.join(accepted)}"
            )
        if OmegaConf.is_missing(node, key):
            raise UserError(f"{where}.{key} is required here and has no value: set "
                            f"{where}.{key}=...")
        if key in params:
            _check_type(f"{where}.{key}", node[key], params[key])


def _check_type(key: str, value: Any, param: inspect.Parameter) -> None:
    """A value must match the parameter's simple annotation (int, float, bool, str, or a union of
    them such as `bool | str`), or failing that the type of its default; an int passes for a
    float."""
    if value is None:
        if not _accepts_none(param):
            raise UserError(f"{key}=null is not accepted: it takes {_expected(param)}")
        return
    if isinstance(param.default, tuple):  # such as Adam's betas
        _check_sequence(key, value, param.default)
        return
    names = _simple_types(param)
    if not names:
        return
    if not any(isinstance(value, SIMPLE_TYPES[name]) and
               (not isinstance(value, bool) or name == "bool") for name in names):
        raise UserError(f"{key}={value!r} has the wrong type: expected {' or '.join(names)}")


def _accepts_none(param: inspect.Parameter) -> bool:
    annotation = param.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return param.default is None or "None" in text or "Optional" in text or text == "Any"


def _expected(param: inspect.Parameter) -> str:
    names = _simple_types(param)
    default = param.default
    if isinstance(default, tuple):
        return f"a list of {len(default)} values (default {list(default)})"
    what = " or ".join(names) if names else "a value"
    return what if default is inspect.Parameter.empty else f"{what} (default {default!r})"


def _check_sequence(key: str, value: Any, default: tuple) -> None:
    """A list of as many numbers as the default tuple holds (when it holds numbers)."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in default)
    if not isinstance(value, ListConfig | list | tuple) or len(value) != len(default) or (
            numbers and not all(isinstance(v, int | float) and not isinstance(v, bool)
                                for v in value)):
        shown = ",".join(str(v) for v in default)
        raise UserError(f"{key}={value!r} is not accepted: it takes a list of {len(default)} "
                        f"{'numbers' if numbers else 'values'}, such as {key}=[{shown}]")


def _simple_types(param: inspect.Parameter) -> list[str]:
    annotation = param.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    names = [name.strip() for name in text.split("|") if name.strip() != "None"]
    if names and all(name in SIMPLE_TYPES for name in names):
        return names
    # Otherwise go by the default (torch annotates lr as float | Tensor); any number for a number.
    default = {bool: "bool", int: "float", float: "float", str: "str"}.get(type(param.default))
    return [default] if default else []


SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "dict": (dict, DictConfig), "list": (list, ListConfig),
}


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra's instantiate, but a target's own UserError (or a ValueError about a value it cannot
    take) reaches the user as itself rather than wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise UserError(f"{node._target_} cannot be built: {cause}") from None
        raise


def call(partial: Any, *args: Any, **kwargs: Any) -> Any:
    """Finish a `_partial_: true` object (optimizer, scheduler); a ValueError from torch about a
    configured value (say, a negative momentum) becomes a UserError."""
    try:
        return partial(*args, **kwargs)
    except ValueError as error:
        raise UserError(f"{partial.func.__module__}.{partial.func.__name__} cannot be built: "
                        f"{error}") from None
