"""``skd report``: compare finished runs as a table and figures, and the reliability diagram that
the trainer logs to TensorBoard.

A run directory is read, never written: ``config.yaml``, ``metrics.json`` (the table: last epoch,
EMA, best epoch), ``history.jsonl`` (training curves) and ``predictions.npz`` (reliability
diagrams and risk–coverage curves of the final evaluation). With ``--group-by seed``, runs whose
configs differ only in ``seed`` (and in keys that never change a result, such as ``output_dir``)
become one row: mean ± sample standard deviation (n − 1) over the seeds.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``, so no global backend is set and nothing needs a display.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from skd.config import flat_dict, in_sections, load_yaml
from skd.errors import SkdError
from skd.metrics import CalibrationBins, Predictions, calibration_bins, risk_coverage
from skd.resume import OPERATIONAL_KEYS

__all__ = ["Run", "RunGroup", "TableRow", "load_run", "group_runs", "table_rows", "format_markdown",
           "write_csv", "reliability_figure", "reliability_overlay_figure", "risk_coverage_figure",
           "training_curves_figure", "log_reliability_diagram", "write_report", "main"]

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
    """The resolved config, flattened (``method.name``)."""
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
        return statistics.fmean(self.values[column])

    def std(self, column: str) -> float | None:
        """Sample standard deviation (n − 1); None for a single run."""
        values = self.values[column]
        return statistics.stdev(values) if len(values) > 1 else None


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
        config = flat_dict(load_yaml(path / "config.yaml"))
        metrics = json.loads((path / "metrics.json").read_text())
        history = [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines() if line]
        predictions = Predictions.load(path / "predictions.npz")
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # ConfigError is a ValueError
        raise ReportError(f"{path}: {e}") from e
    absent = [k for k in METRIC_KEYS if k not in metrics]
    if absent:
        raise ReportError(f"{path / 'metrics.json'} lacks {', '.join(absent)}")
    return Run(path, config, metrics, history, predictions)


def _comparable(config: dict[str, Any], group_by: str | None) -> dict[str, Any]:
    """The config keys that make two runs different experiments."""
    ignored = OPERATIONAL_KEYS + ((group_by,) if group_by else ())
    return {k: v for k, v in config.items() if not in_sections(k, ignored)}


def group_runs(runs: list[Run], group_by: str | None = None) -> list[RunGroup]:
    """One group per run, or with ``group_by`` one per set of runs that differ only in that key;
    in the order of first appearance. Labels are ``method / model`` and the keys that set a group
    apart from the others of the same method and model."""
    if group_by and not any(group_by in r.config for r in runs):
        raise ReportError(f"--group-by {group_by}: no run's config has that key")
    members: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(_comparable(run.config, group_by), sort_keys=True, default=str)
        members.setdefault(key, []).append(run)
    groups = list(members.values())
    labels = _labels([_comparable(g[0].config, group_by) for g in groups])
    if len(set(labels)) < len(labels):  # the same experiment given twice: tell them apart by folder
        labels = [f"{label} [{g[0].path.name}]" for label, g in zip(labels, groups)]
    return [RunGroup(label, g) for label, g in zip(labels, groups)]


def _labels(configs: list[dict[str, Any]]) -> list[str]:
    bases = [f"{c.get('method.name', '?')} / {c.get('model.name', '?')}" for c in configs]
    labels = []
    for base, config in zip(bases, configs):
        peers = [c for b, c in zip(bases, configs) if b == base]
        keys = sorted({k for c in peers for k in c} - {"method.name", "model.name"})
        differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in peers}) > 1]
        details = ", ".join(f"{k}={config.get(k)}" for k in differing)
        labels.append(f"{base} ({details})" if details else base)
    return labels


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


def _cell(row: TableRow, column: str) -> str:
    digits = 3 if column == "nll" else 2
    std = row.std(column)
    return f"{row.mean(column):.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _epochs(row: TableRow) -> str:
    return f"{row.which} ({', '.join(str(e) for e in row.epochs)})"


def format_markdown(rows: list[TableRow], group_by: str | None = None) -> str:
    head = ["run"] + ([group_by] if group_by else []) + ["epoch"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---|" * (bool(group_by) + len(COLUMNS))]
    for row in rows:
        cells = [row.label] + ([", ".join(str(v) for v in row.group_values)] if group_by else [])
        cells += [_epochs(row)] + [_cell(row, c) for c, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[TableRow], path: Path, group_by: str | None = None) -> None:
    """Full-precision values: per metric column the mean and ``_std`` (empty for one run)."""
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
def _color(i: int) -> Any:
    return colormaps["tab10"](i % 10)


def _bins(predictions: Predictions) -> CalibrationBins:
    return calibration_bins(predictions.confidence, predictions.pred == predictions.label)


def reliability_figure(bins: CalibrationBins, title: str = "") -> Figure:
    """Accuracy per confidence bin against the diagonal, the gap to each bin's mean confidence
    (what ECE weighs), and below it the share of samples per bin."""
    fig = Figure(figsize=(4.8, 6.0), layout="constrained")
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
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
            title=f"{title}\nECE {bins.ece:.2f} %" if title else f"ECE {bins.ece:.2f} %")
    top.legend(loc="upper left", fontsize="small")
    share = 100.0 * bins.count / max(bins.num_samples, 1)
    bottom.bar(bins.lower, share, width, align="edge", color="gray", edgecolor="black", linewidth=0.6)
    bottom.set(xlabel="confidence", ylabel="% of samples")
    return fig


def reliability_overlay_figure(curves: list[tuple[str, Any, CalibrationBins]]) -> Figure:
    """Several runs' reliability curves (accuracy at each non-empty bin's mean confidence) and
    confidence histograms; ``curves`` holds (legend label or "", color, bins)."""
    fig = Figure(figsize=(6.4, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    for label, color, bins in curves:
        filled = bins.count > 0
        top.plot(bins.confidence[filled], bins.accuracy[filled], "o-", color=color, markersize=3,
                 label=label or None)
        edges = np.append(bins.lower, bins.upper[-1])
        bottom.stairs(100.0 * bins.count / max(bins.num_samples, 1), edges, color=color)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability (final evaluation)")
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="confidence", ylabel="% of samples")
    return fig


def risk_coverage_figure(curves: list[tuple[str, Any, Predictions]]) -> Figure:
    """Risk (error % of the most confident samples) against coverage; AURC is its mean."""
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    for label, color, predictions in curves:
        coverage, risk = risk_coverage(predictions.confidence, predictions.pred == predictions.label)
        ax.plot(coverage, 100.0 * risk, color=color, linewidth=1.2, label=label or None)
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="risk (% errors among covered)",
           title="risk–coverage (final evaluation)")
    ax.legend(loc="upper left", fontsize="small")
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


def training_curves_figure(curves: list[tuple[str, Any, list[dict[str, Any]]]]) -> Figure:
    """One panel per value of ``history.jsonl`` worth a curve, one line per run."""
    keys = _curve_keys([h for _, _, h in curves])
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for label, color, history in curves:
            epochs = [r["epoch"] for r in history]
            values = [r.get(key, math.nan) for r in history]
            ax.plot(epochs, values, "o-", color=color, markersize=3, label=label or None)
        ax.set(title=_TITLES.get(key, key.replace("train_", "train ")), xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    if any(label for label, _, _ in curves):
        axes[0].legend(fontsize="small")
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
    """The group's label, with the final evaluation's ``metric`` (the mean over several runs)."""
    if metric is None:
        return group.label
    values = [r.metrics[metric] for r in group.runs]
    value = f"mean {statistics.fmean(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
    return f"{group.label}: {metric.upper()} {value}{' %' if metric == 'ece' else ''}"


def _file_name(i: int, run: Run) -> str:
    return f"reliability-{i:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', run.path.name)}.png"


def write_report(run_dirs: list[str | Path], out: str | Path | None = None,
                 group_by: str | None = None) -> Path:
    """Write the table (``results.md``, ``results.csv``), the figures and ``index.md`` into
    ``out`` (default ``RUN_DIR/report`` for a single run); returns the path of ``index.md``."""
    if not run_dirs:
        raise ReportError("no run directory given")
    if out is None:
        if len(run_dirs) > 1:
            raise ReportError("--out DIR is required when reporting several runs")
        out = Path(run_dirs[0]) / "report"
    out = Path(out)
    runs = [load_run(p) for p in run_dirs]
    groups = group_runs(runs, group_by)
    out.mkdir(parents=True, exist_ok=True)

    rows = table_rows(groups, group_by)
    table = format_markdown(rows, group_by)
    (out / "results.md").write_text(table + "\n")
    write_csv(rows, out / "results.csv", group_by)

    # One color per group; a group's runs (its seeds) share it and one legend entry.
    def lines(metric: str | None = None) -> list[tuple[str, Any, Run]]:
        return [(_legend(group, metric) if j == 0 else "", _color(i), run)
                for i, group in enumerate(groups) for j, run in enumerate(group.runs)]
    _save(reliability_overlay_figure([(label, color, _bins(run.predictions)) for label, color, run in lines("ece")]),
          out / "reliability.png")
    _save(risk_coverage_figure([(label, color, run.predictions) for label, color, run in lines("aurc")]),
          out / "risk_coverage.png")
    _save(training_curves_figure([(label, color, run.history) for label, color, run in lines()]),
          out / "training_curves.png")
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
             + (f" Rows merge runs that differ only in `{group_by}`: mean ± sample standard deviation "
                f"(n − 1)." if group_by else "")
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
                             "into mean ± std rows")
    parser.add_argument("--paper", action="store_true",
                        help="lay the runs out as their paper's table beside the paper's numbers (paper.md, "
                             "paper.csv, a figure per table; see docs/tables.md); RUN_DIR may then also be a "
                             "sweep folder or a folder of runs")
    parser.add_argument("--metric", choices=METRIC_KEYS,
                        help="with --paper: the metric to compare (default: the table's own)")
    args = parser.parse_args(argv)
    if args.paper:
        from skd.paper_report import report_paper

        return report_paper(args.runs, args.out, args.metric)
    try:
        index = write_report(args.runs, args.out, args.group_by)
    except ReportError as e:
        print(f"skd report: error: {e}", file=sys.stderr)
        return 2
    print((index.parent / "results.md").read_text(), end="")
    print(f"report: {index}")
    return 0
