"""Classification and calibration metrics with the PS-KD conventions (METHODS.md §8).

Top-1/top-5 accuracy (%), NLL, ECE (10 equal-width bins, left-open right-closed, %), AURC and
E-AURC (×1000). The public functions take softmax probabilities ``[N, C]``. They are built on
per-sample statistics (confidence, correctness, NLL), which is also what distributed evaluation
gathers across ranks: four numbers per sample instead of C.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["topk_accuracy", "nll", "ece", "aurc", "eaurc", "classification_metrics",
           "SampleStats", "sample_stats", "summarize"]


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

    def stack(self) -> torch.Tensor:
        return torch.stack([self.confidence, self.correct, self.correct5, self.nll], dim=1)

    @classmethod
    def unstack(cls, rows: torch.Tensor) -> SampleStats:
        return cls(*rows.unbind(1))


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


def _ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    bin_size = 1.0 / n_bins
    total = len(confidence)
    err = 0.0
    # Bin edges built exactly as the official code builds them (np.arange float edges).
    for upper in np.arange(bin_size, 1 + bin_size, bin_size)[:n_bins]:
        in_bin = (confidence > upper - bin_size) & (confidence <= upper)
        n = int(in_bin.sum())
        if n:
            err += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * n / total
    return float(100.0 * err)


def _aurc_pair(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    n = len(confidence)
    order = np.argsort(confidence)[::-1]
    errors = 1.0 - correct[order]
    risk = np.cumsum(errors) / np.arange(1, n + 1)
    aurc_value = float(risk.mean())
    r = int(round(errors.sum()))
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
        "ece": _ece(conf, correct, n_bins),
        "aurc": aurc_value,
        "eaurc": eaurc_value,
        "num_samples": len(conf),
    }


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
    return _ece(s.confidence.double().numpy(), s.correct.double().numpy(), n_bins)


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve, ×1000."""
    s = sample_stats(probs, labels)
    return _aurc_pair(s.confidence.double().numpy(), s.correct.double().numpy())[0]


def eaurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Excess AURC over a perfect confidence ranking with the same errors, ×1000."""
    s = sample_stats(probs, labels)
    return _aurc_pair(s.confidence.double().numpy(), s.correct.double().numpy())[1]


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, float]:
    return summarize(sample_stats(probs, labels), n_bins)
