"""Plain-PyTorch versions of the fused losses: the CPU path and the oracle of every kernel test.

Everything is computed in fp32 (or fp64 when the inputs are fp64), whatever the input dtype,
and returns fp32 (fp64) so losses from bf16 logits are not rounded to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["softmax_kl", "pskd_loss", "mixup_cross_entropy", "pskd_topk_loss", "topk_rows_dense"]

REDUCTIONS = ("batchmean", "none")
# What a top-k memory row does with the mass outside its k classes (see topk_rows_dense).
REST_RULES = ("spread", "renormalize")


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_rest(rest: str) -> None:
    if rest not in REST_RULES:
        raise ValueError(f"rest must be one of {REST_RULES}, got {rest!r}")


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


def check_mixing(lam: float | torch.Tensor, partner: torch.Tensor | None,
                 smoothing: float | torch.Tensor) -> None:
    """The mixing arguments of ``pskd_loss`` / ``mixup_cross_entropy`` (tensors are not read)."""
    if partner is None and (isinstance(lam, torch.Tensor) or lam != 1.0):
        raise ValueError("lam is the weight of a row against its partner: pass partner too")
    if not isinstance(smoothing, torch.Tensor) and not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")


def _mixed_onehot(labels: torch.Tensor, partner: torch.Tensor | None, lam: float | torch.Tensor,
                  smoothing: float | torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C``, j = ``partner[i]`` (timm's
    ``mixup_target`` for ``partner = flip``); without a partner ``(1 − ε)·onehot(y_i) + ε/C``."""
    onehot_NC = F.one_hot(labels, num_classes).to(dtype)
    if partner is not None:
        onehot_NC = lam * onehot_NC + (1 - lam) * onehot_NC[partner]
    return (1 - smoothing) * onehot_NC + smoothing / num_classes


def pskd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    index: torch.Tensor,
    alpha: float | torch.Tensor,
    reduction: str = "batchmean",
    *,
    probs_out: torch.Tensor | None = None,
    lam: float | torch.Tensor = 1.0,
    partner: torch.Tensor | None = None,
    smoothing: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``(1 − alpha)·onehot(labels) + alpha·memory[index]``.

    ``memory`` is ``[N, C]`` of past probabilities in any float dtype; the target carries no
    gradient and the memory is not written. If ``probs_out`` (``[B, C]``) is given, the row
    softmax of ``logits`` (T = 1) is written into it, for the memory update after the step.
    With ``partner`` (Mixup/CutMix: the batch row each row is mixed with, j = ``partner[i]``) the
    target is ``(1 − α)·[(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C] +
    α·(λ·memory[index_i] + (1 − λ)·memory[index_j])``, λ = ``lam``, ε = ``smoothing``.
    """
    check_mixing(lam, partner, smoothing)
    z_NC = _acc(logits)
    log_q_NC = F.log_softmax(z_NC, dim=-1)
    onehot_NC = _mixed_onehot(labels, partner, lam, smoothing, z_NC.shape[-1], z_NC.dtype)
    past_NC = memory[index].to(z_NC.dtype)
    if partner is not None:
        past_NC = lam * past_NC + (1 - lam) * past_NC[partner]
    target_NC = ((1 - alpha) * onehot_NC + alpha * past_NC).detach()
    rows_N = -(target_NC * log_q_NC).sum(-1)
    if probs_out is not None:
        probs_out.copy_(log_q_NC.detach().exp())
    return reduce_rows(rows_N, reduction)


def mixup_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "batchmean",
    *,
    lam: float | torch.Tensor = 1.0,
    partner: torch.Tensor | None = None,
    smoothing: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ``(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C``,
    j = ``partner[i]`` (timm's ``mixup_target``); without a partner the label-smoothed one-hot."""
    check_mixing(lam, partner, smoothing)
    z_NC = _acc(logits)
    target_NC = _mixed_onehot(labels, partner, lam, smoothing, z_NC.shape[-1], z_NC.dtype)
    rows_N = -(target_NC.detach() * F.log_softmax(z_NC, dim=-1)).sum(-1)
    return reduce_rows(rows_N, reduction)


def topk_rows_dense(values: torch.Tensor, ids: torch.Tensor, num_classes: int,
                    rest: str = "spread") -> torch.Tensor:
    """The ``[B, C]`` distributions that top-k memory rows stand for, in fp32 (fp64 for fp64 values).

    Row ``i`` holds the probabilities ``values[i]`` of its ``k`` distinct classes ``ids[i]``.
    ``rest="spread"``: the remaining mass ``max(0, 1 − Σ values)`` is spread evenly over the other
    ``C − k`` classes; ``"renormalize"``: it is dropped and the ``k`` values rescaled to sum to 1.
    A row whose values are all 0 was never written and stands for zeros, as in the dense memory.
    """
    check_rest(rest)
    v_BK = _acc(values)
    k = v_BK.shape[-1]
    v_sum = v_BK.sum(-1, keepdim=True)
    written = v_sum > 0
    if rest == "spread":
        other = torch.where(written, (1 - v_sum).clamp(min=0), 0) / max(num_classes - k, 1)
        dense = other.expand(v_BK.shape[0], num_classes).clone()
    else:
        v_BK = torch.where(written, v_BK / torch.where(written, v_sum, 1), 0)
        dense = v_BK.new_zeros(v_BK.shape[0], num_classes)
    return dense.scatter_(-1, ids.long(), v_BK)


def pskd_topk_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    memory_values: torch.Tensor,
    memory_ids: torch.Tensor,
    index: torch.Tensor,
    alpha: float | torch.Tensor,
    reduction: str = "batchmean",
    *,
    rest: str = "spread",
    values_out: torch.Tensor | None = None,
    ids_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pskd_loss`` with a top-k memory: the past probabilities of row ``index[i]`` are
    ``topk_rows_dense(memory_values[index], memory_ids[index], C, rest)``.

    If ``values_out`` and ``ids_out`` (``[B, k]``) are given, the ``k`` largest probabilities of
    ``softmax(logits)`` and their class ids are written into them, largest first: the new rows of
    the memory. They are chosen by logit (the same order as by probability, without ties that fp32
    rounding of the probabilities would make).
    """
    z_NC = _acc(logits)
    log_q_NC = F.log_softmax(z_NC, dim=-1)
    memory_NC = topk_rows_dense(memory_values[index], memory_ids[index], z_NC.shape[-1], rest)
    onehot_NC = F.one_hot(labels, z_NC.shape[-1]).to(z_NC.dtype)
    target_NC = ((1 - alpha) * onehot_NC + alpha * memory_NC.to(z_NC.dtype)).detach()
    rows_N = -(target_NC * log_q_NC).sum(-1)
    if values_out is not None:
        top_ids = z_NC.detach().topk(values_out.shape[-1], dim=-1).indices
        values_out.copy_(log_q_NC.detach().gather(-1, top_ids).exp())
        ids_out.copy_(top_ids)
    return reduce_rows(rows_N, reduction)
