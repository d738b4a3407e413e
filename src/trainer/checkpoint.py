"""Checkpoints: plain dicts of tensors and Python values, written atomically, read weights-only."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError


def save(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError as error:  # a full disk, a lost mount, no permission
        partial.unlink(missing_ok=True)
        kept = f"the previous {path.name} is kept" if path.is_file() else "nothing was replaced"
        raise UserError(f"could not write checkpoint {path} ({error.strerror or error}); "
                        f"{kept}: free space or fix the folder, then resume") from None


def keep_step_copy(last: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest last.pt as step-NNNNNN.pt beside it."""
    if not keep:
        return
    link_or_copy(last, last.with_name(f"step-{step:06d}.pt"))
    for old in sorted(last.parent.glob("step-*.pt"))[:-keep]:
        old.unlink()


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a copy of the checkpoint `source`: a hard link, no second write (a checkpoint
    is replaced by a rename, so the link keeps the old file), or, on a filesystem without hard
    links, a copy written as atomically as a checkpoint."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        partial = target.with_name(target.name + ".partial")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise UserError(f"could not write checkpoint {target} ({error.strerror or error}); "
                            f"{source.name} is kept: free space, then resume") from None


def resume_path(resume: str, name: str = "last") -> Path:
    """The checkpoint `resume=` (or `init_from=`, name "best") names: a run directory's
    <name>.pt, or a checkpoint file."""
    path = Path(resume)
    return path if path.is_file() else path / "checkpoints" / f"{name}.pt"


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give a run directory that holds "
                        "checkpoints/last.pt and best.pt")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise UserError(f"checkpoint {path} is corrupt or not a trainer checkpoint "
                        f"({first_line})") from None
    if not isinstance(state, dict) or not {"model", "config", "progress"} <= state.keys():
        raise UserError(f"checkpoint {path} is not a trainer checkpoint (it lacks model, config "
                        "and progress entries)")
    return state


@contextmanager
def reported_as_mismatch(path: Path, changed: Sequence[str] = ()) -> Iterator[None]:
    """Loading a state dict into a model of another shape: a UserError naming the checkpoint
    and the model keys `changed` from the checkpoint's, the likely cause."""
    try:
        yield
    except RuntimeError as error:
        cause = (f" ({', '.join(changed)} differs from the run's model: a resumed run keeps its "
                 "model's shape)" if changed else "")
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"checkpoint {path} does not match the configured model{cause}: "
                        f"{detail}") from None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: the CPU's, Python's, and its own GPU's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
