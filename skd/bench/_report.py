"""The results of ``python -m skd.bench gpu``: one JSON document and its Markdown rendering, both
rewritten after every measured row, so a run stopped at any point leaves what it had finished."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

JSON_NAME = "gpu_check.json"
MARKDOWN_NAME = "gpu_check.md"


class Report:
    """``{"meta": {...}, "stages": {name: {"status", "seconds", "reason"?, ...}}, "goals": [...]}``.

    A stage's status is ``running`` while it works (what a killed run leaves behind), then ``ok``,
    ``failed`` (a check failed), ``skipped`` (with the reason) or ``error`` (an exception, or
    ``interrupted``).

    ``render`` turns the document into Markdown; ``evaluate`` recomputes the goals from it. Both
    are given by the caller, so this class only keeps, writes and names things.
    """

    def __init__(self, out_dir: Path, meta: dict[str, Any],
                 render: Callable[[dict[str, Any]], str],
                 evaluate: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        self.out_dir = out_dir
        self.data: dict[str, Any] = {"meta": meta, "stages": {}, "goals": []}
        self._render = render
        self._evaluate = evaluate
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def json_path(self) -> Path:
        return self.out_dir / JSON_NAME

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / MARKDOWN_NAME

    def stage(self, name: str) -> dict[str, Any]:
        """A fresh record for stage ``name``, in the state ``running``."""
        record: dict[str, Any] = {"status": "running", "seconds": 0.0}
        self.data["stages"][name] = record
        return record

    def save(self) -> None:
        """Recompute the goals and rewrite both files (each through a rename: never half-written)."""
        self.data["goals"] = self._evaluate(self.data)
        _write_atomic(self.json_path, json.dumps(self.data, indent=1, default=_jsonable) + "\n")
        _write_atomic(self.markdown_path, self._render(self.data))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # a 0-dim tensor or NumPy scalar that slipped into a row
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; ``None`` cells print as ``-``."""
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str | None:
    """A number with ``digits`` decimals and thousands separators, or None."""
    return None if value is None else f"{value:,.{digits}f}"
