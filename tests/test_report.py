"""predictions.npz, `skd report` and the reliability diagram, on four tiny real runs: CE and PS-KD,
two seeds each, trained two epochs on 40 digits and evaluated on 30 (one of them corrupt)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skd.config import load_config
from skd.evaluate import main as eval_main
from skd.metrics import SampleStats, calibration_bins, ece, risk_coverage, summarize
from skd.report import main as report_main
from skd.report import reliability_figure
from skd.train import train

pytestmark = pytest.mark.slow

VAL_IDS = [i for i in range(30) if i != 5]  # sample 5 of the validation shards does not decode


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, int], Path]:
    from test_data_loader import write_shards
    root = tmp_path_factory.mktemp("report")
    train_dir = write_shards(root / "train", [20, 20])
    val_dir = write_shards(root / "val", [12, 12, 6], corrupt={5})
    common = ["model.name=resnet8_cifar", "log_with=[]", "data.num_workers=0", "data.batch_size=10",
              "data.img_size=16", "data.train_crop=pad_crop", "data.crop_pct=1.0", "sched.warmup_epochs=0",
              "epochs=2", f"data.train={train_dir}", f"data.val={val_dir}", "data.max_corrupt_fraction=0.1"]
    out = {}
    for method in ("ce", "pskd"):
        for seed in (0, 1):
            run = root / f"{method}-s{seed}"
            # Keys that never change a result differ between runs: grouping must ignore them.
            extra = {("ce", 0): ["log_with=[tensorboard]"], ("pskd", 1): ["save_probs=true"]}.get((method, seed), [])
            train(load_config(None, common + [f"method.name={method}", f"seed={seed}", f"output_dir={run}",
                                              *extra]))
            out[method, seed] = run
    return out


def _float32(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _stats_from_file(data) -> SampleStats:
    """The four per-sample statistics, rebuilt from the file's arrays alone."""
    return SampleStats(confidence=_float32(data["confidence"]), correct=_float32(data["pred"] == data["label"]),
                       correct5=_float32(data["in_top5"]), nll=_float32(data["nll"]))


def test_predictions_reproduce_metrics_json_exactly(runs):
    for run in runs.values():
        saved = json.loads((run / "metrics.json").read_text())
        best = saved.pop("best")
        for name, expected in (("predictions.npz", saved), ("predictions_best.npz", best)):
            with np.load(run / name) as data:
                assert data["index"].tolist() == VAL_IDS  # each sample once, by id; the corrupt one absent
                assert data["label"].tolist() == [i % 10 for i in VAL_IDS]  # the shards' labels
                assert int(data["num_corrupt"]) == 1
                assert np.allclose(data["true_prob"], np.exp(-data["nll"].astype(np.float64)), rtol=1e-6)
                recomputed = {**summarize(_stats_from_file(data)), "num_corrupt": int(data["num_corrupt"])}
            assert recomputed == {k: v for k, v in expected.items() if k != "epoch"}
    assert best["epoch"] in (0, 1)


def test_save_probs_keeps_every_probability(runs):
    with np.load(runs["pskd", 1] / "predictions.npz") as data:
        probs = data["probs"]
        assert probs.shape == (len(VAL_IDS), 10)
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
        assert (probs.argmax(1) == data["pred"]).all()
        assert np.allclose(probs.max(1), data["confidence"], rtol=1e-6)
        assert np.allclose(probs[np.arange(len(probs)), data["label"]], data["true_prob"], rtol=1e-5, atol=1e-7)
        top5 = np.argsort(-probs, axis=1)[:, :5]
        assert ((top5 == data["label"][:, None]).any(1) == data["in_top5"]).all()
    with np.load(runs["pskd", 0] / "predictions.npz") as data:
        assert "probs" not in data  # off by default


def test_skd_eval_writes_the_same_predictions(runs, tmp_path):
    run = runs["ce", 1]
    out = tmp_path / "eval.npz"
    assert eval_main([str(run), "data.num_workers=0", "--predictions", str(out)]) == 0
    with np.load(out) as ours, np.load(run / "predictions.npz") as trained:
        assert sorted(ours.files) == sorted(trained.files)
        for key in ("index", "label", "pred", "in_top5", "num_corrupt"):
            assert np.array_equal(ours[key], trained[key])
        for key in ("confidence", "nll"):
            assert np.allclose(ours[key], trained[key], rtol=1e-5)


def test_reliability_bins_are_the_ece_bins():
    # Values on and next to the official float edges (0.30000000000000004, 0.7000000000000001).
    edges = np.arange(0.1, 1.1, 0.1)
    conf = np.array([0.05, 0.1, 0.1000001, 0.2, 0.3, edges[2], np.nextafter(edges[2], 1), 0.7, edges[6], 1.0])
    expected_bin = [0, 0, 1, 1, 2, 2, 3, 6, 6, 9]  # lower < conf <= upper with the arange edges
    correct = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    bins = calibration_bins(conf, correct)
    assert np.array_equal(bins.upper, edges) and np.array_equal(bins.lower, edges - 0.1)
    assert bins.count.tolist() == np.bincount(expected_bin, minlength=10).tolist()
    for b in range(10):
        members = [i for i, e in enumerate(expected_bin) if e == b]
        if members:
            assert bins.accuracy[b] == pytest.approx(correct[members].mean())
            assert bins.confidence[b] == pytest.approx(conf[members].mean())
        else:
            assert np.isnan(bins.accuracy[b])
    reference = sum(abs(correct[m].mean() - conf[m].mean()) * len(m) / len(conf)
                    for b in range(10) if (m := [i for i, e in enumerate(expected_bin) if e == b]))
    assert bins.ece == pytest.approx(100 * reference)

    # skd.metrics.ece is computed from the same bins, and the diagram draws exactly them.
    logits = torch.randn(500, 7) * 2
    probs, labels = logits.softmax(1), torch.randint(0, 7, (500,))
    confidence, pred = probs.max(1)
    bins = calibration_bins(confidence.double().numpy(), (pred == labels).double().numpy())
    assert bins.ece == ece(probs, labels)
    top, bottom = reliability_figure(bins).axes
    filled = bins.count > 0
    accuracy_bars = top.patches[:int(filled.sum())]
    assert [p.get_x() for p in accuracy_bars] == pytest.approx(bins.lower[filled].tolist())
    assert [p.get_height() for p in accuracy_bars] == pytest.approx(bins.accuracy[filled].tolist())
    assert [p.get_height() for p in bottom.patches] == pytest.approx((100 * bins.count / 500).tolist())


def test_risk_coverage_is_the_curve_aurc_integrates():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1.0, 0.0, 1.0, 0.0])
    coverage, risk = risk_coverage(conf, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == [0.0, 0.5, 1 / 3, 0.5]
    stats = SampleStats(*(torch.tensor(x) for x in (conf, correct, correct, np.zeros(4))))
    assert summarize(stats)["aurc"] == pytest.approx(1000 * risk.mean())


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _columns(m: dict) -> dict[str, float]:
    return {"top1_err": 100 - m["top1"], "top5_err": 100 - m["top5"], "nll": m["nll"], "ece": m["ece"],
            "aurc": m["aurc"], "eaurc": m["eaurc"]}


def _check_figures(out: Path, count: int) -> None:
    index = (out / "index.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == count
    for png in pngs:
        assert f"]({png.name})" in index  # index.md embeds every figure
        with Image.open(png) as img:
            assert img.format == "PNG" and min(img.size) > 200
            assert len(np.unique(np.asarray(img.convert("L")))) > 10  # something is drawn


def test_report_groups_seeds_into_mean_and_std(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    dirs = [str(runs[k]) for k in sorted(runs)]
    assert report_main([*dirs, "--out", str(out), "--group-by", "seed"]) == 0
    printed = capsys.readouterr().out
    rows = _csv(out / "results.csv")
    assert [(r["run"], r["which"], r["seed"]) for r in rows] == [
        ("ce / resnet8_cifar", "last", "0 1"), ("ce / resnet8_cifar", "best", "0 1"),
        ("pskd / resnet8_cifar", "last", "0 1"), ("pskd / resnet8_cifar", "best", "0 1")]
    markdown = (out / "results.md").read_text()
    assert markdown in printed and markdown in (out / "index.md").read_text()
    for row in rows:
        method = row["run"].split(" /")[0]
        metrics = [json.loads((runs[method, s] / "metrics.json").read_text()) for s in (0, 1)]
        if row["which"] == "best":
            metrics = [m["best"] for m in metrics]
        assert row["epochs"] == " ".join(str(m.get("epoch", 1)) for m in metrics)
        for column, values in zip(_columns(metrics[0]), zip(*(_columns(m).values() for m in metrics))):
            mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
            assert float(row[column]) == pytest.approx(mean, rel=1e-12, abs=1e-12)
            assert float(row[f"{column}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-12)
            digits = 3 if column == "nll" else 2
            assert f"{mean:.{digits}f} ± {std:.{digits}f}" in markdown
    _check_figures(out, 3 + len(runs))  # overlay, risk-coverage, training curves + one per run


def test_report_of_one_run_equals_its_metrics_json(runs, capsys):
    run = runs["pskd", 0]
    assert report_main([str(run)]) == 0
    rows = _csv(run / "report" / "results.csv")
    saved = json.loads((run / "metrics.json").read_text())
    assert [r["which"] for r in rows] == ["last", "best"]
    for row, metrics in zip(rows, (saved, saved["best"])):
        for column, value in _columns(metrics).items():
            assert float(row[column]) == value and row[f"{column}_std"] == ""
    _check_figures(run / "report", 4)
    assert report_main([str(runs["ce", 0]), str(run)]) == 2  # several runs need --out
    assert "--out" in capsys.readouterr().err


def test_runs_are_labelled_by_what_differs(runs, tmp_path):
    out = tmp_path / "all"
    assert report_main([str(runs[k]) for k in sorted(runs)] + ["--out", str(out)]) == 0
    labels = {r["run"] for r in _csv(out / "results.csv")}
    assert labels == {f"{m} / resnet8_cifar (seed={s})" for m in ("ce", "pskd") for s in (0, 1)}


def test_tensorboard_gets_the_reliability_diagram_every_evaluation(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs["ce", 0] / "skd"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("val/reliability")] == [4, 8]  # 4 optimizer steps an epoch


def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys):
    old = tmp_path / "old-run"  # a run from before predictions were saved
    old.mkdir()
    for name in ("config.yaml", "metrics.json", "history.jsonl"):
        (old / name).write_bytes((runs["ce", 0] / name).read_bytes())
    assert report_main([str(old)]) == 2
    assert f"skd eval {old} --predictions" in capsys.readouterr().err
    assert report_main([str(runs["ce", 0]), "--group-by", "sed", "--out", str(tmp_path / "x")]) == 2
    assert "--group-by sed: no run's config has that key" in capsys.readouterr().err
    assert not (old / "report").exists() and not (tmp_path / "x").exists()
