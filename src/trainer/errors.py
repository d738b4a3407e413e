"""The one exception type for mistakes a user can fix: printed as one line, no traceback."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input: an unknown value, a missing file, an incompatible choice, a diverged run.

    The message names the bad value and what is accepted instead.
    """


def listed(items: Iterable[object], most: int = 8) -> str:
    """Items for a one-line message: the first `most` of them, then how many more."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


# How torch reports a failed allocation: OutOfMemoryError on a GPU (its message gives the size
# with a unit), a RuntimeError from the CPU's allocator (the size in bytes).
_TRIED = re.compile(r"[Tt]ried to allocate ([\d.]+) ?(bytes|[KMGTP]i?B)")
_CAPACITY = re.compile(r"total capacity of ([\d.]+ ?[KMGTP]i?B)")


def allocation_failure(error: BaseException | None) -> str | None:
    """What could not be allocated, when `error` or an error it was raised from is a device
    running out of memory ("GPU 0 could not allocate 2 GiB more (of 79.15 GiB)"); None for
    any other error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and not isinstance(error, UserError):
        seen.add(id(error))
        device = _out_of_memory_device(error)
        if device:
            text = str(error)
            tried, capacity = _TRIED.search(text), _CAPACITY.search(text)
            size = "more memory" if tried is None else \
                f"{_size(float(tried.group(1)), tried.group(2))} more"
            return (f"{device} could not allocate {size}"
                    + (f" (of {capacity.group(1)})" if capacity else ""))
        error = error.__cause__ or error.__context__
    return None


def _out_of_memory_device(error: BaseException) -> str | None:
    text = str(error)
    if "DefaultCPUAllocator" in text and "allocate memory" in text:
        return "this machine"
    if type(error).__name__ != "OutOfMemoryError" and "MPS backend out of memory" not in text:
        return None
    gpu = re.search(r"GPU (\d+)", text)
    return f"GPU {gpu.group(1)}" if gpu else "the MPS device" if "MPS" in text else "the device"


def _size(amount: float, unit: str) -> str:
    if unit != "bytes":
        return f"{amount:g} {unit}"
    units = ((5, "PB"), (4, "TB"), (3, "GB"), (2, "MB"), (1, "kB"), (0, "bytes"))
    power, name = next((p, n) for p, n in units if amount >= 1000**p or p == 0)
    return f"{amount / 1000**power:.3g} {name}"


@contextmanager
def out_of_memory_explained(advice: Callable[[], str]) -> Iterator[None]:
    """Running out of memory inside the block as one UserError: what could not be allocated,
    then `advice()`: what to change."""
    try:
        yield
    except Exception as error:
        failure = allocation_failure(error)
        if failure is None:
            raise
        raise UserError(f"out of memory: {failure}; {advice()}") from error
