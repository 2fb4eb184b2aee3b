"""Temperature-scaled KL divergence between two softmaxes, with an optional fused hard-label CE.

Layout (as Liger's ``ops/kl_div.py``): the ``@triton.jit`` kernels, their host launchers, the
autograd Function over custom ops that make the launchers opaque to ``torch.compile`` (built by
``skd_kernels._ops``, shared by every kernel), then the public function, which checks its
arguments and sends CPU tensors to ``skd_kernels.reference`` unless ``TRITON_INTERPRET=1``. The
``@triton.jit`` helpers shared by the kernels are in ``skd_kernels._jit``.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dispatch, _ops, reference
from ._jit import NEG, online_logsumexp, softmax

__all__ = ["softmax_kl"]


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_kl_fwd_kernel(
    s_ptr, s_stride,  # [B, C] student logits, any float dtype; row stride in elements
    t_ptr, t_stride,  # [B, C] teacher logits
    y_ptr,  # [B] integer labels, read if HAS_LABELS
    loss_ptr,  # [B] fp32 out: the loss of each row
    stats_ptr,  # [B, 6] fp32 out: (max, log normaliser) of s/T, t/T and s, for the backward
    B, C,
    inv_T,  # 1 / T
    kl_scale,  # kl_weight * T^2
    ce_weight,
    HAS_LABELS: tl.constexpr,
    CE_OWN_LSE: tl.constexpr,  # labels and T != 1: the CE needs the lse of the unscaled logits
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    s_rows = s_ptr + rows[:, None] * s_stride
    t_rows = t_ptr + rows[:, None] * t_stride

    # One online pass over the row. a = s/T, b = t/T; running maxima m_*, normalisers d_* (sums of
    # exp(x - m)), and w = sum exp(b - m_b) * ((b - m_b) - (a - m_a)), kept centred on the running
    # maxima so that large logits (1e4) do not cancel. Then KL = w/d_b - log d_b + log d_a.
    m_a = tl.full([BLOCK_B], NEG, tl.float32)
    m_b = tl.full([BLOCK_B], NEG, tl.float32)
    m_s = tl.full([BLOCK_B], NEG, tl.float32)
    d_a = tl.zeros([BLOCK_B], tl.float32)
    d_b = tl.zeros([BLOCK_B], tl.float32)
    d_s = tl.zeros([BLOCK_B], tl.float32)
    w = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.where(mask, s * inv_T, NEG)
        b = tl.where(mask, t * inv_T, NEG)
        m_a_new, d_a = online_logsumexp(m_a, d_a, a)
        m_b_new, d_b_new = online_logsumexp(m_b, d_b, b)
        b_c = b - m_b_new[:, None]
        shift = (m_b - m_b_new) - (m_a - m_a_new)  # re-centres w on the new maxima
        w = (tl.exp(m_b - m_b_new) * (w + d_b * shift)
             + tl.sum(tl.exp(b_c) * (b_c - (a - m_a_new[:, None])), axis=1))
        d_b = d_b_new
        m_a = m_a_new
        m_b = m_b_new
        if CE_OWN_LSE:
            m_s, d_s = online_logsumexp(m_s, d_s, tl.where(mask, s, NEG))

    log_d_a = tl.log(d_a)
    log_d_b = tl.log(d_b)
    loss = kl_scale * (w / d_b - log_d_b + log_d_a)
    m_ce = m_a  # T = 1: the CE's softmax is that of a
    log_d_ce = log_d_a
    if HAS_LABELS:
        if CE_OWN_LSE:
            m_ce = m_s
            log_d_ce = tl.log(d_s)
        y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        s_y = tl.load(s_ptr + rows * s_stride + y, mask=row_ok, other=0.0).to(tl.float32)
        loss += ce_weight * (m_ce + log_d_ce - s_y)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    stats = stats_ptr + rows * 6
    tl.store(stats, m_a, mask=row_ok)
    tl.store(stats + 1, log_d_a, mask=row_ok)
    tl.store(stats + 2, m_b, mask=row_ok)
    tl.store(stats + 3, log_d_b, mask=row_ok)
    tl.store(stats + 4, m_ce, mask=row_ok)
    tl.store(stats + 5, log_d_ce, mask=row_ok)


@triton.jit
def _softmax_kl_bwd_kernel(
    g_ptr, g_stride,  # [B] grad of each row's loss (stride 0 when expanded from a mean)
    s_ptr, s_stride,  # [B, C] student logits
    t_ptr, t_stride,  # [B, C] teacher logits
    y_ptr,  # [B] integer labels, read if HAS_LABELS
    stats_ptr,  # [B, 6] fp32: (max, log normaliser) of s/T, t/T and s, from the forward
    ds_ptr,  # [B, C] out, contiguous, the student's dtype: grad of the student logits
    B, C,
    inv_T,
    kl_coef,  # kl_weight * T  (d(T^2 KL)/ds = T (q - p))
    ce_weight,
    HAS_LABELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    g = tl.load(g_ptr + rows * g_stride, mask=row_ok, other=0.0).to(tl.float32)
    stats = stats_ptr + rows * 6
    m_a = tl.load(stats, mask=row_ok, other=0.0)
    log_d_a = tl.load(stats + 1, mask=row_ok, other=0.0)
    m_b = tl.load(stats + 2, mask=row_ok, other=0.0)
    log_d_b = tl.load(stats + 3, mask=row_ok, other=0.0)
    m_ce = tl.load(stats + 4, mask=row_ok, other=0.0)
    log_d_ce = tl.load(stats + 5, mask=row_ok, other=0.0)
    y = tl.zeros([BLOCK_B], tl.int64)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    s_rows = s_ptr + rows[:, None] * s_stride
    t_rows = t_ptr + rows[:, None] * t_stride
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        q = softmax(tl.where(mask, s * inv_T, NEG), m_a, log_d_a)
        p = softmax(tl.where(mask, t * inv_T, NEG), m_b, log_d_b)
        d = kl_coef * (q - p)
        if HAS_LABELS:
            onehot = tl.where(c[None, :] == y[:, None], 1.0, 0.0)
            d += ce_weight * (softmax(tl.where(mask, s, NEG), m_ce, log_d_ce) - onehot)
        tl.store(ds_ptr + rows[:, None] * C + c[None, :],
                 (g[:, None] * d).to(ds_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# host launchers
# ------------------------------------------------------------------------------------------------
def _forward(s_BC: torch.Tensor, t_BC: torch.Tensor, labels_B: Optional[torch.Tensor], temperature: float,
             ce_weight: float, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, C = s_BC.shape
    loss_B = torch.empty(B, dtype=torch.float32, device=s_BC.device)
    stats_B6 = torch.empty(B, 6, dtype=torch.float32, device=s_BC.device)
    if B == 0:
        return loss_B, stats_B6
    block_b, block_c, options = _dispatch.launch_config(B, C, s_BC.device)
    has_labels = labels_B is not None
    _softmax_kl_fwd_kernel[(triton.cdiv(B, block_b),)](
        s_BC, s_BC.stride(0), t_BC, t_BC.stride(0),
        labels_B if has_labels else loss_B, loss_B, stats_B6,
        B, C, 1.0 / temperature, kl_weight * temperature * temperature, ce_weight,
        HAS_LABELS=has_labels, CE_OWN_LSE=has_labels and temperature != 1.0,
        BLOCK_B=block_b, BLOCK_C=block_c, **options,
    )
    return loss_B, stats_B6


def _backward(grad_B: torch.Tensor, s_BC: torch.Tensor, t_BC: torch.Tensor, labels_B: Optional[torch.Tensor],
              temperature: float, ce_weight: float, kl_weight: float, stats_B6: torch.Tensor) -> torch.Tensor:
    B, C = s_BC.shape
    ds_BC = torch.empty((B, C), dtype=s_BC.dtype, device=s_BC.device)
    if B == 0:
        return ds_BC
    block_b, block_c, options = _dispatch.launch_config(B, C, s_BC.device)
    has_labels = labels_B is not None
    _softmax_kl_bwd_kernel[(triton.cdiv(B, block_b),)](
        grad_B, grad_B.stride(0), s_BC, s_BC.stride(0), t_BC, t_BC.stride(0),
        labels_B if has_labels else stats_B6, stats_B6, ds_BC,
        B, C, 1.0 / temperature, kl_weight * temperature, ce_weight,
        HAS_LABELS=has_labels, BLOCK_B=block_b, BLOCK_C=block_c, **options,
    )
    return ds_BC


# ------------------------------------------------------------------------------------------------
# autograd (custom ops + Function, skd_kernels._ops)
# ------------------------------------------------------------------------------------------------
# Per-row loss, with ``a = s/T``, ``b = t/T``, ``q = softmax(a)``, ``p = softmax(b)``:
#
#     loss_i = kl_weight · T² · Σ_c p_c (log p_c − log q_c) + ce_weight · (lse(s_i) − s_{i,y_i})
#
# (the CE term only with labels; it is taken at T = 1 on the raw student logits), and
#
#     ∂loss_i/∂s_i = kl_weight · T · (q − p)  +  ce_weight · (softmax(s_i) − onehot(y_i)).
#
# The forward reads each row once (online max and sum), returns the fp32 row losses and saves
# the max and the log normaliser of each of the row's three softmaxes (kept apart: see
# skd_kernels._jit); the backward recomputes the gradient from the logits and those, scaled by
# the incoming row gradient in fp32, and writes it to a new tensor in the student's dtype.
# Recomputing moves as many bytes as saving the gradient when a row fits in one block, fewer
# when it does not, and keeps no ``[B, C]`` buffer alive between the two passes.
# The teacher gets no gradient; no input is ever written.
SoftmaxKLFunction = _ops.fused_row_loss("softmax_kl", sys.modules[__name__], num_stats=6)


# ------------------------------------------------------------------------------------------------
# public function
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
    when ``labels`` is given, fused in one kernel. Returns fp32: the mean over rows
    (``"batchmean"``) or one value per row (``"none"``).

    Logits are ``[..., C]``, fp32, bf16 or fp16, with any row stride (a class dimension that is
    not contiguous is copied). The teacher gets no gradient. CUDA tensors (and CPU tensors under
    ``TRITON_INTERPRET=1``) run the Triton kernel; other tensors, and float64 ones, run
    ``skd_kernels.reference.softmax_kl``.
    ``temperature``, ``ce_weight`` and ``kl_weight`` are Python numbers.
    """
    if not _dispatch.use_triton(student_logits):
        return reference.softmax_kl(student_logits, teacher_logits, temperature, reduction,
                                    labels=labels, ce_weight=ce_weight, kl_weight=kl_weight)
    reference.check_softmax_kl(student_logits, teacher_logits, reduction, labels)
    s_BC = _dispatch.as_rows(student_logits)
    t_BC = _dispatch.as_rows(teacher_logits.detach())
    labels_B = None if labels is None else labels.reshape(-1)
    loss_B = SoftmaxKLFunction.apply(s_BC, t_BC, labels_B, float(temperature), float(ce_weight),
                                     float(kl_weight))
    return reference.reduce_rows(loss_B.reshape(student_logits.shape[:-1]), reduction)
