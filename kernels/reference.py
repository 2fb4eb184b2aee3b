"""Plain-PyTorch versions of the fused losses: the CPU path and the oracle of every kernel test.

Everything is computed in fp32 (or fp64 when the inputs are fp64), whatever the input dtype,
and returns fp32 (fp64) so losses from bf16 logits are not rounded to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["softmax_kl", "pskd_loss"]

REDUCTIONS = ("batchmean", "none")


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(rows_N: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"batchmean"``: the mean over rows; ``"none"``: the rows as they are. (Shared with the
    Triton path.)"""
    check_reduction(reduction)
    return rows_N.mean() if reduction == "batchmean" else rows_N


def softmax_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    *,
    labels: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """``kl_weight·T²·KL(softmax(t/T) ‖ softmax(s/T))`` per row, plus ``ce_weight·CE(s, labels)``
    when ``labels`` is given (the hard-label term of CS-KD and KD, fused in the kernel).

    The teacher gets no gradient. ``reduction="batchmean"`` averages the rows; ``"none"`` returns
    one value per row.
    """
    T = float(temperature)
    s_NC = _acc(student_logits)
    t_NC = _acc(teacher_logits).detach()
    log_q_NC = F.log_softmax(s_NC / T, dim=-1)
    log_p_NC = F.log_softmax(t_NC / T, dim=-1)
    kl_N = (log_p_NC.exp() * (log_p_NC - log_q_NC)).sum(-1) * (T * T)
    rows_N = kl_weight * kl_N
    if labels is not None:
        rows_N = rows_N + ce_weight * F.cross_entropy(s_NC, labels, reduction="none")
    return reduce_rows(rows_N, reduction)


def pskd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    index: torch.Tensor,
    alpha: float | torch.Tensor,
    reduction: str = "batchmean",
    *,
    probs_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``(1 − alpha)·onehot(labels) + alpha·memory[index]``.

    ``memory`` is ``[N, C]`` of past probabilities in any float dtype; the target carries no
    gradient and the memory is not written. If ``probs_out`` (``[B, C]``) is given, the row
    softmax of ``logits`` (T = 1) is written into it, for the memory update after the step.
    """
    z_NC = _acc(logits)
    log_q_NC = F.log_softmax(z_NC, dim=-1)
    onehot_NC = F.one_hot(labels, z_NC.shape[-1]).to(z_NC.dtype)
    target_NC = ((1 - alpha) * onehot_NC + alpha * memory[index].to(z_NC.dtype)).detach()
    rows_N = -(target_NC * log_q_NC).sum(-1)
    if probs_out is not None:
        probs_out.copy_(log_q_NC.detach().exp())
    return reduce_rows(rows_N, reduction)
