"""Structured-config schemas and the checks that run before any work starts.

The schemas below type the fixed groups (device, trainer), the top level and the commands over a
finished run, so a misspelt key or a wrong type fails while Hydra composes. The groups that build
objects (model, data, optimizer, scheduler, logger) are checked against the signature of their
`_target_` instead (targets.py): the constructor is the single source of truth for the keys it
accepts, so no dataclass repeats it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import UserError
from trainer.targets import SUPPLIED_BY_CODE, check_saved_target, check_target_node, target_nodes

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


def saved_config(saved: Any, source: Path | str, trusted: Collection[str] = ()) -> DictConfig:
    """A run's config as a checkpoint (`source`) holds it, checked before anything is built from
    it, with the keys this trainer added since (such as trainer.profile) at their defaults, so a
    run saved by an older trainer resumes and is used as it was.

    What comes from a file is data, never code: plain values only (no tensor, no interpolation),
    a `_target_` only where the schema has one, on the allow-list (targets.check_saved_target;
    `trusted`: the targets this command's own config names), every key one its target or schema
    takes and every value of its type. Else one UserError naming the key and the value."""
    try:
        if not isinstance(saved, dict):
            raise UserError(f"it holds {type(saved).__name__}, not a mapping of config keys")
        missing = [group for group in SUPPLIED_BY_CODE if group not in saved]
        if missing:
            raise UserError(f"{missing[0]} is missing: the run's config names what it builds")
        _check_plain(saved, "", _build_roots(saved))
        try:  # the schema types the top level, device and trainer
            OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
        except OmegaConfBaseException as error:  # "Value 'x' of type 'str' could not be ..."
            key = f"{error.full_key}: " if getattr(error, "full_key", None) else ""
            raise UserError(f"{key}{str(error).splitlines()[0]}") from None
        defaults = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
        cfg = OmegaConf.merge(defaults, saved)
        for group, where, node in target_nodes(cfg):
            check_saved_target(node, group, where, trusted)
    except UserError as error:
        raise UserError(f"the config saved in {source} is refused, nothing was built: "
                        f"{error}") from None
    return cfg


# The keys that make Hydra build something, allowed only at the root of a group that builds.
BUILD_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")


def _build_roots(saved: Any) -> set[str]:
    """Where a saved config may hold a `_target_`: each group that builds an object, and each of
    several loggers."""
    roots = set(SUPPLIED_BY_CODE)
    logger = saved.get("logger") if isinstance(saved, dict) else None
    if isinstance(logger, dict) and "_target_" not in logger:
        roots |= {f"logger.{name}" for name in logger}
    return roots


def _check_plain(value: Any, key: str, roots: set[str]) -> None:
    """Mappings with text keys, lists, text, numbers, booleans and nulls: what a config saved
    with its interpolations resolved holds. Hydra's keys (`_target_`, `_args_`, ...) only at a
    root, where the schema has them; text without `${`, which OmegaConf would resolve."""
    if isinstance(value, dict):
        for name, item in value.items():
            where = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                raise UserError(f"{where}: a key {name!r} that is not text")
            special = len(name) > 2 and name.startswith("_") and name.endswith("_")
            if special and (name not in BUILD_KEYS or key not in roots):
                raise UserError(f"{where}={item!r}: the run's config has no {name} there (a "
                                "node that would build an object)")
            if name == "_target_" and not isinstance(item, str):
                raise UserError(f"{where}={item!r} has the wrong type: expected str")
            _check_plain(item, where, roots)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]", roots)
    elif isinstance(value, str) and "${" in value:
        raise UserError(f"{key}={value!r}: an interpolation, which a saved config never holds")
    elif not isinstance(value, str | int | float | bool | None):
        shown = f"a {type(value).__module__}.{type(value).__qualname__}"
        raise UserError(f"{key or 'config'} holds {shown}, not a config value (text, a number, "
                        "a list or a mapping)")


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
    for group, where, node in target_nodes(cfg):  # one node per chosen logger
        check_target_node(node, group, where)
