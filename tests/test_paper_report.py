"""``skd report --paper``: cells against hand-computed mean, std and Δ, the paper's layout (rows,
columns, errors), missing cells, marks, footnotes, the CSV and the figure (the line y = x over
every point, the legend below the axes), a diverged run's NaN and infinite values, run folders
reached twice, the options that do not go with --paper, and the refusal to mix two experiments in
one cell. Synthetic run folders: config.yaml and metrics.json written here."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from skd.config import config_to_dict, load_config
from skd.paper_report import PaperReportError, find_runs, paper_figure, paper_results, write_paper_report
from skd.presets import get_preset
from skd.report import main as report_main


def _run(folder: Path, preset: str, seed: int, top1: float, *, best: float | None = None,
         overrides: tuple[str, ...] = ()) -> Path:
    """A finished run of ``preset``: its resolved config (as skd train writes it) and metrics.json
    with the last epoch's top-1 ``top1`` and the best epoch's ``best``."""
    run = folder / f"{preset.replace('/', '_')}-s{seed}-{len(overrides)}"
    run.mkdir(parents=True)
    cfg = load_config(get_preset(preset).path, [f"seed={seed}", *overrides])
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), allow_unicode=True))
    metrics = {"top1": top1, "top5": 99.0, "nll": 0.5, "ece": 3.0, "aurc": 50.0, "eaurc": 10.0,
               "best": {"epoch": 3, "top1": top1 if best is None else best, "top5": 99.5, "nll": 0.4,
                        "ece": 2.0, "aurc": 40.0, "eaurc": 9.0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_cells_against_hand_computed_statistics_in_the_papers_layout(tmp_path):
    runs = tmp_path / "runs"
    # PS-KD ImageNet (printed as errors, best epoch): ResNet-152 baseline, two seeds.
    _run(runs, "imagenet/resnet152_ce", 0, 70.0, best=78.0)
    _run(runs, "imagenet/resnet152_ce", 1, 70.0, best=77.5)
    # PS-KD column far from the paper: marked.
    _run(runs, "imagenet/resnet152_pskd", 0, 69.0, best=70.0)
    _run(runs, "imagenet/resnet152_pskd", 1, 69.0, best=70.2)
    # One LS run trained with another recipe than the preset: footnoted.
    _run(runs, "imagenet/resnet152_ls", 0, 60.0, best=61.0, overrides=("epochs=1",))

    index = write_paper_report([runs], tmp_path / "out")
    (results,), strays = paper_results(find_runs([runs]))
    assert strays == []
    cells = {(r.cell.row, r.cell.column): r for r in results}
    assert [(r.cell.row, r.cell.column) for r in results] == [
        (row, col) for row in ("DenseNet-264", "ResNet-152") for col in ("Baseline", "LS", "CS-KD", "TF-KD", "PS-KD")]

    base = cells["ResNet-152", "Baseline"]
    errors = [100 - 78.0, 100 - 77.5]  # the best epoch, as errors
    assert base.n == 2 and base.mean == pytest.approx(sum(errors) / 2, abs=1e-12)
    assert base.std == pytest.approx(_std(errors), abs=1e-12)
    assert base.paper == pytest.approx(100 - 77.81, abs=1e-12)
    assert base.delta == pytest.approx(sum(errors) / 2 - (100 - 77.81), abs=1e-12)
    assert base.outside is False  # |Δ| = 0.06 < 2 std = 0.71

    pskd = cells["ResNet-152", "PS-KD"]
    assert pskd.mean == pytest.approx(29.9, abs=1e-12) and pskd.delta == pytest.approx(29.9 - 21.41, abs=1e-12)
    assert pskd.outside is True
    ls = cells["ResNet-152", "LS"]
    assert ls.n == 1 and ls.std is None and ls.outside is None and ls.differs == ["epochs=1"]
    densenet = cells["DenseNet-264", "Baseline"]
    assert densenet.cell.preset is None and densenet.paper == pytest.approx(22.15, abs=1e-12) and densenet.n == 0

    text = index.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| | Baseline | LS | CS-KD | TF-KD | PS-KD |" in text
    assert "**22.25** ± 0.35 (n=2) · paper 22.19 · Δ +0.06 |" in rows["ResNet-152"]
    assert "**29.90** ± 0.14 (n=2) · paper 21.41 · Δ +8.49 ⚠" in rows["ResNet-152"]
    assert "paper 22.15 · not run [1]" in rows["DenseNet-264"]
    assert "- [1] quoted from the DenseNet paper" in text and "runs differ from the preset: epochs=1" in text
    assert "paper 21.61 · no run" in rows["ResNet-152"]  # CS-KD: a cell without runs

    with open(tmp_path / "out" / "paper.csv") as f:
        table = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    assert float(table["ResNet-152", "Baseline"]["skd_mean"]) == pytest.approx(22.25, abs=1e-12)
    assert float(table["ResNet-152", "Baseline"]["skd_std"]) == pytest.approx(_std(errors), abs=1e-12)
    assert table["ResNet-152", "PS-KD"]["outside"] == "True" and table["ResNet-152", "Baseline"]["n"] == "2"
    assert table["DenseNet-264", "LS"]["note"] == "the README has no DenseNet-264 entry for this method"

    # Another metric the paper reports (PS-KD's ECE, reference.expected_other), not printed as an error.
    (by_ece,), _ = paper_results(find_runs([runs]), "ece")
    ece = {(r.cell.row, r.cell.column): r for r in by_ece}["ResNet-152", "Baseline"]
    assert (ece.mean, ece.paper, ece.std) == (2.0, 3.84, 0.0) and ece.delta == pytest.approx(2.0 - 3.84, abs=1e-12)

    fig = paper_figure(results)
    fig.draw_without_rendering()
    (ax,) = fig.axes
    (identity,) = [line for line in ax.lines if line.get_label() == "y = x"]
    # The line runs over every plotted point with its error bars, along both axes.
    points = [r for r in results if r.mean is not None and r.paper is not None]
    assert len(points) == 3
    low = min(min(r.paper - (r.paper_std or 0), r.mean - (r.std or 0)) for r in points)
    high = max(max(r.paper + (r.paper_std or 0), r.mean + (r.std or 0)) for r in points)
    for data in (identity.get_xdata(), identity.get_ydata()):
        assert min(data) < low and max(data) > high
    assert ax.get_xlim()[0] <= min(data) and ax.get_xlim()[1] >= max(data)
    # The legend lies below the axes, off the data.
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert ax.get_legend() is None
    box, axes = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.y1 <= axes.y0 and fig.bbox.y0 <= box.y0
    assert [t.get_text() for t in legend.get_texts()] == ["y = x", "outside (⚠)", "within",
                                                          "one run, no paper ±: not judged"]
    assert (tmp_path / "out" / "paper-pskd-imagenet.png").stat().st_size > 10_000


def test_paper_std_decides_the_mark_and_the_cli_prints_the_table(tmp_path, capsys):
    """CS-KD publishes ± (in accuracy units, also shown for errors): skd within it is unmarked."""
    runs = tmp_path / "runs"
    _run(runs, "cifar100/preact_resnet18_ce_200ep", 0, 50.0, best=75.40)  # paper 75.29 ± 0.24 (err 24.71)
    _run(runs, "cifar100/preact_resnet18_cskd_200ep", 0, 50.0, best=77.60)  # paper 78.01 ± 0.13: outside
    assert report_main([str(runs), "--paper", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "**24.60** (n=1) · paper 24.71 ± 0.24 · Δ -0.11 |" in out
    assert "**22.40** (n=1) · paper 21.99 ± 0.13 · Δ +0.41 ⚠" in out
    assert "| CIFAR-100 |" in out and "| MIT67 |" in out


def test_a_cell_never_mixes_two_experiments(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "imagenet/resnet152_ce", 0, 70.0)
    _run(runs, "imagenet/resnet152_ce", 1, 70.0, overrides=("optim.lr=0.2",))
    with pytest.raises(PaperReportError, match=r"would mix two experiments.*optim.lr"):
        write_paper_report([runs], tmp_path / "out")
    assert report_main([str(runs), "--paper", "--out", str(tmp_path / "out")]) == 2


def test_a_diverged_run_and_run_folders_given_twice(tmp_path, capsys):
    """An infinite or NaN value makes the cell's mean infinite or NaN (std NaN), marked, left out
    of the figure; a run folder given again, or inside another folder given, counts once."""
    runs = tmp_path / "runs"
    _run(runs, "imagenet/resnet152_ce", 0, 70.0, best=78.0)
    diverged = _run(runs, "imagenet/resnet152_ce", 1, 70.0, best=math.inf)
    _run(runs, "imagenet/resnet152_pskd", 0, 69.0, best=math.nan)
    _run(runs, "imagenet/resnet152_pskd", 1, 69.0, best=79.0)
    assert report_main([str(runs), str(diverged), str(runs), "--paper", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "**-inf** ± nan (n=2) · paper 22.19 · Δ -inf ⚠" in out  # errors: 100 - inf
    assert "**nan** ± nan (n=2) · paper 21.41 · Δ +nan ⚠" in out
    (results,), _ = paper_results(find_runs([runs, diverged, runs / ".." / "runs"]))
    cells = {(r.cell.row, r.cell.column): r for r in results}
    assert cells["ResNet-152", "Baseline"].n == 2 and cells["ResNet-152", "PS-KD"].n == 2
    assert math.isinf(cells["ResNet-152", "Baseline"].mean) and math.isnan(cells["ResNet-152", "Baseline"].std)
    with open(tmp_path / "out" / "paper.csv") as f:
        table = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    assert (table["ResNet-152", "Baseline"]["skd_mean"], table["ResNet-152", "Baseline"]["n"]) == ("-inf", "2")
    fig = paper_figure(results)
    fig.draw_without_rendering()
    (ax,) = fig.axes
    assert all(np.isfinite(ax.get_xlim())) and all(np.isfinite(ax.get_ylim()))
    assert not [line for line in ax.lines if line.get_label() == "y = x"]  # no cell left to plot
    assert "no cell has both a run and a paper number" in [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("extra", [["--paper", "--group-by", "seed"], ["--metric", "ece"]])
def test_options_that_do_not_go_together_are_refused(tmp_path, capsys, extra):
    run = _run(tmp_path / "runs", "imagenet/resnet152_ce", 0, 70.0)
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(run), "--out", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert ("--group-by does not apply with --paper" if "--paper" in extra else "--metric applies only with --paper") \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_runs_that_differ_only_in_a_key_that_applies_to_neither_are_one_experiment(tmp_path):
    """Two AdamW runs with another optim.momentum (which AdamW never reads) are one cell, as
    ``skd report --group-by seed`` groups them, and the key is no ‡ difference from the preset."""
    runs = tmp_path / "runs"
    for seed, momentum in ((0, 0.9), (1, 0.5)):
        run = _run(runs, "imagenet/resnet152_ce", seed, 70.0)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["optim"].update(opt="adamw", momentum=momentum)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    (results,), _ = paper_results(find_runs([runs]))
    cell = next(r for r in results if r.n)
    assert cell.n == 2 and not any("momentum" in d for d in cell.differs)
