"""The one exception type for mistakes a user can fix: printed as one line, no traceback."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input: an unknown value, a missing file, an incompatible choice, a diverged run.

    The message names the bad value and what is accepted instead.
    """


def listed(items: Iterable[object], most: int = 8) -> str:
    """Items for a one-line message: the first `most` of them, then how many more."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")
