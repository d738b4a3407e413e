"""Rows of cells as columns of plain text: what a sweep's summary and a classifier's per-class
report print to the log and show in TensorBoard."""

from __future__ import annotations

from collections.abc import Collection


def aligned(rows: list[list[str]], right: Collection[int] = ()) -> str:
    """The columns padded to their widest cell: left-aligned, but those in `right` (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     .rstrip() for row in rows)
