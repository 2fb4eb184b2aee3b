"""``skd report``: compare finished runs as a table and figures, and the reliability diagram that
the trainer logs to TensorBoard.

A run directory is read, never written: ``config.yaml``, ``metrics.json`` (the table: last epoch,
EMA, best epoch), ``history.jsonl`` (training curves) and ``predictions.npz`` (reliability
diagrams and risk–coverage curves of the final evaluation).

Every run is a row of its own, labelled ``method / model`` and the config keys whose values differ
between the compared runs, each key only on the runs it applies to (``applies``: a field of the
run's own method; a key of ``GATES`` only where its gate holds, e.g. ``data.dali_device`` only with
``data.backend=dali``). Runs whose labels would coincide (identical configs) are told apart by
their directory names. With ``--group-by seed``, runs whose configs differ only in ``seed`` (and in
keys that never change a result, such as ``output_dir``, or that do not apply to them) become one
row: mean ± sample standard deviation (n − 1) over the n runs, n shown.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``, so no global backend is set and nothing needs a display. Legends sit below the axes
and the figure grows by their size, so no number of runs or length of label cuts them off or
covers a curve.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from skd.config import flat_fields, in_sections, load_yaml
from skd.config_gates import GATES, Gate, applies
from skd.errors import SkdError, run_command
from skd.metrics import CalibrationBins, Predictions, calibration_bins, risk_coverage
from skd.resume import OPERATIONAL_KEYS

__all__ = ["Run", "RunGroup", "TableRow", "Gate", "GATES", "applies", "load_run", "load_runs", "group_runs",
           "table_rows", "format_number", "markdown_table", "format_markdown", "write_csv", "reliability_figure",
           "reliability_overlay_figure", "risk_coverage_figure", "training_curves_figure", "comparison_figures",
           "log_reliability_diagram", "write_report", "main"]

COLUMNS = (("top1_err", "Top-1 Err"), ("top5_err", "Top-5 Err"), ("nll", "NLL"), ("ece", "ECE"),
           ("aurc", "AURC"), ("eaurc", "E-AURC"))
"""The PS-KD README layout: errors and ECE in %, AURC and E-AURC ×1000."""

METRIC_KEYS = ("top1", "top5", "nll", "ece", "aurc", "eaurc")

RUN_FILES = ("config.yaml", "metrics.json", "history.jsonl", "predictions.npz")


class ReportError(SkdError, ValueError):
    """A run directory that cannot be reported (missing or damaged file), or bad arguments."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    """The resolved config, one key per field (``method.name``), values as saved."""
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    predictions: Predictions


@dataclass
class RunGroup:
    label: str
    runs: list[Run]


@dataclass
class TableRow:
    label: str
    group_values: list[Any]
    """The ``--group-by`` key's value of each run (empty without grouping)."""
    which: str
    """``last``, ``ema`` or ``best``."""
    epochs: list[int]
    values: dict[str, list[float]]
    """Column name → one value per run."""

    def mean(self, column: str) -> float:
        return _mean(self.values[column])

    def std(self, column: str) -> float | None:
        """Sample standard deviation (n − 1); None for a single run."""
        return _std(self.values[column])


def _mean(values: Sequence[float]) -> float:
    with np.errstate(all="ignore"):  # a diverged run's inf or NaN gives an inf or NaN mean
        return float(np.mean(np.asarray(values, dtype=np.float64)))


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n − 1), NaN when a value is not finite; None for one value."""
    if len(values) < 2:
        return None
    with np.errstate(all="ignore"):
        return float(np.std(np.asarray(values, dtype=np.float64), ddof=1))


# ------------------------------------------------------------------------------------ reading
def load_run(path: str | Path) -> Run:
    """Read a finished run directory; a missing or damaged file is a ``ReportError`` naming it."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing == ["predictions.npz"]:
        raise ReportError(f"{path} has no predictions.npz (a run from before predictions were saved); "
                          f"write it with `skd eval {path} --predictions {path / 'predictions.npz'}`")
    if missing:
        raise ReportError(f"{path} is not a finished run: {', '.join(missing)} missing")
    try:
        config = flat_fields(load_yaml(path / "config.yaml"))
        metrics = json.loads((path / "metrics.json").read_text())
        history = [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines() if line]
        predictions = Predictions.load(path / "predictions.npz")
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # ConfigError is a ValueError
        raise ReportError(f"{path}: {e}") from e
    absent = [k for k in METRIC_KEYS if k not in metrics]
    if absent:
        raise ReportError(f"{path / 'metrics.json'} lacks {', '.join(absent)}")
    return Run(path, config, metrics, history, predictions)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """``load_run`` of each path; a directory given twice is refused (it would be two rows)."""
    seen: set[Path] = set()
    for path in paths:
        if Path(path).resolve() in seen:
            raise ReportError(f"{path} is given twice")
        seen.add(Path(path).resolve())
    return [load_run(p) for p in paths]


# --------------------------------------------------------------------------- labels and groups
def _comparable(config: dict[str, Any], group_by: str | None) -> dict[str, Any]:
    """The config keys that make two runs different experiments: those that apply to the run,
    but not the ones that never change a result (``OPERATIONAL_KEYS``) nor ``group_by``."""
    ignored = OPERATIONAL_KEYS + ((group_by,) if group_by else ())
    return {k: v for k, v in config.items() if not in_sections(k, ignored) and applies(k, config)}


def _canonical(value: Any) -> str:
    """A config value as text that is equal exactly when the values are (lists, dicts, None)."""
    return json.dumps(value, sort_keys=True, default=str)


def group_runs(runs: list[Run], group_by: str | None = None) -> list[RunGroup]:
    """One group per run, in order; with ``group_by``, one per set of runs that differ only in
    that key, in the order of first appearance. Labels: see ``_labels``; groups whose labels
    coincide (the same config given twice) get their run directories' names appended."""
    if group_by and not any(group_by in r.config for r in runs):
        raise ReportError(f"--group-by {group_by}: no run's config has that key")
    if group_by:
        members: dict[str, list[Run]] = {}
        for run in runs:
            members.setdefault(_canonical(_comparable(run.config, group_by)), []).append(run)
        groups = list(members.values())
    else:  # identical configs stay apart: averaging is asked for with --group-by
        groups = [[run] for run in runs]
    labels = _labels([_comparable(g[0].config, group_by) for g in groups])
    for label in dict.fromkeys(labels):
        clashing = [i for i, other in enumerate(labels) if other == label]
        if len(clashing) > 1:
            names = _distinct_names([groups[i] for i in clashing])
            for i, name in zip(clashing, names):
                labels[i] = f"{label} [{name}]"
    return [RunGroup(label, g) for label, g in zip(labels, groups)]


def _labels(configs: list[dict[str, Any]]) -> list[str]:
    """``method / model`` and the keys of each (comparable) config whose values differ among the
    configs that have the key; a method's field only among the runs of that method."""
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in ("method.name", "model.name")))
    labels = []
    for config in configs:
        details = []
        for key in (k for k in keys if k in config):
            peers = [c for c in configs if key in c
                     and (not key.startswith("method.") or c.get("method.name") == config.get("method.name"))]
            if len({_canonical(c[key]) for c in peers}) > 1:
                details.append(f"{key}={config[key]}")
        base = f"{config.get('method.name', '?')} / {config.get('model.name', '?')}"
        labels.append(f"{base} ({', '.join(details)})" if details else base)
    return labels


def _distinct_names(groups: list[list[Run]]) -> list[str]:
    """The shortest trailing parts of the run directories' paths that tell the groups apart."""
    paths = [[r.path.resolve() for r in g] for g in groups]
    for n in range(1, max(len(p.parts) for g in paths for p in g) + 1):
        names = [", ".join("/".join(p.parts[-n:]) for p in g) for g in paths]
        if len(set(names)) == len(names):
            return names
    return [", ".join(str(p) for p in g) for g in paths]


# -------------------------------------------------------------------------------------- table
def _columns(metrics: dict[str, Any]) -> dict[str, float]:
    return {"top1_err": 100.0 - metrics["top1"], "top5_err": 100.0 - metrics["top5"], "nll": metrics["nll"],
            "ece": metrics["ece"], "aurc": metrics["aurc"], "eaurc": metrics["eaurc"]}


def table_rows(groups: list[RunGroup], group_by: str | None = None) -> list[TableRow]:
    """Per group: the last epoch, the EMA weights (when the runs have them) and the best epoch."""
    rows = []
    for group in groups:
        runs = group.runs
        group_values = [r.config.get(group_by) for r in runs] if group_by else []
        last = [int(r.config["epochs"]) - 1 for r in runs]
        views = [("last", last, [r.metrics for r in runs])]
        if all("ema" in r.metrics for r in runs):
            views.append(("ema", last, [r.metrics["ema"] for r in runs]))
        if all("best" in r.metrics for r in runs):
            views.append(("best", [r.metrics["best"]["epoch"] for r in runs], [r.metrics["best"] for r in runs]))
        for which, epochs, metrics in views:
            per_run = [_columns(m) for m in metrics]
            rows.append(TableRow(group.label, group_values, which, epochs,
                                 {c: [v[c] for v in per_run] for c, _ in COLUMNS}))
    return rows


def format_number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, in scientific notation where that would take more than
    ten characters (a diverged run's NLL of 2.3e11 reads ``2.300e+11``); ``nan``, ``inf``."""
    text = f"{value:.{digits}f}"
    return text if len(text) <= 10 or not math.isfinite(value) else f"{value:.{digits}e}"


def _mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` of several runs, the value alone for one."""
    std = _std(values)
    return format_number(_mean(values), digits) + ("" if std is None else f" ± {format_number(std, digits)}")


def _digits(column: str) -> int:
    return 3 if column == "nll" else 2


def _epochs(row: TableRow) -> str:
    return f"{row.which} ({', '.join(str(e) for e in row.epochs)})"


def markdown_table(header: list[str], rows: list[list[str]], right: Sequence[int] = ()) -> str:
    """A GitHub Markdown table that is aligned as plain text too: every column padded to its
    widest cell, the columns ``right`` (indices) right-aligned; a ``|`` in a cell is escaped and
    line breaks become spaces."""
    cells = [[" ".join(str(c).split()).replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(len(row[j]) for row in cells) for j in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if j in right else c.ljust(w)
                                 for j, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if j in right else "-" * (w + 2) for j, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def format_markdown(rows: list[TableRow], group_by: str | None = None) -> str:
    """The results table; with ``group_by`` a column of each row's values of that key and one of
    n, the number of runs averaged."""
    head = ["run"] + ([group_by, "n"] if group_by else []) + ["epoch"] + [title for _, title in COLUMNS]
    body = [[row.label] + ([", ".join(str(v) for v in row.group_values), str(len(row.epochs))] if group_by else [])
            + [_epochs(row)] + [_mean_std(row.values[c], _digits(c)) for c, _ in COLUMNS] for row in rows]
    numbers = len(head) - len(COLUMNS)
    return markdown_table(head, body, right=[*range(numbers, len(head))] + ([2] if group_by else []))


def write_csv(rows: list[TableRow], path: Path, group_by: str | None = None) -> None:
    """Full-precision values (``nan``, ``inf`` as Python writes them): per metric column the mean
    and ``_std`` (empty for one run)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", group_by or "group_values", "which", "epochs", "n"]
                        + [name for c, _ in COLUMNS for name in (c, f"{c}_std")])
        for row in rows:
            stds = {c: row.std(c) for c, _ in COLUMNS}
            writer.writerow([row.label, " ".join(str(v) for v in row.group_values), row.which,
                             " ".join(str(e) for e in row.epochs), len(row.epochs)]
                            + [x for c, _ in COLUMNS for x in (repr(row.mean(c)),
                                                              "" if stds[c] is None else repr(stds[c]))])


# ------------------------------------------------------------------------------------ figures
LEGEND_FONTSIZE = 8.0
TITLE_FONTSIZE = 12.0
"""Points; legends and titles are wrapped to the figure's width at about 0.6 em a character."""

LINESTYLES = ("-", "--", ":", "-.")


def _style(i: int) -> dict[str, Any]:
    """The color and line style of the ``i``-th run: tab10's colors, then again dashed."""
    return {"color": colormaps["tab10"](i % 10), "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer to measure the legend with
    return fig


def _line_length(fig: Figure, fontsize: float) -> int:
    """Characters of text in ``fontsize`` points that fit across the figure (about 0.6 em each)."""
    return int(fig.get_figwidth() * 72 / (0.6 * fontsize))


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, max(width, 24), break_on_hyphens=False)


def _legend_below(fig: Figure, handles: list[Artist], labels: list[str]) -> None:
    """The legend under all axes, its labels wrapped to the figure's width; the figure grows by
    the legend's height (and its width, should a label still be wider) so the axes keep their
    size and no entry is cut off or covers data."""
    if not labels:
        return
    chars = _line_length(fig, LEGEND_FONTSIZE) - 8  # the handle takes about 8
    wrapped = [_wrap(label, chars) for label in labels]
    longest = max(len(line) for label in wrapped for line in label.splitlines())
    columns = max(1, min(len(wrapped), chars // (longest + 8)))
    legend = fig.legend(handles, wrapped, loc="outside lower center", ncols=columns, fontsize=LEGEND_FONTSIZE,
                        frameon=False)
    box = legend.get_window_extent(fig.canvas.get_renderer())
    fig.set_size_inches(max(fig.get_figwidth(), box.width / fig.dpi + 0.3),
                        fig.get_figheight() + box.height / fig.dpi + 0.1)


def _bins(predictions: Predictions) -> CalibrationBins:
    return calibration_bins(predictions.confidence, predictions.pred == predictions.label)


def reliability_figure(bins: CalibrationBins, title: str = "") -> Figure:
    """Accuracy per confidence bin against the diagonal, the gap to each bin's mean confidence
    (what ECE weighs), and below it the share of samples per bin."""
    fig = _figure(4.8, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    width = bins.upper - bins.lower
    filled = bins.count > 0
    top.bar(bins.lower[filled], bins.accuracy[filled], width[filled], align="edge", color="tab:blue",
            edgecolor="black", linewidth=0.6, label="accuracy")
    gap_low = np.minimum(bins.accuracy, bins.confidence)[filled]
    gap = np.abs(bins.accuracy - bins.confidence)[filled]
    top.bar(bins.lower[filled], gap, width[filled], bottom=gap_low, align="edge", color="tab:red",
            alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    ece = f"ECE {format_number(bins.ece, 2)} %"
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    title = f"{_wrap(title, _line_length(fig, TITLE_FONTSIZE))}\n{ece}" if title else ece  # a long path wraps
    top.set_title(title, fontsize=TITLE_FONTSIZE)
    share = 100.0 * bins.count / max(bins.num_samples, 1)
    bottom.bar(bins.lower, share, width, align="edge", color="gray", edgecolor="black", linewidth=0.6)
    bottom.set(xlabel="confidence", ylabel="% of samples")
    _legend_below(fig, *top.get_legend_handles_labels())
    return fig


Curves = list[tuple[str, dict[str, Any], Any]]
"""One entry per run: (legend label, or "" for a run that shares its group's entry; line style
from ``_style``; the run's data)."""


def reliability_overlay_figure(curves: Curves) -> Figure:
    """Several runs' reliability curves (accuracy at each non-empty bin's mean confidence) and
    confidence histograms; the data of each curve is a ``CalibrationBins``."""
    fig = _figure(6.4, 7.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    for label, style, bins in curves:
        filled = bins.count > 0
        top.plot(bins.confidence[filled], bins.accuracy[filled], marker="o", markersize=3, label=label or None,
                 **style)
        edges = np.append(bins.lower, bins.upper[-1])
        bottom.stairs(100.0 * bins.count / max(bins.num_samples, 1), edges, **style)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability (final evaluation)")
    bottom.set(xlabel="confidence", ylabel="% of samples")
    _legend_below(fig, *top.get_legend_handles_labels())
    return fig


def risk_coverage_figure(curves: Curves) -> Figure:
    """Risk (error % of the most confident samples) against coverage; AURC is its mean. The data
    of each curve is the run's ``Predictions``."""
    fig = _figure(6.4, 4.8)
    ax = fig.subplots()
    for label, style, predictions in curves:
        coverage, risk = risk_coverage(predictions.confidence, predictions.pred == predictions.label)
        ax.plot(coverage, 100.0 * risk, linewidth=1.2, label=label or None, **style)
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="risk (% errors among covered)",
           title="risk–coverage (final evaluation)")
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig


_NOT_CURVES = {"epoch", "step", "top5", "aurc", "eaurc", "num_samples", "num_corrupt",
               "train_corrupt_samples", "ema", "best"}
_TITLES = {"train_loss": "train loss", "lr": "learning rate", "top1": "val top-1 (%)", "nll": "val NLL",
           "ece": "val ECE (%)", "alpha_t": "PS-KD α_t"}


def _curve_keys(histories: list[list[dict[str, Any]]]) -> list[str]:
    """train_loss, the other loss terms, lr, val top-1/NLL/ECE, then the methods' values (α_t)."""
    present = {k for h in histories for record in h for k, v in record.items()
               if isinstance(v, (int, float)) and k not in _NOT_CURVES}
    terms = sorted(k for k in present if k.startswith("train_") and k != "train_loss")
    fixed = ["train_loss", *terms, "lr", "top1", "nll", "ece"]
    return [k for k in fixed if k in present] + sorted(present - set(fixed))


def training_curves_figure(curves: Curves) -> Figure:
    """One panel per value of ``history.jsonl`` worth a curve, one line per run; the data of each
    curve is the run's history."""
    keys = _curve_keys([h for _, _, h in curves])
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for label, style, history in curves:
            epochs = [r["epoch"] for r in history]
            values = [r.get(key, math.nan) for r in history]
            ax.plot(epochs, values, marker="o", markersize=3, label=label or None, **style)
        ax.set(title=_TITLES.get(key, key.replace("train_", "train ")), xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    _legend_below(fig, *axes[0].get_legend_handles_labels())
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)


def log_reliability_diagram(accelerator: Any, predictions: Predictions, step: int) -> None:
    """Log the reliability diagram of ``predictions`` as the image ``val/reliability`` to
    accelerate's TensorBoard tracker, where the run has one (the main process only); other
    trackers (wandb) and ``log_with=[]`` get nothing."""
    if not any(t.name == "tensorboard" for t in accelerator.trackers):
        return
    canvas = FigureCanvasAgg(reliability_figure(_bins(predictions), title=f"validation, step {step}"))
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    accelerator.get_tracker("tensorboard", unwrap=True).add_image("val/reliability", image, step,
                                                                  dataformats="HWC")


# -------------------------------------------------------------------------------------- report
def _legend(group: RunGroup, metric: str | None) -> str:
    """The group's label, with the final evaluation's ``metric`` (mean ± std over several runs)."""
    if metric is None:
        return group.label
    n = len(group.runs)
    value = _mean_std([r.metrics[metric] for r in group.runs], 2)
    return (f"{group.label}: {metric.upper()} {value}{' %' if metric == 'ece' else ''}"
            + (f" (n={n})" if n > 1 else ""))


def comparison_figures(groups: list[RunGroup]) -> dict[str, Figure]:
    """``reliability.png``, ``risk_coverage.png`` and ``training_curves.png`` of the groups: one
    style per group; a group's runs (its seeds) share it and one legend entry."""
    def curves(metric: str | None, data: Callable[[Run], Any]) -> Curves:
        return [(_legend(group, metric) if j == 0 else "", _style(i), data(run))
                for i, group in enumerate(groups) for j, run in enumerate(group.runs)]
    return {"reliability.png": reliability_overlay_figure(curves("ece", lambda run: _bins(run.predictions))),
            "risk_coverage.png": risk_coverage_figure(curves("aurc", lambda run: run.predictions)),
            "training_curves.png": training_curves_figure(curves(None, lambda run: run.history))}


def _file_name(i: int, run: Run) -> str:
    return f"reliability-{i:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', run.path.name)}.png"


def report_folder(paths: list[str | Path], out: str | Path | None, error: type[SkdError]) -> Path:
    """Where a report of ``paths`` goes: ``out``, or the single path's ``report/``; ``error``
    when no path is given, or several without ``out``."""
    if not paths:
        raise error("no run or sweep folder given")
    if out is None:
        if len(paths) > 1:
            raise error("--out DIR is required when reporting several folders")
        out = Path(paths[0]) / "report"
    return Path(out)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None,
                 group_by: str | None = None) -> Path:
    """Write the table (``results.md``, ``results.csv``), the figures and ``index.md`` into
    ``out`` (default ``RUN_DIR/report`` for a single run); returns the path of ``index.md``."""
    out = report_folder(run_dirs, out, ReportError)
    runs = load_runs(run_dirs)
    groups = group_runs(runs, group_by)
    out.mkdir(parents=True, exist_ok=True)

    rows = table_rows(groups, group_by)
    table = format_markdown(rows, group_by)
    (out / "results.md").write_text(table + "\n")
    write_csv(rows, out / "results.csv", group_by)

    for name, fig in comparison_figures(groups).items():
        _save(fig, out / name)
    per_run = []
    for i, run in enumerate(runs):
        name = _file_name(i, run)
        _save(reliability_figure(_bins(run.predictions), title=str(run.path)), out / name)
        per_run.append((run, name))

    index = [f"# skd report: {len(runs)} run{'s' if len(runs) != 1 else ''}", "",
             table, "",
             "Top-1/Top-5 error and ECE in %, NLL in nats, AURC and E-AURC ×1000 (the PS-KD conventions). "
             "`last`: the final evaluation (`metrics.json`), `ema`: its EMA weights, `best`: the epoch with "
             "the best validation `best_metric`; epochs in parentheses count from 0."
             + (f" Rows merge the n runs that differ only in `{group_by}`: mean ± sample standard "
                f"deviation (n − 1)." if group_by else " Each run is a row of its own; runs with the same "
                "config are told apart by their directories' names (`--group-by seed` averages seeds).")
             + " Full-precision values: [results.csv](results.csv).", "",
             "## Runs", ""]
    index += [f"- **{group.label}**: " + ", ".join(f"`{r.path}`" for r in group.runs) for group in groups]
    index += ["", "## Reliability (final evaluation)", "",
              "Accuracy per confidence bin; the bins are those of ECE (10 equal-width bins, "
              "lower < confidence ≤ upper).", "", "![reliability](reliability.png)", ""]
    index += [f"![{run.path}]({name})" for run, name in per_run]
    index += ["", "## Risk–coverage (final evaluation)", "",
              "Error rate of the most confident samples as coverage grows; AURC is the mean of the curve.",
              "", "![risk-coverage](risk_coverage.png)", "",
              "## Training curves", "", "Per epoch, from `history.jsonl`.", "",
              "![training curves](training_curves.png)", ""]
    (out / "index.md").write_text("\n".join(index))
    return out / "index.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skd report", description="Compare finished runs: a table in the PS-KD README layout "
        "(Markdown and CSV), reliability diagrams, risk-coverage and training curves (PNG), and an "
        "index.md that shows them.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/report for a single run; "
                                      "required for several)")
    parser.add_argument("--group-by", metavar="KEY",
                        help="merge runs whose configs differ only in this config key (usually seed) "
                             "into mean ± std rows; without it every run is a row of its own")
    parser.add_argument("--paper", action="store_true",
                        help="lay the runs out as their paper's table beside the paper's numbers (paper.md, "
                             "paper.csv, a figure per table; see docs/tables.md); RUN_DIR may then also be a "
                             "sweep folder or a folder of runs")
    parser.add_argument("--metric", choices=METRIC_KEYS,
                        help="with --paper: the metric to compare (default: the table's own)")
    args = parser.parse_args(argv)
    if args.paper and args.group_by:
        parser.error("--group-by does not apply with --paper (a paper's cell already averages its seeds)")
    if args.metric and not args.paper:
        parser.error("--metric applies only with --paper")

    def body() -> int:
        if args.paper:
            from skd.paper_report import report_paper

            return report_paper(args.runs, args.out, args.metric)
        index = write_report(args.runs, args.out, args.group_by)
        print((index.parent / "results.md").read_text(), end="")
        print(f"report: {index}")
        return 0

    return run_command("skd report", body)
