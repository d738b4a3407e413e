"""The config groups that build an object from a `_target_` node (model, data, optimizer,
scheduler, logger): their keys and values checked against the target's signature before any work
starts, and the object built with errors a user can act on."""

from __future__ import annotations

import importlib.util
import inspect
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
