"""The config groups that build an object from a `_target_` node (model, data, optimizer,
scheduler, logger): their keys and values checked against the target's signature before any work
starts, and the object built with errors a user can act on."""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Collection, Iterator
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from trainer.errors import UserError

# Keys the code supplies when it builds each group's object; the config must not set them.
SUPPLIED_BY_CODE = {
    "model": {"in_shape", "num_classes", "vocab_size", "block_size"},
    "data": {"seed"},
    "optimizer": {"params"},
    "scheduler": {"optimizer", "total_steps"},
    "logger": {"run_dir", "purge_step"},
}


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


# What a `_target_` read from a file (a checkpoint, a run directory) may name, by group: the
# project's own builders and torch's optimizers and schedulers. A config typed on the command
# line names what it likes; packages listed in TRAINER_TRUSTED_TARGETS (comma-separated, such
# as a user's own models) are trusted from files too.
SAVED_TARGETS = {
    "model": ("trainer.models",),
    "data": ("trainer.data",),
    "optimizer": ("torch.optim",),
    "scheduler": ("trainer.optim", "torch.optim.lr_scheduler"),
    "logger": ("trainer.logging", "trainer.trackers"),
}
TRUSTED_ENV = "TRAINER_TRUSTED_TARGETS"


def target_nodes(cfg: DictConfig) -> Iterator[tuple[str, str, DictConfig]]:
    """(group, key, node) of each node of cfg that builds an object: model, data, optimizer,
    scheduler, and the logger or each of several."""
    for group in SUPPLIED_BY_CODE:
        node = cfg.get(group)
        if group == "logger" and isinstance(node, DictConfig) and "_target_" not in node:
            for name, child in node.items():
                yield group, f"logger.{name}", child
        else:
            yield group, group, node


def check_saved_target(node: Any, group: str, where: str, trusted: Collection[str] = ()) -> None:
    """A `_target_` node read from a file: its target on the allow-list (SAVED_TARGETS, or in
    `trusted`, the targets the command's own config names) and of the group's kind, checked
    before its module is imported; then its keys and types as check_target_node does, and every
    key the target requires present."""
    if not isinstance(node, DictConfig):
        raise UserError(f"{where}={node!r} is not accepted: the run's {group} config is a "
                        "mapping with a _target_")
    name = node.get("_target_")
    if name is None:
        raise UserError(f"{where}._target_ is missing: the run's {group} config names what it "
                        "builds")
    own = isinstance(name, str) and (name in trusted or
                                     _within(name, os.environ.get(TRUSTED_ENV, "").split(",")))
    if not own and not (_within(name, SAVED_TARGETS[group]) and _buildable(name, group)):
        accepted = ", ".join(f"{package}.*" for package in SAVED_TARGETS[group])
        raise UserError(f"{where}._target_={name!r} is not accepted from a saved run: it may "
                        f"build {accepted} (for targets of your own: {TRUSTED_ENV}=PACKAGE)")
    check_target_node(node, group, where)
    params = inspect.signature(get_object(name)).parameters.values()
    for param in params:
        required = param.default is inspect.Parameter.empty and param.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if required and param.name not in SUPPLIED_BY_CODE[group] | {"self"} \
                and param.name not in node:
            raise UserError(f"{where}.{param.name} is missing: {name} requires it")


def _within(name: Any, packages: Collection[str]) -> bool:
    """`name` is one of `packages` or inside one, by a path of public names."""
    if not isinstance(name, str) or any(part.startswith("_") for part in name.split(".")):
        return False
    return any(package and (name == package or name.startswith(package.rstrip(".") + "."))
               for package in packages)


def _buildable(name: str, group: str) -> bool:
    """What `name` imports as is defined in the group's packages (not merely reached through
    them, as trainer.models.cnn.torch.save would be) and builds what the group needs: a module,
    an optimizer, a scheduler, or something taking the keys the code supplies."""
    import torch

    try:
        target = get_object(name)
    except Exception:  # noqa: BLE001 - Hydra wraps import failures of every kind
        return False
    if not _within(getattr(target, "__module__", None), SAVED_TARGETS[group]):
        return False
    kind = {"model": torch.nn.Module, "optimizer": torch.optim.Optimizer,
            "scheduler": torch.optim.lr_scheduler.LRScheduler}.get(group)
    if inspect.isclass(target) and kind is not None:
        return issubclass(target, kind)
    if group in ("model", "optimizer") or not (inspect.isclass(target) or
                                               inspect.isfunction(target)):
        return False
    return SUPPLIED_BY_CODE[group] <= inspect.signature(target).parameters.keys()


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
