"""PS-KD soft-target cross-entropy, the memory gather, the target and the row softmax in one kernel;
without a memory, the Mixup/CutMix (and label-smoothed) soft-target cross-entropy.

One target covers both (``lam``, ``partner`` and ``smoothing`` default to no mixing, no smoothing)::

    target_i = (1 − α)·[(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C]
               + α·(λ·M[index_i] + (1 − λ)·M[index_j]),          j = partner[i]

Layout (as Liger's ``ops/kl_div.py``): the ``@triton.jit`` kernels, their host launchers, the
autograd Function over custom ops that make the launchers opaque to ``torch.compile`` (built by
``skd_kernels._ops``, shared by every kernel), then the public functions, which check their
arguments (``skd_kernels.reference.check_soft_target``, on both paths) and send CPU tensors to
``skd_kernels.reference`` unless ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dispatch, _ops, reference
from ._jit import NEG, load_logits, load_scalar, online_logsumexp, soft_target_grad, softmax

__all__ = ["pskd_loss", "mixup_cross_entropy"]


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _soft_weights(mem_rows, mem2_rows, c, mask, a, lam, u,
                  HAS_MEMORY: tl.constexpr, HAS_PARTNER: tl.constexpr):
    """The target's soft part on one block, 0 on padded lanes: α·(λ·M_i + (1 − λ)·M_j) + u,
    where u = (1 − α)·ε/C is the label smoothing's uniform share."""
    w = tl.where(mask, u, 0.0)
    if HAS_MEMORY:  # padded lanes load 0
        mc = tl.load(mem_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_PARTNER:
            mc2 = tl.load(mem2_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            mc = lam * mc + (1.0 - lam) * mc2
        w += a * mc
    return w


@triton.jit
def _pskd_fwd_kernel(
    z_ptr, z_stride,  # [B, C] logits, any float dtype; row stride in elements
    y_ptr,  # [B] integer labels
    mem_ptr, mem_stride,  # [N, C] past probabilities, any float dtype; read only (HAS_MEMORY)
    idx_ptr,  # [B] integer rows of the memory, duplicates allowed (HAS_MEMORY)
    partner_ptr,  # [B] integer batch row each row is mixed with (HAS_PARTNER)
    alpha_ptr, alpha,  # α: a 0-dim tensor (ALPHA_IS_TENSOR) or a scalar; 0 without a memory
    lam_ptr, lam,  # λ, the weight of the row's own label and memory row (LAM_IS_TENSOR)
    eps_ptr, eps,  # ε, the label smoothing (EPS_IS_TENSOR)
    loss_ptr,  # [B] fp32 out: the loss of each row
    stats_ptr,  # [B, 3] fp32 out: max and log normaliser of z, sum of the target; for the backward
    p_ptr, p_stride,  # [B, C] out: softmax(z) in any float dtype, written if WRITE_PROBS
    B, C,
    HAS_MEMORY: tl.constexpr,
    HAS_PARTNER: tl.constexpr,
    ALPHA_IS_TENSOR: tl.constexpr,
    LAM_IS_TENSOR: tl.constexpr,
    EPS_IS_TENSOR: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # C <= BLOCK_C: the row softmax is written in the same pass
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    a = load_scalar(alpha_ptr, alpha, ALPHA_IS_TENSOR)
    e = load_scalar(eps_ptr, eps, EPS_IS_TENSOR)
    lam_ = load_scalar(lam_ptr, lam, LAM_IS_TENSOR)
    u = (1.0 - a) * e / C
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    y2 = y
    if HAS_PARTNER:
        partner = tl.load(partner_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        y2 = tl.load(y_ptr + partner, mask=row_ok, other=0).to(tl.int64)
    z_rows = z_ptr + rows[:, None] * z_stride
    mem_rows = mem_ptr
    mem2_rows = mem_ptr
    if HAS_MEMORY:
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mem_rows = mem_ptr + idx[:, None] * mem_stride
        if HAS_PARTNER:
            idx2 = tl.load(idx_ptr + partner, mask=row_ok, other=0).to(tl.int64)
            mem2_rows = mem_ptr + idx2[:, None] * mem_stride

    # One online pass: running max m and normaliser d of z, wsum = sum of the soft weights w
    # (memory and smoothing), and v = sum w_c (m - z_c), centred on the running max. With
    # lse = m + log d:  sum_c w_c (lse - z_c) = wsum log d + v.
    m = tl.full([BLOCK_B], NEG, tl.float32)
    d = tl.zeros([BLOCK_B], tl.float32)
    v = tl.zeros([BLOCK_B], tl.float32)
    wsum = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        z = load_logits(z_rows + c[None, :], mask)
        w = _soft_weights(mem_rows, mem2_rows, c, mask, a, lam_, u, HAS_MEMORY, HAS_PARTNER)
        m_new, d = online_logsumexp(m, d, z)
        v += (m_new - m) * wsum + tl.sum(w * (m_new[:, None] - z), axis=1)
        wsum += tl.sum(w, axis=1)
        m = m_new
        if WRITE_PROBS and SINGLE_BLOCK:  # the only block: m and d are final, and exp(z - m)
            p = tl.exp(z - m[:, None]) / d[:, None]  # is the sum's (the compiler reuses it)
            tl.store(p_ptr + rows[:, None] * p_stride + c[None, :],
                     p.to(p_ptr.dtype.element_ty), mask=mask)

    log_d = tl.log(d)
    lse = m + log_d
    h = (1.0 - a) * (1.0 - e)  # weight of the (mixed) one-hot part
    z_y = tl.load(z_ptr + rows * z_stride + y, mask=row_ok, other=0.0).to(tl.float32)
    hard = lse - z_y
    if HAS_PARTNER:
        z_y2 = tl.load(z_ptr + rows * z_stride + y2, mask=row_ok, other=0.0).to(tl.float32)
        hard = lam_ * hard + (1.0 - lam_) * (lse - z_y2)
    loss = h * hard + wsum * log_d + v
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(stats_ptr + rows * 3, m, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, log_d, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, h + wsum, mask=row_ok)

    if WRITE_PROBS and not SINGLE_BLOCK:  # wide rows: a second pass over z for the softmax
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_ok[:, None] & (c < C)[None, :]
            z = load_logits(z_rows + c[None, :], mask)
            tl.store(p_ptr + rows[:, None] * p_stride + c[None, :],
                     softmax(z, m, log_d).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pskd_bwd_kernel(
    g_ptr, g_stride,  # [B] grad of each row's loss (stride 0 when expanded from a mean)
    z_ptr, z_stride,  # [B, C] logits
    y_ptr,  # [B] integer labels
    mem_ptr, mem_stride,  # [N, C] past probabilities (HAS_MEMORY)
    idx_ptr,  # [B] integer rows of the memory (HAS_MEMORY)
    partner_ptr,  # [B] integer batch row each row is mixed with (HAS_PARTNER)
    alpha_ptr, alpha, lam_ptr, lam, eps_ptr, eps,
    stats_ptr,  # [B, 3] fp32: max and log normaliser of z, sum of the target, from the forward
    dz_ptr,  # [B, C] out, contiguous, the logits' dtype: grad of the logits
    B, C,
    HAS_MEMORY: tl.constexpr,
    HAS_PARTNER: tl.constexpr,
    ALPHA_IS_TENSOR: tl.constexpr,
    LAM_IS_TENSOR: tl.constexpr,
    EPS_IS_TENSOR: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    a = load_scalar(alpha_ptr, alpha, ALPHA_IS_TENSOR)
    e = load_scalar(eps_ptr, eps, EPS_IS_TENSOR)
    lam_ = load_scalar(lam_ptr, lam, LAM_IS_TENSOR)
    u = (1.0 - a) * e / C
    h = (1.0 - a) * (1.0 - e)
    g = tl.load(g_ptr + rows * g_stride, mask=row_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    y2 = y
    if HAS_PARTNER:
        partner = tl.load(partner_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        y2 = tl.load(y_ptr + partner, mask=row_ok, other=0).to(tl.int64)
    m = tl.load(stats_ptr + rows * 3, mask=row_ok, other=0.0)
    log_d = tl.load(stats_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
    tsum = tl.load(stats_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
    z_rows = z_ptr + rows[:, None] * z_stride
    mem_rows = mem_ptr
    mem2_rows = mem_ptr
    if HAS_MEMORY:
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mem_rows = mem_ptr + idx[:, None] * mem_stride
        if HAS_PARTNER:
            idx2 = tl.load(idx_ptr + partner, mask=row_ok, other=0).to(tl.int64)
            mem2_rows = mem_ptr + idx2[:, None] * mem_stride
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        z = load_logits(z_rows + c[None, :], mask)
        target = _soft_weights(mem_rows, mem2_rows, c, mask, a, lam_, u, HAS_MEMORY, HAS_PARTNER)
        if HAS_PARTNER:
            target += h * (lam_ * (c[None, :] == y[:, None]).to(tl.float32)
                           + (1.0 - lam_) * (c[None, :] == y2[:, None]).to(tl.float32))
        else:
            target += tl.where(c[None, :] == y[:, None], h, 0.0)
        dz = soft_target_grad(g, tsum, softmax(z, m, log_d), target)
        tl.store(dz_ptr + rows[:, None] * C + c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# host launchers
# ------------------------------------------------------------------------------------------------
def _forward(z_BC: torch.Tensor, labels_B: torch.Tensor, memory_NC: Optional[torch.Tensor], index_B: Optional[torch.Tensor], partner_B: Optional[torch.Tensor],
             alpha_t: Optional[torch.Tensor], alpha_f: float, lam_t: Optional[torch.Tensor], lam_f: float, eps_t: Optional[torch.Tensor],
             eps_f: float, probs_BC: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    B, C = z_BC.shape
    loss_B = torch.empty(B, dtype=torch.float32, device=z_BC.device)
    stats_B3 = torch.empty(B, 3, dtype=torch.float32, device=z_BC.device)
    if B == 0:
        return loss_B, stats_B3
    block_b, block_c, options = _dispatch.launch_config(B, C, z_BC.device)
    has_memory, write_probs = memory_NC is not None, probs_BC is not None
    scalars, flags = _dispatch.scalar_args(loss_B, alpha=(alpha_t, alpha_f), lam=(lam_t, lam_f),
                                           eps=(eps_t, eps_f))
    _pskd_fwd_kernel[(triton.cdiv(B, block_b),)](
        z_BC, z_BC.stride(0), labels_B,
        memory_NC if has_memory else loss_B, memory_NC.stride(0) if has_memory else 0,
        index_B if has_memory else labels_B, partner_B if partner_B is not None else labels_B,
        *scalars, loss_B, stats_B3,
        probs_BC if write_probs else loss_B, probs_BC.stride(0) if write_probs else 0,
        B, C,
        HAS_MEMORY=has_memory, HAS_PARTNER=partner_B is not None, **flags,
        WRITE_PROBS=write_probs, SINGLE_BLOCK=C <= block_c,
        BLOCK_B=block_b, BLOCK_C=block_c, **options,
    )
    return loss_B, stats_B3


def _backward(grad_B: torch.Tensor, z_BC: torch.Tensor, labels_B: torch.Tensor, memory_NC: Optional[torch.Tensor], index_B: Optional[torch.Tensor],
              partner_B: Optional[torch.Tensor], alpha_t: Optional[torch.Tensor], alpha_f: float, lam_t: Optional[torch.Tensor], lam_f: float,
              eps_t: Optional[torch.Tensor], eps_f: float, stats_B3: torch.Tensor) -> torch.Tensor:
    B, C = z_BC.shape
    dz_BC = torch.empty((B, C), dtype=z_BC.dtype, device=z_BC.device)
    if B == 0:
        return dz_BC
    block_b, block_c, options = _dispatch.launch_config(B, C, z_BC.device)
    has_memory = memory_NC is not None
    scalars, flags = _dispatch.scalar_args(stats_B3, alpha=(alpha_t, alpha_f), lam=(lam_t, lam_f),
                                           eps=(eps_t, eps_f))
    _pskd_bwd_kernel[(triton.cdiv(B, block_b),)](
        grad_B, grad_B.stride(0), z_BC, z_BC.stride(0), labels_B,
        memory_NC if has_memory else stats_B3, memory_NC.stride(0) if has_memory else 0,
        index_B if has_memory else labels_B, partner_B if partner_B is not None else labels_B,
        *scalars, stats_B3, dz_BC,
        B, C,
        HAS_MEMORY=has_memory, HAS_PARTNER=partner_B is not None, **flags,
        BLOCK_B=block_b, BLOCK_C=block_c, **options,
    )
    return dz_BC


# ------------------------------------------------------------------------------------------------
# autograd (custom ops + Function, skd_kernels._ops)
# ------------------------------------------------------------------------------------------------
# Per-row soft-target cross-entropy, with the target built on the fly from the labels of the
# row and of its partner ``j = partner_i`` (itself without a partner) and, with a memory, the
# rows ``M[index_i]`` and ``M[index_j]`` (never written):
#
#     target_i = (1 − α)·[(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C]
#                + α·(λ·M[index_i] + (1 − λ)·M[index_j])
#     loss_i   = Σ_c target_{i,c} (lse(z_i) − z_{i,c})
#     ∂loss_i/∂z_i = S_i · softmax(z_i) − target_i,   S_i = Σ_c target_{i,c}
#
# (S_i is 1 for memory rows that sum to 1; the gradient uses its actual sum, as autograd of
# the reference does.) The forward reads the logits and the memory rows once (online max and
# sum), optionally writes ``softmax(z_i)`` into ``probs_out`` in the same pass, and saves the
# max and log normaliser of ``z_i`` (kept apart: see skd_kernels._jit) and ``S_i``; the backward
# recomputes the gradient from the logits and the memory, scaled by the incoming row gradient
# in fp32. The memory is saved for the backward,
# so writing it in place between forward and backward is an autograd error, not a silent
# change of the gradient.
PSKDLossFunction = _ops.fused_row_loss("pskd", sys.modules[__name__], num_stats=3,
                                         outputs=("probs_BC",))


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------
def _soft_target_loss(logits, labels, memory, index, alpha, reduction, probs_out, lam, partner,
                      smoothing):
    """The Triton path of both public functions (``memory`` None: no memory, α = 0)."""
    reference.check_soft_target(logits, labels, reduction, lam, partner, smoothing, memory, index,
                                probs_out)
    z_BC = _dispatch.as_rows(logits)
    B, C = z_BC.shape
    memory_NC = index_B = None
    if memory is not None:
        memory_NC, index_B = _dispatch.as_rows(memory.detach()), index.reshape(-1)
    partner_B = None if partner is None else partner.reshape(-1)
    probs_BC = None if probs_out is None else probs_out.view(B, C)
    alpha_t, alpha_f = _dispatch.split_scalar(alpha, z_BC.device)
    lam_t, lam_f = _dispatch.split_scalar(lam, z_BC.device)
    eps_t, eps_f = _dispatch.split_scalar(smoothing, z_BC.device)
    loss_B = PSKDLossFunction.apply(z_BC, labels.reshape(-1), memory_NC, index_B, partner_B,
                                    alpha_t, alpha_f, lam_t, lam_f, eps_t, eps_f, probs_BC)
    return reference.reduce_rows(loss_B.reshape(logits.shape[:-1]), reduction)


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
    """Cross-entropy of ``logits`` against ``(1 − alpha)·onehot(labels) + alpha·memory[index]``,
    gathered and built inside the kernel. Returns fp32: the mean over rows (``"batchmean"``) or
    one value per row (``"none"``).

    ``logits`` ``[B, C]`` (any float dtype, any row stride); ``memory`` ``[N, C]`` of past
    probabilities in any float dtype, never written; ``index`` ``[B]`` integer rows of it
    (duplicates allowed). ``alpha`` is a Python number or a 0-dim tensor on the logits' device
    (a tensor keeps ``torch.compile`` from recompiling when alpha changes every epoch; it is read
    by the kernel, never by the host). If ``probs_out`` (``[B, C]``, any float dtype, unit class
    stride) is given, the row softmax of ``logits`` (T = 1) is written into it in the same pass.

    Mixup/CutMix: with ``partner`` (``[B]``, the batch row each row is mixed with) the target is
    ``(1 − α)·[(1 − ε)·(λ·onehot(y_i) + (1 − λ)·onehot(y_j)) + ε/C] + α·(λ·M[index_i] +
    (1 − λ)·M[index_j])``, j = ``partner[i]``, λ = ``lam``, ε = ``smoothing`` (Python numbers or
    0-dim tensors, like ``alpha``). The defaults give the target above.

    CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernel; other
    tensors, and float64 ones, run ``skd_kernels.reference.pskd_loss``.
    """
    if not _dispatch.use_triton(logits):
        return reference.pskd_loss(logits, labels, memory, index, alpha, reduction,
                                   probs_out=probs_out, lam=lam, partner=partner,
                                   smoothing=smoothing)
    return _soft_target_loss(logits, labels, memory, index, alpha, reduction, probs_out, lam,
                             partner, smoothing)


def mixup_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "batchmean",
    *,
    lam: float | torch.Tensor = 1.0,
    partner: torch.Tensor | None = None,
    smoothing: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the Mixup/CutMix target of timm's ``mixup_target``,
    ``λ·smooth(onehot(y_i)) + (1 − λ)·smooth(onehot(y_j))`` with ``smooth(q) = (1 − ε)·q + ε/C``
    and j = ``partner[i]`` (no partner: ``smooth(onehot(y_i))``), built inside the kernel from
    the labels, so no ``[B, C]`` target is read. ``pskd_loss`` without a memory (α = 0); the
    arguments mean the same there. Returns fp32, the mean over rows or one value per row.
    """
    if not _dispatch.use_triton(logits):
        return reference.mixup_cross_entropy(logits, labels, reduction, lam=lam, partner=partner,
                                             smoothing=smoothing)
    return _soft_target_loss(logits, labels, None, None, 0.0, reduction, None, lam, partner,
                             smoothing)
