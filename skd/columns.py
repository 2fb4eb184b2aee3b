"""Plain-text tables for the terminal: columns padded to their widest cell."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["align_columns"]


def align_columns(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The header and rows as lines, each column left-aligned to its widest cell, two spaces
    apart, without trailing blanks."""
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
