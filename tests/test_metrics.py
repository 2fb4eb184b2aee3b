"""skd.metrics against hand-computed values (PS-KD conventions, docs/methods.md §8)."""
import math
import re

import numpy as np
import pytest
import torch

from skd import metrics
from skd.errors import DataError, MissingFileError


def _two_class(confs, correct):
    """Rows [c, 1−c] (or [1−c, c] when c is the second class's probability) with labels."""
    probs = torch.tensor([[c, 1 - c] for c in confs], dtype=torch.float64)
    labels = torch.tensor([0 if ok else 1 for ok in correct])
    return probs, labels


def test_ece_hand_computed():
    # bins (.9,1]: .95 right → .05; (.8,.9]: .85 wrong → .85; (.7,.8]: .75 right → .25;
    # (.6,.7]: .62 right + .65 wrong → |0.5 − 0.635| = .135 for 2 samples.
    probs, labels = _two_class([0.95, 0.85, 0.75, 0.62, 0.65], [1, 0, 1, 1, 0])
    assert metrics.ece(probs, labels) == pytest.approx(100 * (0.05 + 0.85 + 0.25 + 2 * 0.135) / 5)


def test_ece_bins_are_right_closed():
    # 0.9 belongs to (0.8, 0.9], not to (0.9, 1.0]: 52.5 %; a left-closed binning gives 42.5 %.
    probs, labels = _two_class([0.9, 0.95], [1, 0])
    assert metrics.ece(probs, labels) == pytest.approx(52.5)


def test_aurc_and_eaurc_hand_computed():
    # Sorted by confidence: right, wrong, right, wrong → risks 0, 1/2, 1/3, 2/4.
    probs, labels = _two_class([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    aurc = (0 + 1 / 2 + 1 / 3 + 2 / 4) / 4
    optimal = (1 / 3 + 2 / 4) / 4  # both errors ranked last: risks 0, 0, 1/3, 2/4
    assert metrics.aurc(probs, labels) == pytest.approx(1000 * aurc)
    assert metrics.eaurc(probs, labels) == pytest.approx(1000 * (aurc - optimal))


def test_perfect_ranking_has_zero_eaurc():
    probs, labels = _two_class([0.99, 0.9, 0.7, 0.6], [1, 1, 0, 0])
    assert metrics.eaurc(probs, labels) == pytest.approx(0.0, abs=1e-9)


def test_topk_and_nll():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    assert metrics.topk_accuracy(probs, labels, 1) == pytest.approx(100 / 3)
    assert metrics.topk_accuracy(probs, labels, 2) == pytest.approx(200 / 3)
    assert metrics.nll(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.2) + math.log(0.1)) / 3)


def test_summary_from_logits_matches_probability_functions():
    logits = torch.randn(200, 10, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (200,))
    probs = logits.softmax(1)
    from_logits = metrics.summarize(metrics.sample_stats_from_log_probs(logits.log_softmax(1), labels))
    assert from_logits["top1"] == pytest.approx(metrics.topk_accuracy(probs, labels, 1))
    assert from_logits["top5"] == pytest.approx(metrics.topk_accuracy(probs, labels, 5))
    assert from_logits["nll"] == pytest.approx(metrics.nll(probs, labels))
    assert from_logits["ece"] == pytest.approx(metrics.ece(probs, labels))
    assert from_logits["aurc"] == pytest.approx(metrics.aurc(probs, labels))
    assert from_logits["eaurc"] == pytest.approx(metrics.eaurc(probs, labels))
    assert from_logits["num_samples"] == 200
    assert metrics.classification_metrics(probs, labels) == pytest.approx(from_logits)


def test_results_table_stays_aligned_for_any_value():
    """The table a run prints (``format_table``): every column keeps its width, whatever a diverged
    run's values are."""
    from skd.evaluate import format_table

    good = {"top1": 99.17, "top5": 100.0, "nll": 0.093, "ece": 7.02, "aurc": 0.09, "eaurc": 0.04}
    wild = {"top1": -1e12, "top5": 0.0, "nll": 2.3e11, "ece": float("inf"), "aurc": float("nan"), "eaurc": 1e300}
    lines = format_table({**good, "ema": wild, "best": {"epoch": 11, **good}}, title="t").splitlines()[1:]
    assert lines[1].split() == ["model", "0.83", "0.00", "0.093", "7.02", "0.09", "0.04"]
    widths = [14, 10, 10, 9, 8, 9, 9]  # the row name, then the six columns
    for line in lines[1:]:
        assert len(line) == sum(widths), "\n".join(lines)
        starts = [sum(widths[:i]) for i in range(len(widths))]
        cells = [line[a:a + w] for a, w in zip(starts[1:], widths[1:])]
        assert all(c.startswith(" ") and c.strip() for c in cells), "\n".join(lines)
    assert lines[2].split()[1:] == ["1.000e+12", "100.00", "2.30e+11", "inf", "nan", "1.0e+300"]


def test_loading_a_missing_predictions_file_names_it_and_the_command_that_writes_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    missing = run / "predictions_best.npz"
    with pytest.raises(MissingFileError, match=rf"predictions file {re.escape(str(missing))} does not exist.*"
                                               rf"`skd eval {re.escape(str(run))} --predictions "
                                               rf"{re.escape(str(missing))}`"):
        metrics.Predictions.load(missing)
    elsewhere = tmp_path / "predictions.npz"  # not in a run directory: the command has a placeholder
    with pytest.raises(MissingFileError, match=rf"`skd eval RUN_DIR --predictions {re.escape(str(elsewhere))}`"):
        metrics.Predictions.load(elsewhere)


def test_an_npz_that_is_not_a_predictions_file_is_refused_by_name(tmp_path):
    np.savez(tmp_path / "other.npz", index=np.arange(3))
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'other.npz'))}: not a predictions file \(no label"):
        metrics.Predictions.load(tmp_path / "other.npz")
