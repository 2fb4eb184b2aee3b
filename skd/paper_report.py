"""``skd report DIR --paper``: finished runs laid out as their paper's table, beside the paper's
numbers.

Runs are placed by the ``reference`` their ``config.yaml`` carries (``table_id``, ``row``,
``column``: the preset's cell; a cell that another table shares shows them there too). Each cell
gives the paper's number (± where published), skd's mean ± sample standard deviation over the
runs (seeds) and their count n, the difference Δ = skd − paper, and a mark (⚠) where skd lies
outside the paper's ± or, without one, where the paper's number lies outside 2 standard
deviations of the runs. Numbers are in the table's unit (100 − accuracy where the paper prints
errors). Each run contributes the evaluation its preset's ``reference.compare`` names: the best
epoch (``metrics.json`` ``best``), the last epoch, or the last epoch's EMA weights.

Runs of one cell must be the same experiment (their configs may differ in the seed alone), or the
report stops: the cell would mix two experiments. Cells whose runs differ from the preset as it
is now (beyond seed, data folders and teacher file: e.g. ``epochs=1``) are marked ‡ with the keys.

A diverged run's NaN or infinite value gives the cell a NaN or infinite mean (NaN std), marked ⚠;
the figure leaves such cells out. A run folder reached twice (given twice, or inside another
folder given) counts once.

Writes ``paper.md`` (every table, its notes and figure), ``paper.csv`` (one line per cell, full
precision) and ``paper-<table_id>.png`` (skd against the paper per cell, error bars, y = x; the
legend below the axes as in ``skd report``'s figures).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from skd.config import config_to_dict, load_config, load_yaml
from skd.errors import SkdError
from skd.report import _digits, _figure, _legend_below, _mean, _std, format_number, report_folder
from skd.resume import config_differences
from skd.sweep.runs import SWEEP_FILE, Sweep
from skd.tables import Cell, Table, list_tables, metric_label

__all__ = ["PaperReportError", "CellResult", "find_runs", "metric_value", "paper_results", "format_paper_table",
           "write_csv", "paper_figure", "write_paper_report", "report_paper"]

_SAME_EXPERIMENT = ("seed",)
"""What may differ between the runs of one cell."""
_NOT_THE_RECIPE = ("seed", "data.train", "data.val", "method.teacher_checkpoint")
"""What may differ from the preset without changing the experiment: where the data and teacher live."""


class PaperReportError(SkdError, ValueError):
    """Runs that cannot be laid out as a paper's table (damaged files, mixed experiments)."""


@dataclass
class _Run:
    path: Path
    config: dict[str, Any] | None
    """The planned or trained config (None for a planned run that never started)."""
    metrics: dict[str, Any] | None
    """``metrics.json``; None while unfinished."""

    @property
    def key(self) -> tuple[Any, Any, Any]:
        ref = (self.config or {}).get("reference") or {}
        return ref.get("table_id"), ref.get("row"), ref.get("column")


@dataclass
class CellResult:
    table: Table
    cell: Cell
    metric: str
    values: list[float] = field(default_factory=list)
    """One value per finished run, in the metric's unit (accuracy for top1/top5)."""
    runs: list[Path] = field(default_factory=list)
    unfinished: int = 0
    differs: list[str] = field(default_factory=list)
    """``key=value`` where the runs differ from the preset as it is now."""

    def shown(self, value: float) -> float:
        """As the table prints it: 100 − accuracy for a table of errors."""
        return 100.0 - value if self.table.display == "error" and self.metric in ("top1", "top5") else value

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        """NaN or infinite when a run's value is (a diverged run)."""
        return self.shown(_mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n − 1) over the runs, NaN when a value is not finite; None
        below two runs."""
        return _std(self.values)

    @property
    def paper(self) -> float | None:
        """The paper's number for this metric (another metric than the table's: the preset's
        ``expected_other``), as the table prints it."""
        if self.metric == self.table.metric:
            expected = self.cell.expected
        else:
            expected = self.cell.preset.expected_value(self.metric) if self.cell.preset else None
        return None if expected is None else self.shown(expected)

    @property
    def paper_std(self) -> float | None:
        return self.cell.expected_std if self.metric == self.table.metric else None

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    @property
    def outside(self) -> bool | None:
        """skd outside the paper's ±, or (no ±) the paper outside 2 std of the runs; None when
        neither can be judged."""
        if self.delta is None:
            return None
        if not math.isfinite(self.delta):  # a diverged run: nowhere near the paper
            return True
        if self.paper_std is not None:
            return abs(self.delta) > self.paper_std
        return None if self.std is None else abs(self.delta) > 2 * self.std


def find_runs(paths: list[str | Path]) -> list[_Run]:
    """The runs under ``paths``: a sweep folder's planned runs, a run folder, or every run folder
    (one holding ``config.yaml``) below a folder. A run folder reached more than once (given twice,
    or inside another folder given) is one run, in the place it was first reached."""
    found: dict[Path, tuple[Path, dict[str, Any] | None]] = {}
    for path in map(Path, paths):
        if (path / SWEEP_FILE).is_file():
            sweep = Sweep.load(path)
            candidates = [(r.path(sweep.root), r.config) for r in sweep.runs]
        elif (path / "config.yaml").is_file():
            candidates = [(path, None)]
        elif path.is_dir():
            candidates = [(p.parent, None) for p in sorted(path.rglob("config.yaml"))]
        else:
            raise PaperReportError(f"{path} is not a run folder, a sweep folder or a folder of runs")
        for run_dir, planned in candidates:
            found.setdefault(run_dir.resolve(), (run_dir, planned))
    return [_read(run_dir, planned) for run_dir, planned in found.values()]


def _read(path: Path, planned: dict[str, Any] | None) -> _Run:
    config, metrics = planned, None
    try:
        if (path / "config.yaml").is_file():
            config = load_yaml(path / "config.yaml")
        if (path / "metrics.json").is_file():
            metrics = json.loads((path / "metrics.json").read_text())
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        raise PaperReportError(f"{path}: {e}") from None
    return _Run(path, config, metrics)


def metric_value(metrics: dict[str, Any], metric: str, compare: str, where: Path) -> float:
    """The run's ``metric`` of the evaluation ``compare`` names (best epoch, last epoch, EMA)."""
    source = metrics if compare == "last" else metrics.get(compare)
    if not isinstance(source, dict) or metric not in source:
        what = {"best": "the best epoch ('best')", "ema": "EMA weights ('ema')"}.get(compare, "")
        raise PaperReportError(f"{where / 'metrics.json'} has no {metric} of {what or 'the last epoch'}")
    return float(source[metric])


def _check_one_experiment(cell: Cell, runs: list[_Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        differences = config_differences(first.config, run.config, _SAME_EXPERIMENT)
        if differences:
            keys = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in differences[:4])
            raise PaperReportError(f"cell ({cell.row}, {cell.column}) would mix two experiments: {first.path} and "
                                   f"{run.path} differ in {keys}. Report them separately")


def _differs_from_preset(cell: Cell, config: dict[str, Any]) -> list[str]:
    preset = config_to_dict(load_config(cell.preset.path))
    return [f"{k}={b}" for k, a, b in config_differences(preset, config, _NOT_THE_RECIPE)]


def paper_results(runs: list[_Run], metric: str | None = None) -> tuple[list[list[CellResult]], list[_Run]]:
    """Per table holding any of ``runs`` (in id order): one result per cell, row by row; and the
    runs that belong to no table."""
    by_cell: dict[tuple[Any, Any, Any], list[_Run]] = {}
    for run in runs:
        by_cell.setdefault(run.key, []).append(run)
    tables, placed = [], set()
    for table in list_tables():
        results = []
        for cell in table.cells():
            result = CellResult(table, cell, metric or table.metric)
            home = (cell.preset.table_id, cell.preset.row, cell.preset.column) if cell.preset else None
            members = by_cell.get(home, []) if home else []
            finished = [r for r in members if r.metrics is not None]
            result.unfinished = len(members) - len(finished)
            if finished:
                _check_one_experiment(cell, finished)
                result.values = [metric_value(r.metrics, result.metric, cell.preset.compare, r.path) for r in finished]
                result.runs = [r.path for r in finished]
                result.differs = _differs_from_preset(cell, finished[0].config)
            if members:
                placed.add(home)
            results.append(result)
        if any(r.runs or r.unfinished for r in results):
            tables.append(results)
    return tables, [r for r in runs if r.key not in placed]


def _cell_text(result: CellResult, notes: list[str]) -> str:
    d = _digits(result.metric)
    paper = "" if result.paper is None else f"paper {format_number(result.paper, d)}" + (
        f" ± {format_number(result.paper_std, d)}" if result.paper_std is not None else "")

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    if result.cell.preset is None:
        return f"{paper} · not run {note(result.cell.reason)}" if paper else f"— {note(result.cell.reason)}"
    if not result.values:
        waiting = f"{result.unfinished} unfinished" if result.unfinished else "no run"
        return " · ".join(filter(None, [paper, waiting]))
    skd = (f"**{format_number(result.mean, d)}**" + (f" ± {format_number(result.std, d)}" if result.std is not None
                                                      else "") + f" (n={result.n})")
    parts = [skd, paper]
    if result.delta is not None:
        delta = format_number(result.delta, d)
        parts.append(f"Δ {'' if delta.startswith('-') else '+'}{delta}" + (" ⚠" if result.outside else ""))
    if result.unfinished:
        parts.append(f"+{result.unfinished} unfinished")
    if result.differs:
        parts.append("‡ " + note("runs differ from the preset: " + ", ".join(result.differs)))
    return " · ".join(filter(None, parts))


def format_paper_table(results: list[CellResult]) -> str:
    """The table in Markdown, as the paper lays it out, with its footnotes."""
    table = results[0].table
    notes: list[str] = []
    texts = {(r.cell.row, r.cell.column): _cell_text(r, notes) for r in results}
    compares = sorted({r.cell.preset.compare for r in results if r.cell.preset})
    lines = [f"## {table.title} (`{table.table_id}`)", "",
             f"{table.source}. {metric_label(results[0].metric, table.display)}; skd: mean ± std over runs (n), "
             f"epoch: {', '.join(compares)}. ⚠: skd outside the paper's ±, or the paper outside 2 std of the runs.",
             "", "| | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join([row] + [texts[row, c] for c in table.columns]) + " |" for row in table.rows]
    lines += [""] + [f"- [{i}] {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def write_csv(tables: list[list[CellResult]], path: Path) -> None:
    """One line per cell, full precision, in the table's unit."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["table_id", "row", "column", "preset", "shared", "metric", "unit", "compare", "paper",
                         "paper_std", "skd_mean", "skd_std", "n", "delta", "outside", "unfinished", "note", "runs"])
        for results in tables:
            for r in results:
                preset = r.cell.preset
                unit = ("error" if r.table.display == "error" else "accuracy") if r.metric in ("top1", "top5") else r.metric
                note = r.cell.reason or ("differs from the preset: " + ", ".join(r.differs) if r.differs else "")
                writer.writerow([r.table.table_id, r.cell.row, r.cell.column, preset.name if preset else "",
                                 r.cell.shared, r.metric, unit, preset.compare if preset else "",
                                 *["" if v is None else repr(v) for v in (r.paper, r.paper_std, r.mean, r.std)],
                                 r.n, "" if r.delta is None else repr(r.delta),
                                 "" if r.outside is None else r.outside, r.unfinished, note,
                                 ";".join(str(p) for p in r.runs)])


def paper_figure(results: list[CellResult]) -> Figure:
    """skd (mean ± std over runs) against the paper (± where published) for every cell with both
    (a cell whose mean is NaN or infinite is left out), and the line y = x over all of them; red
    where the cell is marked ⚠. The legend sits below the axes."""
    table = results[0].table
    points = [r for r in results if r.mean is not None and r.paper is not None and math.isfinite(r.mean)]
    fig = _figure(6.4, 6.0)
    ax = fig.subplots()
    colors = {True: "tab:red", False: "tab:blue", None: "gray"}
    for r in points:
        color = colors[r.outside]
        ax.errorbar(r.paper, r.mean, yerr=r.std or 0.0, xerr=r.paper_std or 0.0, fmt="o", color=color,
                    markersize=4, capsize=3, linewidth=1)
        ax.annotate(f"{r.cell.row} / {r.cell.column}", (r.paper, r.mean), textcoords="offset points",
                    xytext=(4, 3), fontsize=6, color=color)
    values = [v for r in points for v in (r.paper - (r.paper_std or 0.0), r.paper + (r.paper_std or 0.0),
                                          r.mean - (r.std or 0.0), r.mean + (r.std or 0.0))]
    if values:
        low, high = min(values), max(values)
        pad = max(0.5, 0.1 * (high - low))
        ax.plot([low - pad, high + pad], [low - pad, high + pad], "--", color="gray", linewidth=1, label="y = x")
        ax.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad))
        kinds = {True: "outside (⚠)", False: "within", None: "one run, no paper ±: not judged"}
        handles = [*ax.get_legend_handles_labels()[0],
                   *(Line2D([], [], marker="o", linestyle="", color=colors[k], label=label)
                     for k, label in kinds.items() if any(r.outside is k for r in points))]
        _legend_below(fig, handles, [h.get_label() for h in handles])
    else:
        ax.text(0.5, 0.5, "no cell has both a run and a paper number", ha="center", va="center",
                transform=ax.transAxes)
    label = metric_label(results[0].metric, table.display)
    ax.set(xlabel=f"paper: {label}", ylabel=f"skd: {label}", title=f"{table.title}")
    ax.set_aspect("equal", adjustable="box")
    return fig


def write_paper_report(paths: list[str | Path], out: str | Path | None = None, metric: str | None = None) -> Path:
    """Write ``paper.md``, ``paper.csv`` and a figure per table into ``out`` (default: the single
    path's ``report/``); returns the path of ``paper.md``."""
    out = report_folder(paths, out, PaperReportError)
    tables, strays = paper_results(find_runs(paths), metric)
    if not tables:
        raise PaperReportError(f"none of the runs under {', '.join(map(str, paths))} belongs to a table "
                               f"(their config.yaml has no reference.table_id of configs/tables/)")
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# skd against the papers: {len(tables)} table{'s' if len(tables) > 1 else ''}", ""]
    for results in tables:
        table = results[0].table
        figure = f"paper-{table.table_id}.png"
        paper_figure(results).savefig(out / figure, dpi=110)
        sections += [format_paper_table(results), f"![{table.title}]({figure})", ""]
        if table.notes:
            sections += [f"Notes: {table.notes}", ""]
    if strays:
        sections += [f"{len(strays)} run(s) belong to no table: " + ", ".join(f"`{r.path}`" for r in strays), ""]
    sections += ["Full precision: [paper.csv](paper.csv).", ""]
    (out / "paper.md").write_text("\n".join(sections))
    write_csv(tables, out / "paper.csv")
    return out / "paper.md"


def report_paper(paths: list[str], out: str | None, metric: str | None) -> int:
    """``skd report --paper`` (inside the command's ``run_command``): write the report and print it."""
    index = write_paper_report(paths, out, metric)
    print(index.read_text(), end="")
    print(f"report: {index}")
    return 0
