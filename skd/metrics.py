"""Classification and calibration metrics with the PS-KD conventions (docs/methods.md §8).

Top-1/top-5 accuracy (%), NLL, ECE (10 equal-width bins, left-open right-closed, %), AURC and
E-AURC (×1000). The public functions take softmax probabilities ``[N, C]``. They are built on
per-sample statistics (confidence, correctness, NLL), which is also what distributed evaluation
gathers across ranks: a few numbers per sample instead of C. ``Predictions`` holds them with the
sample ids (the ``predictions.npz`` a run writes); ``calibration_bins`` and ``risk_coverage`` are
the bins and the curve behind ECE and AURC, shared with the report's figures.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skd.errors import DataError, MissingFileError

__all__ = ["topk_accuracy", "nll", "ece", "aurc", "eaurc", "classification_metrics",
           "SampleStats", "sample_stats", "sample_stats_from_log_probs", "summarize",
           "CalibrationBins", "calibration_bins", "risk_coverage", "Predictions"]


@dataclass
class SampleStats:
    """Per-sample statistics, 1-D tensors of equal length."""

    confidence: torch.Tensor
    """Max softmax probability."""
    correct: torch.Tensor
    """1.0 where the argmax is the label."""
    correct5: torch.Tensor
    """1.0 where the label is among the 5 most probable classes (all classes if C < 5)."""
    nll: torch.Tensor
    """−log p(label)."""


def _stats(confidence: torch.Tensor, pred: torch.Tensor, scores: torch.Tensor,
           label_log_prob: torch.Tensor, labels: torch.Tensor) -> SampleStats:
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return SampleStats(
        confidence=confidence,
        correct=(pred == labels).to(confidence.dtype),
        correct5=(top5 == labels[:, None]).any(dim=1).to(confidence.dtype),
        nll=-label_log_prob,
    )


def sample_stats(probs: torch.Tensor, labels: torch.Tensor) -> SampleStats:
    """Per-sample statistics from softmax probabilities (kept in their own precision)."""
    confidence, pred = probs.max(dim=1)
    p_label = probs.gather(1, labels[:, None]).squeeze(1)
    return _stats(confidence, pred, probs, p_label.clamp_min(torch.finfo(probs.dtype).tiny).log(), labels)


def sample_stats_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> SampleStats:
    """The same from log-probabilities (exact NLL where a probability would underflow)."""
    max_log_prob, pred = log_probs.max(dim=1)
    return _stats(max_log_prob.exp(), pred, log_probs, log_probs.gather(1, labels[:, None]).squeeze(1), labels)


@dataclass
class CalibrationBins:
    """The equal-width confidence bins of ECE: bin ``i`` holds ``lower[i] < confidence ≤ upper[i]``.

    The edges are built exactly as PS-KD's official code builds them (``np.arange`` float edges,
    so an upper edge may be ``0.30000000000000004``). ``ece`` and the reliability diagrams of
    ``skd report`` both read these bins, so the picture and the number cannot disagree.
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    """Samples in each bin (int64)."""
    accuracy: np.ndarray
    """Fraction correct in each bin; NaN where the bin is empty."""
    confidence: np.ndarray
    """Mean confidence in each bin; NaN where the bin is empty."""
    num_samples: int
    """All samples, the weight's denominator (a confidence of exactly 0 lies in no bin)."""

    @property
    def ece(self) -> float:
        """Σ |accuracy − confidence| · count / num_samples over the non-empty bins, in %."""
        err = 0.0
        for n, acc, conf in zip(self.count, self.accuracy, self.confidence):
            if n:
                err += abs(acc - conf) * n / self.num_samples
        return float(100.0 * err)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> CalibrationBins:
    """Per-sample confidence and correctness (1-D arrays) sorted into ``n_bins`` equal-width bins."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    bin_size = 1.0 / n_bins
    upper = np.arange(bin_size, 1 + bin_size, bin_size)[:n_bins]
    lower = upper - bin_size
    count = np.zeros(n_bins, dtype=np.int64)
    accuracy, mean_conf = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    for i in range(n_bins):
        in_bin = (confidence > lower[i]) & (confidence <= upper[i])
        count[i] = in_bin.sum()
        if count[i]:
            accuracy[i], mean_conf[i] = correct[in_bin].mean(), confidence[in_bin].mean()
    return CalibrationBins(lower, upper, count, accuracy, mean_conf, len(confidence))


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The risk–coverage curve that AURC integrates: samples taken by confidence, highest first;
    at coverage k/N the risk is the error rate of those k samples. Returns (coverage, risk)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    order = np.argsort(confidence)[::-1]
    risk = np.cumsum(1.0 - correct[order]) / np.arange(1, n + 1)
    return np.arange(1, n + 1) / n, risk


def _aurc_pair(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    n = len(confidence)
    aurc_value = float(risk_coverage(confidence, correct)[1].mean())
    r = int(round(n - correct.sum()))
    k = np.arange(1, r + 1)
    optimal = float((k / (n - r + k)).sum() / n)
    return 1000.0 * aurc_value, 1000.0 * (aurc_value - optimal)


def summarize(stats: SampleStats, n_bins: int = 10) -> dict[str, float]:
    """All metrics from per-sample statistics: top1, top5, nll, ece, aurc, eaurc."""
    conf = stats.confidence.double().cpu().numpy()
    correct = stats.correct.double().cpu().numpy()
    aurc_value, eaurc_value = _aurc_pair(conf, correct)
    return {
        "top1": 100.0 * float(correct.mean()),
        "top5": 100.0 * float(stats.correct5.double().mean()),
        "nll": float(stats.nll.double().mean()),
        "ece": calibration_bins(conf, correct, n_bins).ece,
        "aurc": aurc_value,
        "eaurc": eaurc_value,
        "num_samples": len(conf),
    }


@dataclass
class Predictions:
    """Per-sample results of one evaluation, sorted by sample id: the content of ``predictions.npz``.

    Every array has one entry per evaluated sample (corrupt samples have none). ``metrics()``
    recomputes exactly the metrics the evaluation reported, from these arrays alone.
    """

    index: np.ndarray
    """Global sample id (int64), ascending, each once."""
    label: np.ndarray
    """True class (int64)."""
    pred: np.ndarray
    """Predicted class, the argmax (int64)."""
    confidence: np.ndarray
    """Max softmax probability (float32)."""
    true_prob: np.ndarray
    """Softmax probability of the true class (float32)."""
    nll: np.ndarray
    """−log p(true class) from the log-softmax (float32): exact where ``true_prob`` underflows."""
    in_top5: np.ndarray
    """The true class is among the 5 most probable (bool; all classes when there are fewer)."""
    num_corrupt: int = 0
    """Samples skipped because their image did not decode."""
    probs: np.ndarray | None = None
    """All softmax probabilities ``[N, C]`` (float32), when asked for."""

    FIELDS = ("index", "label", "pred", "confidence", "true_prob", "nll", "in_top5")

    def stats(self) -> SampleStats:
        return SampleStats(confidence=_float32(self.confidence), correct=_float32(self.pred == self.label),
                           correct5=_float32(self.in_top5), nll=_float32(self.nll))

    def metrics(self, n_bins: int = 10) -> dict[str, Any]:
        """The evaluation's metrics (``summarize``) and ``num_corrupt``."""
        return {**summarize(self.stats(), n_bins), "num_corrupt": self.num_corrupt}

    def save(self, path: str | Path) -> None:
        """Write ``path`` (an ``.npz``) through a temporary file, so it is whole or absent."""
        path = Path(path)
        arrays = {k: getattr(self, k) for k in self.FIELDS}
        arrays["num_corrupt"] = np.int64(self.num_corrupt)
        if self.probs is not None:
            arrays["probs"] = self.probs
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        """Read a file written by ``save`` (a run's ``predictions.npz`` or ``predictions_best.npz``,
        or the ``--predictions`` file of ``skd eval``), never unpickling; a missing, damaged or
        foreign file is an ``SkdError`` naming it."""
        path = Path(path)
        if not path.is_file():
            run = path.parent if (path.parent / "config.yaml").is_file() else "RUN_DIR"
            raise MissingFileError(f"predictions file {path} does not exist: a run writes predictions.npz "
                                   f"when it finishes, and `skd eval {run} --predictions {path}` writes "
                                   f"one for any run, checkpoint or exported model")
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    arrays = {k: data[k] for k in data.files}
            else:  # a bare .npy array
                arrays = {}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # numpy's for a damaged file
            raise DataError(f"{path}: not a readable predictions file ({type(e).__name__}: {e})") from None
        missing = [k for k in (*cls.FIELDS, "num_corrupt") if k not in arrays]
        if missing:
            raise DataError(f"{path}: not a predictions file (no {', '.join(missing)})")
        return cls(**{k: arrays[k] for k in cls.FIELDS}, num_corrupt=int(arrays["num_corrupt"]),
                   probs=arrays.get("probs"))


def _float32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of rows whose label is among the k most probable classes."""
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels."""
    return float(sample_stats(probs, labels).nll.double().mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error in %, 10 equal-width bins, membership lower < conf ≤ upper."""
    s = sample_stats(probs, labels)
    return calibration_bins(s.confidence.double().numpy(), s.correct.double().numpy(), n_bins).ece


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve, ×1000."""
    s = sample_stats(probs, labels)
    return _aurc_pair(s.confidence.double().numpy(), s.correct.double().numpy())[0]


def eaurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Excess AURC over a perfect confidence ranking with the same errors, ×1000."""
    s = sample_stats(probs, labels)
    return _aurc_pair(s.confidence.double().numpy(), s.correct.double().numpy())[1]


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, float]:
    """Every metric of an evaluation (top-1, top-5, NLL, ECE, AURC, E-AURC, sample count) at once."""
    return summarize(sample_stats(probs, labels), n_bins)
