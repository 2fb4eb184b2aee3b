"""Plain-PyTorch versions of the fused losses: the CPU path and the oracle of every kernel test, and
the argument checks that both paths share (``check_*``: shapes and flags only, never a value on
the device, which would cost a host sync; an out-of-range label or index is not caught).

Everything is computed in fp32 (or fp64 when the inputs are fp64), whatever the input dtype,
and returns fp32 (fp64) so losses from bf16 logits are not rounded to bf16. Logits are
``[..., C]``; every per-row tensor (labels, index, partner) has the logits' leading shape.
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


# ------------------------------------------------------------------------------------------------
# argument checks, one per op (the Triton path runs the same one before its kernels)
# ------------------------------------------------------------------------------------------------
def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_rest(rest: str) -> None:
    if rest not in REST_RULES:
        raise ValueError(f"rest must be one of {REST_RULES}, got {rest!r}")


def _check_per_row(name: str, x: torch.Tensor | None, logits: torch.Tensor) -> None:
    """``x`` holds one entry per row of ``logits`` (a shorter one would be read out of bounds)."""
    if x is not None and x.shape != logits.shape[:-1]:
        raise ValueError(f"{name} must be {tuple(logits.shape[:-1])}, one entry per row of the "
                         f"logits {tuple(logits.shape)}, got {tuple(x.shape)}")


def check_softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str,
                     labels: torch.Tensor | None) -> None:
    """The arguments of ``softmax_kl``: one teacher row and one label per student row."""
    check_reduction(reduction)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    _check_per_row("labels", labels, student_logits)


def check_soft_target(logits: torch.Tensor, labels: torch.Tensor, reduction: str,
                      lam: float | torch.Tensor, partner: torch.Tensor | None,
                      smoothing: float | torch.Tensor, memory: torch.Tensor | None = None,
                      index: torch.Tensor | None = None,
                      probs_out: torch.Tensor | None = None) -> None:
    """The arguments of ``pskd_loss`` and (``memory`` None) ``mixup_cross_entropy``; tensor
    scalars are not read."""
    check_reduction(reduction)
    if partner is None and (isinstance(lam, torch.Tensor) or lam != 1.0):
        raise ValueError("lam is the weight of a row against its partner: pass partner too")
    if not isinstance(smoothing, torch.Tensor) and not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    _check_per_row("labels", labels, logits)
    _check_per_row("partner", partner, logits)
    C = logits.shape[-1]
    if memory is not None:
        if memory.dim() != 2 or memory.shape[1] != C:
            raise ValueError(f"memory must be [N, {C}], got {tuple(memory.shape)}")
        _check_per_row("index", index, logits)
    if probs_out is not None and (probs_out.shape != logits.shape or probs_out.stride(-1) != 1):
        raise ValueError(f"probs_out must be {tuple(logits.shape)} with a unit class stride, got "
                         f"{tuple(probs_out.shape)} with strides {probs_out.stride()}")


def check_pskd_topk(logits: torch.Tensor, labels: torch.Tensor, memory_values: torch.Tensor,
                    memory_ids: torch.Tensor, index: torch.Tensor, reduction: str, rest: str,
                    values_out: torch.Tensor | None, ids_out: torch.Tensor | None) -> None:
    """The arguments of ``pskd_topk_loss``."""
    check_reduction(reduction)
    check_rest(rest)
    C = logits.shape[-1]
    if memory_values.dim() != 2 or memory_ids.shape != memory_values.shape:
        raise ValueError(f"memory_values and memory_ids must both be [N, k], got "
                         f"{tuple(memory_values.shape)} and {tuple(memory_ids.shape)}")
    if memory_ids.dtype != torch.int32:
        raise ValueError(f"memory_ids must be int32, got {memory_ids.dtype}")
    k = memory_values.shape[1]
    if not 1 <= k <= C:
        raise ValueError(f"the memory's k = {k} must be in [1, {C}] (the number of classes)")
    _check_per_row("labels", labels, logits)
    _check_per_row("index", index, logits)
    if (values_out is None) != (ids_out is None):
        raise ValueError("values_out and ids_out go together: give both or neither")
    if values_out is not None:
        expected = (*logits.shape[:-1], k)
        for name, out in (("values_out", values_out), ("ids_out", ids_out)):
            if out.shape != expected or out.stride(-1) != 1:
                raise ValueError(f"{name} must be {expected} with a unit inner stride, got "
                                 f"{tuple(out.shape)} with strides {out.stride()}")
        if ids_out.dtype != torch.int32:
            raise ValueError(f"ids_out must be int32, got {ids_out.dtype}")


def reduce_rows(rows_N: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"batchmean"``: the mean over rows; ``"none"``: the rows as they are (checked by the op's
    ``check_*``). Shared with the Triton path."""
    return rows_N.mean() if reduction == "batchmean" else rows_N


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
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
    check_softmax_kl(student_logits, teacher_logits, reduction, labels)
    T = float(temperature)
    s_NC = _acc(student_logits)
    t_NC = _acc(teacher_logits).detach()
    log_q_NC = F.log_softmax(s_NC / T, dim=-1)
    log_p_NC = F.log_softmax(t_NC / T, dim=-1)
    kl_N = (log_p_NC.exp() * (log_p_NC - log_q_NC)).sum(-1) * (T * T)
    rows_N = kl_weight * kl_N
    if labels is not None:
        ce = F.cross_entropy(s_NC.reshape(-1, s_NC.shape[-1]), labels.reshape(-1), reduction="none")
        rows_N = rows_N + ce_weight * ce.reshape(labels.shape)
    return reduce_rows(rows_N, reduction)


def _mixed_onehot(labels: torch.Tensor, partner: torch.Tensor | None, lam: float | torch.Tensor,
                  smoothing: float | torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C``, j = ``partner[i]`` (timm's
    ``mixup_target`` for ``partner = flip``); without a partner ``(1 − ε)·onehot(y_i) + ε/C``."""
    onehot_NC = F.one_hot(labels, num_classes).to(dtype)
    if partner is not None:
        onehot_NC = lam * onehot_NC + (1 - lam) * onehot_NC[partner]
    return (1 - smoothing) * onehot_NC + smoothing / num_classes


def _soft_target_rows(logits, labels, memory, index, alpha, lam, partner, smoothing):
    """The rows of ``pskd_loss`` (``memory`` None: ``mixup_cross_entropy``) in the logits' leading
    shape, and the row log-softmax as ``[rows, C]``."""
    C = logits.shape[-1]
    z_NC = _acc(logits).reshape(-1, C)
    log_q_NC = F.log_softmax(z_NC, dim=-1)
    partner_N = None if partner is None else partner.reshape(-1)
    target_NC = _mixed_onehot(labels.reshape(-1), partner_N, lam, smoothing, C, z_NC.dtype)
    if memory is not None:
        past_NC = memory[index.reshape(-1)].to(z_NC.dtype)
        if partner_N is not None:
            past_NC = lam * past_NC + (1 - lam) * past_NC[partner_N]
        target_NC = (1 - alpha) * target_NC + alpha * past_NC
    rows_N = -(target_NC.detach() * log_q_NC).sum(-1)
    return rows_N.reshape(logits.shape[:-1]), log_q_NC


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
    check_soft_target(logits, labels, reduction, lam, partner, smoothing, memory, index, probs_out)
    rows, log_q_NC = _soft_target_rows(logits, labels, memory, index, alpha, lam, partner,
                                       smoothing)
    if probs_out is not None:
        probs_out.copy_(log_q_NC.detach().exp().view(probs_out.shape))
    return reduce_rows(rows, reduction)


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
    check_soft_target(logits, labels, reduction, lam, partner, smoothing)
    rows, _ = _soft_target_rows(logits, labels, None, None, 0.0, lam, partner, smoothing)
    return reduce_rows(rows, reduction)


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
    check_pskd_topk(logits, labels, memory_values, memory_ids, index, reduction, rest, values_out,
                    ids_out)
    C = logits.shape[-1]
    z_NC = _acc(logits).reshape(-1, C)
    index_N = index.reshape(-1)
    log_q_NC = F.log_softmax(z_NC, dim=-1)
    memory_NC = topk_rows_dense(memory_values[index_N], memory_ids[index_N], C, rest)
    onehot_NC = F.one_hot(labels.reshape(-1), C).to(z_NC.dtype)
    target_NC = ((1 - alpha) * onehot_NC + alpha * memory_NC.to(z_NC.dtype)).detach()
    rows_N = -(target_NC * log_q_NC).sum(-1)
    if values_out is not None:
        top_ids = z_NC.detach().topk(values_out.shape[-1], dim=-1).indices
        values_out.copy_(log_q_NC.detach().gather(-1, top_ids).exp().view(values_out.shape))
        ids_out.copy_(top_ids.view(ids_out.shape))
    return reduce_rows(rows_N.reshape(logits.shape[:-1]), reduction)
