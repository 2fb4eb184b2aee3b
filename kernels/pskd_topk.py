"""PS-KD with a top-k memory: the sparse memory rows, the target, the loss and the top-k of the new
softmax in one kernel.

A top-k memory row holds the ``k`` largest probabilities of a past softmax (``values``) and their
class ids (``ids``, distinct within a row). The mass outside them is either spread evenly over the
other ``C − k`` classes (``rest="spread"``) or dropped, the ``k`` values renormalised to sum to 1
(``rest="renormalize"``); a row of zeros was never written and stands for zeros, as in the dense
memory (``skd_kernels.reference.topk_rows_dense`` is the definition).

Layout as ``pskd.py``: the ``@triton.jit`` kernels, their host launchers, the autograd Function
over custom ops (``skd_kernels._ops``), then the public function, which checks its arguments
(``skd_kernels.reference.check_pskd_topk``, on both paths).

The top-k of the new softmax is selected by logit, in the forward's single pass over the row, block
by block: each logit becomes an int64 key (its fp32 bits made monotone in the high word, ``C−1−c``
in the low word, so keys are unique and ties go to the lower class id), and a block's keys larger
than the smallest of the ``k`` kept so far replace it one at a time, largest first (at most ``k``
rounds per block, usually a few after the first block). ``tl.topk`` would sort whole blocks: it
returns no indices (hence the keys either way) and runs about 8 s per 16×1024 block in the Triton
interpreter, against milliseconds for these max/min rounds.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dispatch, _ops, reference
from ._jit import NEG, load_logits, load_scalar, online_logsumexp, soft_target_grad, softmax

__all__ = ["pskd_topk_loss"]

_MIN_KEY = tl.constexpr(-9223372036854775807 - 1)  # below every key of a real logit


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _memory_weights(values, C, K, REST_SPREAD: tl.constexpr):
    """``q`` [BLOCK_B, BLOCK_K]: the probability of each stored class; ``u`` [BLOCK_B]: that of
    every other class (0 when renormalising)."""
    v_sum = tl.sum(values, axis=1)
    if REST_SPREAD:
        rest = tl.where(v_sum > 0, tl.maximum(1.0 - v_sum, 0.0), 0.0)
        return values, rest / tl.maximum(C - K, 1).to(tl.float32)
    else:
        return values / tl.where(v_sum > 0, v_sum, 1.0)[:, None], tl.zeros_like(v_sum)


@triton.jit
def _logit_key(z, c, C):
    """Unique int64 keys in the order of the fp32 logits ``z``, ties to the lower class ``c``."""
    bits = z.to(tl.int32, bitcast=True)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return (monotone.to(tl.int64) << 32) | (C - 1 - c).to(tl.int64)


@triton.jit
def _key_logit(key):
    """The fp32 logit of a key (the monotone map is its own inverse)."""
    monotone = (key >> 32).to(tl.int32)
    return (monotone ^ ((monotone >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _keep_largest(kept, keys):
    """The ``BLOCK_K`` largest of ``kept`` [BLOCK_B, BLOCK_K] (unique, any order) and ``keys``
    [BLOCK_B, BLOCK_C] (unique): the largest remaining key replaces the smallest kept one while it
    is larger, so a row takes at most ``BLOCK_K`` rounds."""
    low = tl.min(kept, axis=1)
    candidates = tl.where(keys > low[:, None], keys, _MIN_KEY)
    best = tl.max(candidates, axis=1)
    while tl.max((best > low).to(tl.int32), axis=0) > 0:
        kept = tl.where((kept == low[:, None]) & (best > low)[:, None], best[:, None], kept)
        candidates = tl.where(candidates == best[:, None], _MIN_KEY, candidates)
        low = tl.min(kept, axis=1)
        best = tl.max(candidates, axis=1)
    return kept


@triton.jit
def _pskd_topk_fwd_kernel(
    z_ptr, z_stride,  # [B, C] logits, any float dtype; row stride in elements
    y_ptr,  # [B] integer labels
    mv_ptr, mv_stride,  # [N, K] memory: the stored probabilities, any float dtype; read only
    mi_ptr, mi_stride,  # [N, K] memory: their class ids, int32; read only
    idx_ptr,  # [B] integer rows of the memory (duplicates allowed)
    alpha_ptr, alpha,  # alpha: a 0-dim tensor (ALPHA_IS_TENSOR) or a scalar
    loss_ptr,  # [B] fp32 out: the loss of each row
    stats_ptr,  # [B, 3] fp32 out: max and log normaliser of z, sum of the target; for the backward
    ov_ptr, ov_stride,  # [B, K] out: the K largest probabilities of softmax(z), if WRITE_TOPK
    oi_ptr, oi_stride,  # [B, K] int32 out: their class ids, largest first
    B, C, K,
    ALPHA_IS_TENSOR: tl.constexpr,
    REST_SPREAD: tl.constexpr,
    WRITE_TOPK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of 2 of K
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    slots = tl.arange(0, BLOCK_K)
    slot_ok = row_ok[:, None] & (slots < K)[None, :]
    a = load_scalar(alpha_ptr, alpha, ALPHA_IS_TENSOR)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    z_rows = z_ptr + rows[:, None] * z_stride
    values = tl.load(mv_ptr + idx[:, None] * mv_stride + slots[None, :], mask=slot_ok,
                     other=0.0).to(tl.float32)
    ids = tl.load(mi_ptr + idx[:, None] * mi_stride + slots[None, :], mask=slot_ok,
                  other=0).to(tl.int64)
    q, u = _memory_weights(values, C, K, REST_SPREAD)

    # One online pass: running max m and normaliser d of z, and w = sum_c (m - z_c) centred on the
    # running max (non-negative terms: no cancellation), so sum_c (lse - z_c) = w + C log d. The
    # target is (1 - a) onehot + a (q at the stored ids, u elsewhere), hence
    #   loss = (1 - a)(lse - z_y) + a [sum_j q_j t_j + u (sum_c (lse - z_c) - sum_j t_j)],
    # with t_j = lse - z at the j-th stored id.
    m = tl.full([BLOCK_B], NEG, tl.float32)
    d = tl.zeros([BLOCK_B], tl.float32)
    w = tl.zeros([BLOCK_B], tl.float32)
    kept = tl.full([BLOCK_B, BLOCK_K], _MIN_KEY, tl.int64) + slots[None, :]  # unique fillers
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        z = load_logits(z_rows + c[None, :], mask)
        m_new, d = online_logsumexp(m, d, z)
        w += (m_new - m) * c0 + tl.sum(tl.where(mask, m_new[:, None] - z, 0.0), axis=1)
        m = m_new
        if WRITE_TOPK:
            kept = _keep_largest(kept, tl.where(mask, _logit_key(z, c, C), _MIN_KEY))

    log_d = tl.log(d)
    lse = m + log_d
    t = tl.where(slot_ok, lse[:, None] - load_logits(z_rows + ids, slot_ok), 0.0)
    z_y = tl.load(z_ptr + rows * z_stride + y, mask=row_ok, other=0.0).to(tl.float32)
    others = w + C * log_d - tl.sum(t, axis=1)
    loss = (1.0 - a) * (lse - z_y) + a * (tl.sum(q * t, axis=1) + u * others)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(stats_ptr + rows * 3, m, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, log_d, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, (1.0 - a) + a * (tl.sum(q, axis=1) + u * (C - K)),
             mask=row_ok)

    if WRITE_TOPK:  # the kept keys, largest first
        for j in range(0, K):
            top = tl.max(kept, axis=1)
            # A padded row kept only fillers, whose bits are no number: NEG there.
            logit = tl.where(row_ok, _key_logit(top), NEG)
            tl.store(ov_ptr + rows[:, None] * ov_stride + j,
                     softmax(logit[:, None], m, log_d).to(ov_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(oi_ptr + rows * oi_stride + j, (C - 1 - (top & 0xFFFFFFFF)).to(tl.int32),
                     mask=row_ok)
            kept = tl.where(kept == top[:, None], _MIN_KEY, kept)


@triton.jit
def _pskd_topk_bwd_kernel(
    g_ptr, g_stride,  # [B] grad of each row's loss (stride 0 when expanded from a mean)
    z_ptr, z_stride,  # [B, C] logits
    y_ptr,  # [B] integer labels
    mv_ptr, mv_stride,  # [N, K] memory: stored probabilities
    mi_ptr, mi_stride,  # [N, K] memory: their class ids
    idx_ptr,  # [B] integer rows of the memory
    alpha_ptr, alpha,
    stats_ptr,  # [B, 3] fp32: max and log normaliser of z, sum of the target, from the forward
    dz_ptr,  # [B, C] out, contiguous, the logits' dtype: grad of the logits
    B, C, K,
    ALPHA_IS_TENSOR: tl.constexpr,
    REST_SPREAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    slots = tl.arange(0, BLOCK_K)
    slot_ok = row_ok[:, None] & (slots < K)[None, :]
    a = load_scalar(alpha_ptr, alpha, ALPHA_IS_TENSOR)
    g = tl.load(g_ptr + rows * g_stride, mask=row_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    m = tl.load(stats_ptr + rows * 3, mask=row_ok, other=0.0)
    log_d = tl.load(stats_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
    tsum = tl.load(stats_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
    values = tl.load(mv_ptr + idx[:, None] * mv_stride + slots[None, :], mask=slot_ok,
                     other=0.0).to(tl.float32)
    ids = tl.load(mi_ptr + idx[:, None] * mi_stride + slots[None, :], mask=slot_ok,
                  other=0).to(tl.int64)
    q, u = _memory_weights(values, C, K, REST_SPREAD)
    z_rows = z_ptr + rows[:, None] * z_stride
    dz_rows = dz_ptr + rows[:, None] * C

    # Every class as if it were not stored (target a·u), then the K stored ones rewritten.
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        z = load_logits(z_rows + c[None, :], mask)
        target = a * u[:, None] + tl.where(c[None, :] == y[:, None], 1.0 - a, 0.0)
        dz = soft_target_grad(g, tsum, softmax(z, m, log_d), target)
        tl.store(dz_rows + c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # every thread's dense store lands before the stored classes are rewritten
    z_ids = load_logits(z_rows + ids, slot_ok)
    target = a * q + tl.where(ids == y[:, None], 1.0 - a, 0.0)
    dz = soft_target_grad(g, tsum, softmax(z_ids, m, log_d), target)
    tl.store(dz_rows + ids, dz.to(dz_ptr.dtype.element_ty), mask=slot_ok)


# ------------------------------------------------------------------------------------------------
# host launchers
# ------------------------------------------------------------------------------------------------
def _forward(z_BC: torch.Tensor, labels_B: torch.Tensor, values_NK: torch.Tensor, ids_NK: torch.Tensor, index_B: torch.Tensor,
             alpha_t: Optional[torch.Tensor], alpha_f: float, rest_spread: bool, values_BK: Optional[torch.Tensor],
             ids_BK: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    B, C = z_BC.shape
    K = values_NK.shape[1]
    loss_B = torch.empty(B, dtype=torch.float32, device=z_BC.device)
    stats_B3 = torch.empty(B, 3, dtype=torch.float32, device=z_BC.device)
    if B == 0:
        return loss_B, stats_B3
    block_b, block_c, options = _dispatch.launch_config(B, C, z_BC.device)
    write = values_BK is not None
    scalars, flags = _dispatch.scalar_args(loss_B, alpha=(alpha_t, alpha_f))
    _pskd_topk_fwd_kernel[(triton.cdiv(B, block_b),)](
        z_BC, z_BC.stride(0), labels_B, values_NK, values_NK.stride(0), ids_NK, ids_NK.stride(0),
        index_B, *scalars, loss_B, stats_B3,
        values_BK if write else loss_B, values_BK.stride(0) if write else 0,
        ids_BK if write else loss_B, ids_BK.stride(0) if write else 0,
        B, C, K,
        **flags, REST_SPREAD=rest_spread, WRITE_TOPK=write,
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(K), **options,
    )
    return loss_B, stats_B3


def _backward(grad_B: torch.Tensor, z_BC: torch.Tensor, labels_B: torch.Tensor, values_NK: torch.Tensor, ids_NK: torch.Tensor,
              index_B: torch.Tensor, alpha_t: Optional[torch.Tensor], alpha_f: float, rest_spread: bool, stats_B3: torch.Tensor) -> torch.Tensor:
    B, C = z_BC.shape
    K = values_NK.shape[1]
    dz_BC = torch.empty((B, C), dtype=z_BC.dtype, device=z_BC.device)
    if B == 0:
        return dz_BC
    block_b, block_c, options = _dispatch.launch_config(B, C, z_BC.device)
    scalars, flags = _dispatch.scalar_args(stats_B3, alpha=(alpha_t, alpha_f))
    _pskd_topk_bwd_kernel[(triton.cdiv(B, block_b),)](
        grad_B, grad_B.stride(0), z_BC, z_BC.stride(0), labels_B,
        values_NK, values_NK.stride(0), ids_NK, ids_NK.stride(0), index_B,
        *scalars, stats_B3, dz_BC,
        B, C, K,
        **flags, REST_SPREAD=rest_spread,
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(K), **options,
    )
    return dz_BC


# ------------------------------------------------------------------------------------------------
# autograd (custom ops + Function, skd_kernels._ops)
# ------------------------------------------------------------------------------------------------
# Per-row soft-target cross-entropy against a top-k memory row ``(v, ids) = memory[index_i]``:
#
#     P_c      = q_j if c = ids_j, else u       (q = v, u = max(0, 1 − Σv)/(C − k) for "spread";
#                                                q = v / Σv, u = 0 for "renormalize")
#     target_i = (1 − α) · onehot(y_i) + α · P
#     loss_i   = Σ_c target_{i,c} (lse(z_i) − z_{i,c})
#     ∂loss_i/∂z_i = S_i · softmax(z_i) − target_i,   S_i = (1 − α) + α (Σ_j q_j + (C − k) u)
#
# The forward reads the logits once (online max and sum, plus the running top-k when asked),
# gathers the k stored logits, and saves the max and log normaliser of the row (kept apart: see
# skd_kernels._jit) and ``S``; the backward writes every class's gradient with target ``α·u``
# (plus the label), then rewrites the k stored classes. The memory is saved for the backward,
# so writing it between forward and backward is an autograd error.
PSKDTopKLossFunction = _ops.fused_row_loss("pskd_topk", sys.modules[__name__], num_stats=3,
                                             outputs=("values_BK", "ids_BK"))


# ------------------------------------------------------------------------------------------------
# public function
# ------------------------------------------------------------------------------------------------
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
    """``pskd_loss`` with a top-k memory, read and expanded inside the kernel: cross-entropy of
    ``logits`` against ``(1 − alpha)·onehot(labels) + alpha·P``, where ``P`` is the distribution
    that row ``index[i]`` of the memory stands for (see the module docstring for ``rest``). Returns
    fp32: the mean over rows (``"batchmean"``) or one value per row (``"none"``).

    ``memory_values`` ``[N, k]`` (any float dtype) and ``memory_ids`` ``[N, k]`` (int32, distinct
    within a row) are never written; ``index`` ``[B]`` (duplicates allowed). ``alpha`` as in
    ``pskd_loss``. If ``values_out`` and ``ids_out`` (``[B, k]``, any float dtype and int32, unit
    inner stride) are given, the ``k`` largest probabilities of ``softmax(logits)`` and their class
    ids are written into them in the same pass, largest first: the new memory rows. CUDA tensors
    (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernel; others, and float64,
    run ``skd_kernels.reference.pskd_topk_loss``.
    """
    if not _dispatch.use_triton(logits):
        return reference.pskd_topk_loss(logits, labels, memory_values, memory_ids, index, alpha,
                                        reduction, rest=rest, values_out=values_out,
                                        ids_out=ids_out)
    reference.check_pskd_topk(logits, labels, memory_values, memory_ids, index, reduction, rest,
                              values_out, ids_out)
    z_BC = _dispatch.as_rows(logits)
    B, k = z_BC.shape[0], memory_values.shape[1]
    values_NK = _dispatch.as_rows(memory_values.detach())
    ids_NK = _dispatch.as_rows(memory_ids)
    values_BK = None if values_out is None else values_out.view(B, k)
    ids_BK = None if ids_out is None else ids_out.view(B, k)
    alpha_t, alpha_f = _dispatch.split_scalar(alpha, z_BC.device)
    loss_B = PSKDTopKLossFunction.apply(z_BC, labels.reshape(-1), values_NK, ids_NK,
                                        index.reshape(-1), alpha_t, alpha_f, rest == "spread",
                                        values_BK, ids_BK)
    return reference.reduce_rows(loss_B.reshape(logits.shape[:-1]), reduction)
