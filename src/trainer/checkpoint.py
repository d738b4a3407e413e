"""Checkpoints: plain dicts of tensors and Python values, written atomically, read weights-only."""

from __future__ import annotations

import logging
import os
import random
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError

log = logging.getLogger("trainer")


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


def resumable(resume: str, check_only: bool = False) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `resume=` names, and its state. A run directory whose last.pt cannot be
    read continues from its newest readable step-NNNNNN.pt (trainer.keep_last), with a warning
    saying which and why (none when `check_only`: tensors mapped, for a look before the run);
    a file named itself is not swapped. With none readable, the UserError names what the run
    has and the command that resumes from it, if one does."""
    path = resume_path(resume)
    try:
        return path, load(path, mmap=check_only)
    except UserError as error:
        failure = error
    copies = [] if Path(resume).is_file() else _newest_first(path.parent.glob("step-*.pt"))
    for copy in copies:
        state = _readable(copy, mmap=check_only)
        if state is not None:
            if not check_only:
                log.warning("%s; resuming from %s instead, the newest readable copy of "
                            "last.pt (step %s)", failure, copy.name, _step(state))
            return copy, state
    raise UserError(f"{failure}; {_other_checkpoints(path)}") from None


def _newest_first(paths: Iterable[Path]) -> list[Path]:
    """step-NNNNNN.pt (or best-step-NNNNNN.pt) by step, the newest first."""
    return sorted(paths, key=lambda p: int(p.stem.rsplit("-", 1)[1]) if
                  p.stem.rsplit("-", 1)[1].isdigit() else -1, reverse=True)


def _step(state: dict[str, Any]) -> Any:
    progress = state["progress"]
    return progress.get("step", "?") if isinstance(progress, dict) else "?"


def _readable(path: Path, mmap: bool = True) -> dict[str, Any] | None:
    try:
        return load(path, mmap=mmap)
    except UserError:
        return None


def _other_checkpoints(path: Path) -> str:
    """What else path's run holds, and the command that continues from the first readable: the
    newest step copy, last.pt, then the best validations' (which go back in the run)."""
    folder = path.parent
    candidates = [*_newest_first(folder.glob("step-*.pt")), folder / "last.pt",
                  *_newest_first(folder.glob("best-step-*.pt")), folder / "best.pt"]
    for candidate in candidates:
        if candidate != path and candidate.is_file():
            state = _readable(candidate)
            if state is not None:
                return (f"{candidate.name} is readable (step {_step(state)}): continue from "
                        f"it with train resume={candidate}")
    held = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
    return (f"no other checkpoint of this run can be read (it has {', '.join(held)})"
            if held else "the run has no other checkpoint")


def load(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state, read weights-only. `mmap`: its tensors mapped, not read (a check of
    its config costs nothing for a large model; a file truncated while mapped would crash)."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give a run directory that holds "
                        "checkpoints/last.pt and best.pt")
    try:
        state = torch.load(path, map_location=device, weights_only=True,
                           mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # torch raises many types for truncated or foreign files
        text = str(error).strip()  # its first sentence: torch goes on for several
        first_line = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
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
