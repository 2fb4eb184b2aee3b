"""Paper tables as data: ``configs/tables/<table_id>.yaml``, every cell filled by a preset or
explained.

A table file holds:

- ``title``, ``source``: what the table is and where it is published;
- ``metric``: the ``metrics.json`` key of its numbers; ``display``: ``accuracy`` (the default)
  or ``error`` when the paper prints 100 − accuracy (the presets' ``expected`` are accuracies
  either way);
- ``rows``, ``columns``: the labels in the paper's order;
- ``shared``: ``{row, column, preset}`` for cells whose run is a preset of another table (the
  same recipe and number, e.g. a baseline that two tables quote);
- ``missing``: ``{row, column, reason}`` (optionally ``expected``, the paper's number) for cells
  without a preset;
- ``notes``, and ``measured`` (how skd itself measured the expected numbers, for the demo table).

A preset places itself with ``reference.table_id``, ``row`` and ``column`` (``skd.presets``).
Every cell must be covered exactly once: by such a preset, a ``shared`` entry or a ``missing``
entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from skd.config import load_yaml
from skd.errors import ConfigError
from skd.presets import CONFIGS_DIR, Preset, get_preset, list_presets

__all__ = ["TABLES_DIR", "Cell", "Table", "load_table", "list_tables", "metric_label"]

TABLES_DIR = CONFIGS_DIR / "tables"

_KEYS = {"title", "source", "metric", "display", "rows", "columns", "shared", "missing", "notes", "measured"}
_REQUIRED = ("title", "source", "metric", "rows", "columns")
_METRIC_NAMES = {"top1": "top-1", "top5": "top-5", "nll": "NLL", "ece": "ECE (%)", "aurc": "AURC (×1000)",
                 "eaurc": "E-AURC (×1000)"}


def metric_label(metric: str, display: str = "accuracy") -> str:
    """``top-1 error (%)``, ``top-1 accuracy (%)``, ``ECE (%)``, ..."""
    if metric in ("top1", "top5"):
        return f"{_METRIC_NAMES[metric]} {'error' if display == 'error' else 'accuracy'} (%)"
    return _METRIC_NAMES.get(metric, metric)


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    preset: Preset | None
    """The preset that runs this cell (None for a missing cell)."""
    shared: bool
    """The preset's home is another table."""
    reason: str | None
    """Why the cell has no preset."""
    expected: float | None
    """The paper's number in the table's metric (accuracy for top1/top5), if any."""
    expected_std: float | None


@dataclass(frozen=True)
class Table:
    table_id: str
    path: Path
    title: str
    source: str
    metric: str
    display: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    shared: tuple[dict[str, Any], ...]
    missing: tuple[dict[str, Any], ...]
    notes: str

    def coverage_problems(self) -> list[str]:
        """Every way the table's cells fail to be covered exactly once (empty when all is well)."""
        problems, cover = [], {}

        def place(row: Any, column: Any, what: str) -> None:
            if row not in self.rows or column not in self.columns:
                problems.append(f"{what} names row {row!r}, column {column!r}, which is not a cell of the table")
                return
            if (row, column) in cover:
                problems.append(f"cell ({row}, {column}) is covered twice: by {cover[row, column]} and by {what}")
            cover[row, column] = what

        for preset in list_presets(self.table_id):
            place(preset.row, preset.column, f"preset {preset.name}")
            if preset.metric != self.metric:
                problems.append(f"preset {preset.name} has metric {preset.metric!r}, the table {self.metric!r}")
        for entry in self.shared:
            try:
                preset = get_preset(str(entry.get("preset")))
            except ConfigError as e:
                problems.append(f"shared cell ({entry.get('row')}, {entry.get('column')}): {e}")
                continue
            place(entry.get("row"), entry.get("column"), f"shared preset {preset.name}")
        for entry in self.missing:
            if not str(entry.get("reason", "")).strip():
                problems.append(f"missing cell ({entry.get('row')}, {entry.get('column')}) gives no reason")
            place(entry.get("row"), entry.get("column"), "a missing entry")
        problems += [f"cell ({r}, {c}) has neither a preset nor a stated reason"
                     for r in self.rows for c in self.columns if (r, c) not in cover]
        return problems

    def cells(self) -> list[Cell]:
        """Every cell, row by row in the paper's order; a table whose cells are not each covered
        exactly once is a ``ConfigError`` naming the problems."""
        problems = self.coverage_problems()
        if problems:
            raise ConfigError(f"table {self.path}: " + "; ".join(problems))
        found: dict[tuple[str, str], Cell] = {}
        for preset in list_presets(self.table_id):
            found[preset.row, preset.column] = _preset_cell(preset.row, preset.column, preset, self.metric, False)
        for entry in self.shared:
            preset = get_preset(entry["preset"])
            found[entry["row"], entry["column"]] = _preset_cell(entry["row"], entry["column"], preset, self.metric, True)
        for entry in self.missing:
            found[entry["row"], entry["column"]] = Cell(entry["row"], entry["column"], None, False, entry["reason"],
                                                        entry.get("expected"), entry.get("expected_std"))
        return [found[r, c] for r in self.rows for c in self.columns]


def _preset_cell(row: str, column: str, preset: Preset, metric: str, shared: bool) -> Cell:
    return Cell(row, column, preset, shared, None, preset.expected_value(metric),
                preset.expected_std if metric == preset.metric else None)


def _labels(raw: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    labels = raw[key]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ConfigError(f"table {path}: '{key}' must be a non-empty list of labels")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"table {path}: '{key}' lists a label twice")
    return tuple(labels)


def _entries(raw: dict[str, Any], key: str, path: Path, needs: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    entries = raw.get(key) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(needs) <= set(e) for e in entries):
        raise ConfigError(f"table {path}: '{key}' must be a list of mappings with {', '.join(needs)}")
    return tuple(entries)


@lru_cache(maxsize=None)
def _load(path: Path) -> Table:
    raw = load_yaml(path)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"table {path}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(_KEYS))})")
    absent = [k for k in _REQUIRED if k not in raw]
    if absent:
        raise ConfigError(f"table {path}: missing key(s) {', '.join(absent)}")
    display = raw.get("display", "accuracy")
    if display not in ("accuracy", "error"):
        raise ConfigError(f"table {path}: display = {display!r}: must be 'accuracy' or 'error'")
    return Table(path.stem, path, str(raw["title"]), str(raw["source"]), str(raw["metric"]), display,
                 _labels(raw, "rows", path), _labels(raw, "columns", path),
                 _entries(raw, "shared", path, ("row", "column", "preset")),
                 _entries(raw, "missing", path, ("row", "column", "reason")), str(raw.get("notes", "")))


def load_table(table_id: str) -> Table:
    """The table ``configs/tables/<table_id>.yaml``."""
    path = TABLES_DIR / f"{table_id}.yaml"
    if not path.is_file():
        known = ", ".join(t.table_id for t in list_tables()) or "none"
        raise ConfigError(f"no table {table_id!r} ({path} does not exist; tables: {known})")
    return _load(path)


def list_tables() -> list[Table]:
    """Every table of ``configs/tables/``, sorted by id."""
    return [_load(p) for p in sorted(TABLES_DIR.glob("*.yaml"))]
