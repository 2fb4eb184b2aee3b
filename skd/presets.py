"""The presets in ``configs/``: one YAML per cell of a paper's table, and ``skd presets``, which
lists them.

A preset is a complete training config plus a ``reference:`` section saying which number of
which paper it should reproduce. The structured fields of ``reference`` place it in a table of
``configs/tables/`` (``skd.tables``):

- ``table_id``, ``row``, ``column``: the table and the cell;
- ``metric`` (a ``metrics.json`` key: ``top1``, ``top5``, ``nll``, ``ece``, ``aurc``, ``eaurc``)
  and ``expected``: the paper's number in the unit of that key (top-1 *accuracy* in %, also where
  the paper prints the error); ``expected_std``: the paper's ± where it publishes one;
- ``compare``: which evaluation of a run the paper's number corresponds to: ``best`` (the best
  epoch on the validation set, as CS-KD, PS-KD and TF-KD select), ``last`` (the final epoch, as
  RepDistiller, ICKD and cls_KD report) or ``ema`` (the final epoch's EMA weights);
- ``dataset``: which data the preset trains on (``cifar100``, ``imagenet``, ...), for
  ``skd sweep --data NAME=DIR``.

Free-form fields (``source``, ``table``, ``notes``, ``expected_other``, ...) stay beside them.
Reading presets parses YAML only (no model is built), so listing them is quick.
"""
from __future__ import annotations

import argparse
import fnmatch
import numbers
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from skd.columns import align_columns
from skd.config import load_yaml
from skd.errors import ConfigError, MissingFileError, run_command

__all__ = ["CONFIGS_DIR", "COMPARE_CHOICES", "Preset", "list_presets", "get_preset", "find_presets",
           "format_presets", "main"]

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The presets of a source checkout (skd is installed from one with ``pip install -e``)."""

COMPARE_CHOICES = ("best", "last", "ema")
"""``reference.compare``: the best epoch, the last epoch, or the last epoch's EMA weights."""

_NOT_PRESETS = ("demo.yaml", "tables")
"""``configs/demo.yaml`` is the embedded demo; ``configs/tables/`` holds the table files."""


@dataclass(frozen=True)
class Preset:
    name: str
    """Path below ``configs/`` without ``.yaml``, e.g. ``cifar100/preact_resnet18_pskd``."""
    path: Path
    reference: dict[str, Any]

    @property
    def table_id(self) -> str | None:
        return self.reference.get("table_id")

    @property
    def row(self) -> str | None:
        return self.reference.get("row")

    @property
    def column(self) -> str | None:
        return self.reference.get("column")

    @property
    def metric(self) -> str:
        return self.reference.get("metric", "top1")

    @property
    def expected(self) -> float | None:
        return self.reference.get("expected")

    @property
    def expected_std(self) -> float | None:
        return self.reference.get("expected_std")

    @property
    def compare(self) -> str:
        return self.reference.get("compare", "last")

    @property
    def dataset(self) -> str | None:
        return self.reference.get("dataset")

    def expected_value(self, metric: str) -> float | None:
        """The paper's number for ``metric``: ``expected`` for the preset's own metric, else
        ``expected_other[metric]`` where the paper reports it (PS-KD's calibration columns)."""
        if metric == self.metric:
            return self.expected
        return (self.reference.get("expected_other") or {}).get(metric)


def _read(path: Path) -> Preset:
    raw = load_yaml(path)
    reference = raw.get("reference")
    if not isinstance(reference, dict):
        raise ConfigError(f"preset {path} has no reference: section")
    compare = reference.get("compare", "last")
    if compare not in COMPARE_CHOICES:
        raise ConfigError(f"preset {path}: reference.compare = {compare!r}: must be one of "
                          f"{', '.join(COMPARE_CHOICES)}")
    for key in ("expected", "expected_std"):
        if reference.get(key) is not None and not isinstance(reference[key], numbers.Real):
            raise ConfigError(f"preset {path}: reference.{key} = {reference[key]!r}: must be a number")
    name = path.relative_to(CONFIGS_DIR).with_suffix("").as_posix() if path.is_relative_to(CONFIGS_DIR) \
        else path.stem
    return Preset(name, path, reference)


@lru_cache(maxsize=None)
def _all_presets() -> tuple[Preset, ...]:
    if not CONFIGS_DIR.is_dir():
        raise MissingFileError(f"no presets: {CONFIGS_DIR} does not exist (the presets live in the configs/ "
                               f"folder of skd's source checkout; install skd from it with pip install -e)")
    paths = sorted(p for p in CONFIGS_DIR.rglob("*.yaml")
                   if p.relative_to(CONFIGS_DIR).parts[0] not in _NOT_PRESETS)
    return tuple(_read(p) for p in paths)


def list_presets(table_id: str | None = None) -> list[Preset]:
    """Every preset under ``configs/`` (sorted by name), or those whose home is ``table_id``."""
    return [p for p in _all_presets() if table_id is None or p.table_id == table_id]


def get_preset(name: str) -> Preset:
    """A preset by name (``cifar100/preact_resnet18_pskd``, with or without ``.yaml``, or
    ``configs/...``) or by the path of any preset-like YAML file."""
    key = name.removesuffix(".yaml").removeprefix("configs/")
    for preset in _all_presets():
        if preset.name == key:
            return preset
    path = Path(name)
    if path.suffix == ".yaml" and path.is_file():
        return _read(path.resolve())
    raise ConfigError(f"no preset {name!r} (see `skd presets`; a file path must end in .yaml)")


def find_presets(pattern: str) -> list[Preset]:
    """The presets whose name matches the shell pattern (``cifar100_repdistiller/teacher_*``), or
    the one preset ``pattern`` names."""
    if any(c in pattern for c in "*?["):
        key = pattern.removesuffix(".yaml").removeprefix("configs/")
        found = [p for p in _all_presets() if fnmatch.fnmatchcase(p.name, key)]
        if not found:
            raise ConfigError(f"no preset matches {pattern!r} (see `skd presets`)")
        return found
    return [get_preset(pattern)]


def _paper_number(preset: Preset) -> str:
    if preset.expected is None:
        return ""
    std = f" ± {preset.expected_std:.2f}" if preset.expected_std is not None else ""
    return f"{preset.metric} {preset.expected:.2f}{std} ({preset.compare})"


def format_presets(presets: list[Preset]) -> str:
    """One line per preset: name, table, row, column and the paper's number."""
    head = ("preset", "table", "row", "column", "paper")
    lines = [(p.name, p.table_id or "-", p.row or "-", p.column or "-", _paper_number(p)) for p in presets]
    return "\n".join(align_columns(head, lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skd presets", description="List the presets in configs/: each with its table, row, "
        "column and the paper's number (metric, value, ± where published, and which epoch it "
        "corresponds to). Try one in a minute on the built-in digits data before a full run: "
        "see docs/presets.md.")
    parser.add_argument("--table", metavar="TABLE_ID", help="only the presets of this table "
                        "(`skd sweep --list` lists the tables)")
    args = parser.parse_args(argv)

    def body() -> int:
        from skd.tables import list_tables, load_table

        # In each table's order (rows, then columns), tables by id; presets of no table last.
        tables = [load_table(args.table)] if args.table else list_tables()
        place = {(t.table_id, r, c): (i, j, k) for i, t in enumerate(tables)
                 for j, r in enumerate(t.rows) for k, c in enumerate(t.columns)}
        presets = sorted((p for p in list_presets() if not args.table or p.table_id == args.table),
                         key=lambda p: place.get((p.table_id, p.row, p.column), (len(tables), 0, 0)))
        print(format_presets(presets))
        print(f"{len(presets)} presets; train one with `skd train --config configs/PRESET.yaml "
              f"data.train=DIR data.val=DIR`")
        return 0

    return run_command("skd presets", body)
