"""`skd report` on synthetic run folders (config.yaml, metrics.json, history.jsonl and
predictions.npz written here, no training): which keys label a row, runs with identical configs,
the table with the values a diverged run leaves, and legends that stay inside the figures and off
the axes."""
from __future__ import annotations

import csv
import json
import math
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure

from skd.config import config_to_dict, flat_fields, load_config
from skd.methods import list_methods
from skd.metrics import Predictions, calibration_bins
from skd.report import (GATES, applies, comparison_figures, format_markdown, group_runs, load_run, load_runs,
                        reliability_figure, table_rows, write_csv)
from skd.report import main as report_main

BASE = ["model.name=resnet8_cifar", "method.name=ce", "epochs=3"]


def write_run(path: Path, overrides: list[str], edit: Callable[[dict], None] | None = None, seed: int = 0,
              metrics: dict[str, float] | None = None) -> Path:
    """A finished run's four files: the config of ``overrides`` on the demo defaults (then
    ``edit``ed, for settings this machine cannot validate, such as DALI on a GPU), predictions of
    200 samples drawn from ``seed``, their metrics (``metrics`` replaces some) and 3 epochs."""
    config = config_to_dict(load_config(None, BASE + overrides))
    if edit:
        edit(config)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rng = np.random.default_rng(seed)
    n = 200
    label = rng.integers(0, 10, n)
    confidence = rng.uniform(0.1, 1.0, n)
    correct = rng.random(n) < confidence ** 0.7
    true_prob = np.where(correct, confidence, (1 - confidence) / 9)
    predictions = Predictions(index=np.arange(n), label=label, pred=np.where(correct, label, (label + 1) % 10),
                              confidence=confidence.astype(np.float32), true_prob=true_prob.astype(np.float32),
                              nll=-np.log(true_prob).astype(np.float32), in_top5=correct | (rng.random(n) < 0.8))
    predictions.save(path / "predictions.npz")
    final = {**predictions.metrics(), **(metrics or {})}
    (path / "metrics.json").write_text(json.dumps({**final, "best": {**final, "epoch": 2}}))
    history = [{"epoch": e, "step": 10 * (e + 1), "train_loss": 2.0 / (e + 1) + 0.1 * seed, "lr": 0.1 / (e + 1),
                "top1": final["top1"] * (e + 1) / 3, "nll": final["nll"] * (3 - e), "ece": final["ece"]}
               for e in range(3)]
    (path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return path


def _labels(dirs: list[Path], group_by: str | None = None) -> list[str]:
    return [g.label for g in group_runs([load_run(d) for d in dirs], group_by)]


def _flat_config(overrides: list[str]) -> dict[str, Any]:
    return flat_fields(config_to_dict(load_config(None, BASE + overrides)))


# ------------------------------------------------------------------------------------- labels
def _dali(device: str) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["data"].update(backend="dali", dali_device=device)
    return edit


def test_dali_settings_label_only_dali_runs(tmp_path):
    torch_gpu = write_run(tmp_path / "torch", [])  # the default data.dali_device=gpu, meaningless here
    dali_gpu = write_run(tmp_path / "dali-gpu", [], edit=_dali("gpu"))
    dali_cpu = write_run(tmp_path / "dali-cpu", [], edit=_dali("cpu"))
    torch_cpu = write_run(tmp_path / "torch-cpu", ["data.dali_device=cpu", "data.dali_threads=8"])
    assert _labels([torch_gpu, dali_gpu, dali_cpu]) == [
        "ce / resnet8_cifar (data.backend=torch)",
        "ce / resnet8_cifar (data.backend=dali, data.dali_device=gpu)",
        "ce / resnet8_cifar (data.backend=dali, data.dali_device=cpu)"]
    # A single DALI run: its device is compared with nothing, so it is not named.
    assert _labels([torch_gpu, dali_cpu]) == ["ce / resnet8_cifar (data.backend=torch)",
                                              "ce / resnet8_cifar (data.backend=dali)"]
    # Torch runs that differ only in DALI settings are one experiment: told apart by their folders,
    # and averaged together by --group-by.
    assert _labels([torch_gpu, torch_cpu]) == ["ce / resnet8_cifar [torch]", "ce / resnet8_cifar [torch-cpu]"]
    assert [len(g.runs) for g in group_runs([load_run(torch_gpu), load_run(torch_cpu)], "seed")] == [2]


@pytest.mark.parametrize("runs, labels", [
    # A method's field labels only runs of that method, and a gated one only where it acts:
    # PS-KD's memory_k only with a top-k memory, TF-KD's temperature only in its self mode.
    ([["method.name=pskd", "method.alpha_T=0.8", "method.memory_k=4"],
      ["method.name=pskd", "method.alpha_T=0.5", "method.memory_k=8"],
      ["method.name=tfkd", "method.temperature=3"], ["method.name=tfkd", "method.reg_alpha=0.5"], []],
     ["pskd / resnet8_cifar (method.alpha_T=0.8)", "pskd / resnet8_cifar (method.alpha_T=0.5)",
      "tfkd / resnet8_cifar (method.reg_alpha=0.1)", "tfkd / resnet8_cifar (method.reg_alpha=0.5)",
      "ce / resnet8_cifar"]),
    ([["ema.enabled=true", "ema.decay=0.99"], ["ema.enabled=true", "ema.decay=0.999"], ["ema.decay=0.5"]],
     ["ce / resnet8_cifar (ema.enabled=True, ema.decay=0.99)",
      "ce / resnet8_cifar (ema.enabled=True, ema.decay=0.999)", "ce / resnet8_cifar (ema.enabled=False)"]),
    # Mixup's probability only with Mixup on; min_lr is no parameter of the step schedule.
    ([["mixup.alpha=0.2", "mixup.prob=0.5"], ["mixup.prob=0.7", "sched.sched=step", "sched.min_lr=0.01"],
      ["sched.sched=step"]],
     ["ce / resnet8_cifar (sched.sched=cosine, mixup.alpha=0.2)",
      "ce / resnet8_cifar (sched.sched=step, mixup.alpha=0.0) [1]",
      "ce / resnet8_cifar (sched.sched=step, mixup.alpha=0.0) [2]"]),
], ids=["method-fields", "ema", "mixup-and-schedule"])
def test_gated_keys_label_only_the_runs_they_act_on(tmp_path, runs, labels):
    assert _labels([write_run(tmp_path / str(i), args) for i, args in enumerate(runs)]) == labels


def test_every_gate_names_real_config_keys():
    """A gate on a key no config has would label runs with settings they ignore, silently."""
    fields = {k for name in list_methods() for k in _flat_config([f"method.name={name}"])}
    for gate in GATES:
        assert set(gate.on) <= fields, gate
        assert all(any(fnmatchcase(f, p) for f in fields) for p in gate.keys), gate
        if gate.method:
            assert set(gate.on) <= set(_flat_config([f"method.name={gate.method}"])), gate
    config = _flat_config(["data.train_crop=pad_crop"])
    assert applies("data.crop_padding", config) and not applies("data.scale", config)
    assert not applies("data.dali_hw_decoder_load", config) and not applies("method.alpha_T", config)


# ------------------------------------------------------------------------------ rows and table
def _tables(dirs: list[Path], out: Path, group_by: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The lines of the Markdown table and the rows of the CSV (with the header) for ``dirs``."""
    rows = table_rows(group_runs(load_runs(dirs), group_by), group_by)
    write_csv(rows, out, group_by)
    with open(out, newline="") as f:
        return format_markdown(rows, group_by).splitlines(), list(csv.reader(f))


def _bars(line: str) -> list[int]:
    return [i for i, ch in enumerate(line) if ch == "|"]


def test_identical_configs_stay_apart_unless_grouped(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "run", [], seed=0)
    b = write_run(tmp_path / "b" / "run", [], seed=1)  # the same config, other results: a rerun
    markdown, rows = _tables([a, b], tmp_path / "apart.csv")
    table = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert [(r["run"], r["which"], r["n"], r["top1_err_std"]) for r in table] == [
        ("ce / resnet8_cifar [a/run]", "last", "1", ""), ("ce / resnet8_cifar [a/run]", "best", "1", ""),
        ("ce / resnet8_cifar [b/run]", "last", "1", ""), ("ce / resnet8_cifar [b/run]", "best", "1", "")]
    assert not any("±" in line for line in markdown)
    # Asked for, they are merged: the sample std over the n runs, n shown.
    markdown, rows = _tables([a, b], tmp_path / "grouped.csv", "seed")
    last = dict(zip(rows[0], rows[1]))
    errors = [100 - json.loads((d / "metrics.json").read_text())["top1"] for d in (a, b)]
    assert last["n"] == "2" and float(last["top1_err_std"]) == pytest.approx(np.std(errors, ddof=1), rel=1e-12)
    assert float(last["top1_err_std"]) > 0
    header, _, row = markdown[:3]
    assert [c.strip() for c in header.split("|")][1:4] == ["run", "seed", "n"]
    assert [c.strip() for c in row.split("|")][1:4] == ["ce / resnet8_cifar", "0, 0", "2"]
    # The same folder twice is refused, not shown as two runs.
    assert report_main([str(a), str(a), "--out", str(tmp_path / "twice")]) == 2
    assert f"{a} is given twice" in capsys.readouterr().err


def test_table_stays_aligned_with_huge_nan_and_inf_values(tmp_path):
    values = [{"nll": 2.3e11, "aurc": 12345678.0}, {"nll": math.nan, "ece": math.inf}, {"top1": -math.inf}, {}]
    dirs = [write_run(tmp_path / f"r{i}", [f"optim.lr={lr}"], seed=i, metrics=m)
            for i, (lr, m) in enumerate(zip((0.1, 0.2, 0.3, 0.4), values))]
    lines, rows = _tables(dirs, tmp_path / "results.csv")
    assert all(_bars(line) == _bars(lines[0]) for line in lines)  # every column at the same place
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert cells[0][4] == "NLL" and cells[2][4] == "2.300e+11" and cells[2][6] == "1.23e+07"
    assert cells[4][4] == "nan" and cells[4][5] == "inf" and cells[6][2] == "inf"  # 100 − (−inf)
    # The CSV: one field per header name, full precision that reads back as the same floats.
    assert {len(r) for r in rows} == {len(rows[0])}
    table = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert float(table[0]["nll"]) == 2.3e11 and float(table[0]["aurc"]) == 12345678.0
    assert math.isnan(float(table[2]["nll"])) and float(table[2]["ece"]) == math.inf
    assert float(table[4]["top1_err"]) == math.inf
    # Grouped, a non-finite member makes the std NaN rather than a crash or a made-up number.
    lines, rows = _tables(dirs, tmp_path / "grouped.csv", "optim.lr")
    last = dict(zip(rows[0], rows[1]))
    assert last["n"] == "4" and math.isnan(float(last["nll"])) and math.isnan(float(last["nll_std"]))
    assert float(last["top1_err"]) == math.inf
    assert all(_bars(line) == _bars(lines[0]) for line in lines) and "nan ± nan" in lines[2]


# ------------------------------------------------------------------------------------ figures
def _runs_with_long_labels(root: Path, count: int) -> list[Path]:
    """``count`` runs that differ in several keys, some with long values."""
    specs = [["method.name=pskd", "method.alpha_T=0.8"], ["method.name=pskd", "method.alpha_T=0.5"],
             ["method.name=cskd", "method.lam=3.0"], ["method.name=cskd", "method.lam=1.0"],
             ["optim.lr=0.05", "data.hflip=0.0"], ["optim.lr=0.2", "sched.warmup_epochs=3"]]
    specs += [[f"seed={i}"] for i in range(count - len(specs))]
    weights = "model.checkpoint=/data/shared/checkpoints/imagenet_pretrained_students/experiment_{}.safetensors"
    return [write_run(root / f"run-{i}", [*spec, weights.format(i % 3)], seed=i)
            for i, spec in enumerate(specs[:count])]


def _check_layout(fig: Figure) -> None:
    """The legend lies inside the figure and off every axes' data area; no axes (with its tick
    labels and title) is cut off."""
    renderer = fig.canvas.get_renderer()
    figure = fig.bbox
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, (box, figure)
    for ax in fig.axes:
        assert ax.get_legend() is None
        if ax.axison:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
            tight = ax.get_tightbbox(renderer)  # with tick labels and title
            assert figure.x0 <= tight.x0 and tight.x1 <= figure.x1 and figure.y0 <= tight.y0 and tight.y1 <= figure.y1


@pytest.mark.parametrize("count", [1, 6, 12])
def test_legends_lie_below_the_axes_inside_the_figure(tmp_path, count):
    groups = group_runs([load_run(d) for d in _runs_with_long_labels(tmp_path, count)])
    if count > 1:
        assert max(len(g.label) for g in groups) > 100  # several lines once wrapped
    figures = comparison_figures(groups)
    for name, fig in figures.items():
        if count == 6:
            fig.savefig(tmp_path / name, dpi=110)  # as the report saves it
        else:
            fig.draw_without_rendering()  # the same layout, without the pixels
        _check_layout(fig)
        labels = ["".join(t.get_text().split()) for t in fig.legends[0].get_texts()]  # the lines joined
        assert [label.split(":")[0] for label in labels] == ["".join(g.label.split()) for g in groups]
    lines = figures["risk_coverage.png"].axes[0].get_lines()  # twelve runs: colors repeat, styles differ
    assert len({(str(line.get_color()), line.get_linestyle()) for line in lines}) == count


def test_one_runs_reliability_diagram_wraps_a_long_title(tmp_path):
    run = load_run(write_run(tmp_path / ("a-long-folder-name-" * 6) / "run", []))
    bins = calibration_bins(run.predictions.confidence, run.predictions.pred == run.predictions.label)
    fig = reliability_figure(bins, title=str(run.path))
    fig.draw_without_rendering()
    _check_layout(fig)
    assert fig.axes[0].get_title().replace("\n", "").startswith(str(run.path))
