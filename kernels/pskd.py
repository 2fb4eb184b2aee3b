"""PS-KD soft-target cross-entropy, the memory gather, the target and the row softmax in one kernel.

Layout (as Liger's ``ops/kl_div.py``): the ``@triton.jit`` kernels, their host launchers, the custom
ops that make the launchers opaque to ``torch.compile``, the autograd Function, then the public
function, which sends CPU tensors to ``skd_kernels.reference`` unless ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dispatch, reference

__all__ = ["pskd_loss"]

# Finite "minus infinity" for padded lanes and rows (see softmax_kl.py).
_NEG = tl.constexpr(-1e30)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_alpha(alpha_ptr, alpha, ALPHA_IS_TENSOR: tl.constexpr):
    if ALPHA_IS_TENSOR:
        return tl.load(alpha_ptr).to(tl.float32)
    else:
        return alpha


@triton.jit
def _pskd_fwd_kernel(
    z_ptr, z_stride,  # [B, C] logits, any float dtype; row stride in elements
    y_ptr,  # [B] integer labels
    mem_ptr, mem_stride,  # [N, C] past probabilities, any float dtype; read only
    idx_ptr,  # [B] integer rows of the memory (duplicates allowed)
    alpha_ptr, alpha,  # alpha: a 0-dim tensor (ALPHA_IS_TENSOR) or a scalar
    loss_ptr,  # [B] fp32 out: the loss of each row
    stats_ptr,  # [B, 2] fp32 out: lse(z), sum of the target; saved for the backward
    p_ptr, p_stride,  # [B, C] out: softmax(z) in any float dtype, written if WRITE_PROBS
    B, C,
    ALPHA_IS_TENSOR: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # C <= BLOCK_C: the row softmax is written in the same pass
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    a = _load_alpha(alpha_ptr, alpha, ALPHA_IS_TENSOR)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    z_rows = z_ptr + rows[:, None] * z_stride
    mem_rows = mem_ptr + idx[:, None] * mem_stride

    # One online pass: running max m and normaliser d of z, msum = sum of the memory row, and
    # v = sum mem_c (m - z_c), centred on the running max. With lse = m + log d:
    #   sum_c mem_c (lse - z_c) = msum log d + v,   target sum S = (1 - alpha) + alpha msum.
    m = tl.full([BLOCK_B], _NEG, tl.float32)
    d = tl.zeros([BLOCK_B], tl.float32)
    v = tl.zeros([BLOCK_B], tl.float32)
    msum = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        z = tl.load(z_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, z, _NEG)
        mc = tl.load(mem_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = tl.exp(m - m_new) * d + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        v += (m_new - m) * msum + tl.sum(mc * (m_new[:, None] - z), axis=1)
        msum += tl.sum(mc, axis=1)
        m = m_new
        if WRITE_PROBS and SINGLE_BLOCK:  # the only block: m and d are final
            p = tl.exp(z - m[:, None]) / d[:, None]
            tl.store(p_ptr + rows[:, None] * p_stride + c[None, :],
                     p.to(p_ptr.dtype.element_ty), mask=mask)

    log_d = tl.log(d)
    lse = m + log_d
    z_y = tl.load(z_ptr + rows * z_stride + y, mask=row_ok, other=0.0).to(tl.float32)
    loss = (1.0 - a) * (lse - z_y) + a * (msum * log_d + v)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(stats_ptr + rows * 2, lse, mask=row_ok)
    tl.store(stats_ptr + rows * 2 + 1, (1.0 - a) + a * msum, mask=row_ok)

    if WRITE_PROBS and not SINGLE_BLOCK:  # wide rows: a second pass over z for the softmax
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_ok[:, None] & (c < C)[None, :]
            z = tl.load(z_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, z, _NEG)
            tl.store(p_ptr + rows[:, None] * p_stride + c[None, :],
                     tl.exp(z - lse[:, None]).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pskd_bwd_kernel(
    g_ptr, g_stride,  # [B] grad of each row's loss (stride 0 when expanded from a mean)
    z_ptr, z_stride,  # [B, C] logits
    y_ptr,  # [B] integer labels
    mem_ptr, mem_stride,  # [N, C] past probabilities
    idx_ptr,  # [B] integer rows of the memory
    alpha_ptr, alpha,
    stats_ptr,  # [B, 2] fp32: lse(z), sum of the target, from the forward
    dz_ptr,  # [B, C] out, contiguous, the logits' dtype: grad of the logits
    B, C,
    ALPHA_IS_TENSOR: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    a = _load_alpha(alpha_ptr, alpha, ALPHA_IS_TENSOR)
    g = tl.load(g_ptr + rows * g_stride, mask=row_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    lse = tl.load(stats_ptr + rows * 2, mask=row_ok, other=0.0)
    tsum = tl.load(stats_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    z_rows = z_ptr + rows[:, None] * z_stride
    mem_rows = mem_ptr + idx[:, None] * mem_stride
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_ok[:, None] & (c < C)[None, :]
        z = tl.load(z_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mc = tl.load(mem_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        target = a * mc + tl.where(c[None, :] == y[:, None], 1.0 - a, 0.0)
        dz = g[:, None] * (tsum[:, None] * tl.exp(z - lse[:, None]) - target)
        tl.store(dz_ptr + rows[:, None] * C + c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# host launchers
# ------------------------------------------------------------------------------------------------
def _forward(z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, probs_BC):
    B, C = z_BC.shape
    loss_B = torch.empty(B, dtype=torch.float32, device=z_BC.device)
    stats_B2 = torch.empty(B, 2, dtype=torch.float32, device=z_BC.device)
    if B == 0:
        return loss_B, stats_B2
    block_b, block_c, options = _dispatch.launch_config(B, C, z_BC.device)
    write_probs = probs_BC is not None
    _pskd_fwd_kernel[(triton.cdiv(B, block_b),)](
        z_BC, z_BC.stride(0), labels_B, memory_NC, memory_NC.stride(0), index_B,
        alpha_t if alpha_t is not None else loss_B, alpha_f,
        loss_B, stats_B2,
        probs_BC if write_probs else loss_B, probs_BC.stride(0) if write_probs else 0,
        B, C,
        ALPHA_IS_TENSOR=alpha_t is not None, WRITE_PROBS=write_probs, SINGLE_BLOCK=C <= block_c,
        BLOCK_B=block_b, BLOCK_C=block_c, **options,
    )
    return loss_B, stats_B2


def _backward(grad_B, z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, stats_B2):
    B, C = z_BC.shape
    dz_BC = torch.empty((B, C), dtype=z_BC.dtype, device=z_BC.device)
    if B == 0:
        return dz_BC
    block_b, block_c, options = _dispatch.launch_config(B, C, z_BC.device)
    _pskd_bwd_kernel[(triton.cdiv(B, block_b),)](
        grad_B, grad_B.stride(0), z_BC, z_BC.stride(0), labels_B,
        memory_NC, memory_NC.stride(0), index_B,
        alpha_t if alpha_t is not None else stats_B2, alpha_f, stats_B2, dz_BC,
        B, C,
        ALPHA_IS_TENSOR=alpha_t is not None, BLOCK_B=block_b, BLOCK_C=block_c, **options,
    )
    return dz_BC


# Custom ops: torch.compile and CUDA graphs see one opaque call with a fake (shape-only) version.
@torch.library.custom_op("skd_kernels::pskd_fwd", mutates_args=("probs_BC",))
def _pskd_fwd_op(z_BC: torch.Tensor, labels_B: torch.Tensor, memory_NC: torch.Tensor,
                 index_B: torch.Tensor, alpha_t: Optional[torch.Tensor], alpha_f: float,
                 probs_BC: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, probs_BC)


@_pskd_fwd_op.register_fake
def _(z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, probs_BC):
    B = z_BC.shape[0]
    return z_BC.new_empty(B, dtype=torch.float32), z_BC.new_empty(B, 2, dtype=torch.float32)


@torch.library.custom_op("skd_kernels::pskd_bwd", mutates_args=())
def _pskd_bwd_op(grad_B: torch.Tensor, z_BC: torch.Tensor, labels_B: torch.Tensor,
                 memory_NC: torch.Tensor, index_B: torch.Tensor, alpha_t: Optional[torch.Tensor],
                 alpha_f: float, stats_B2: torch.Tensor) -> torch.Tensor:
    return _backward(grad_B, z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, stats_B2)


@_pskd_bwd_op.register_fake
def _(grad_B, z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, stats_B2):
    return torch.empty(z_BC.shape, dtype=z_BC.dtype, device=z_BC.device)


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class PSKDLossFunction(torch.autograd.Function):
    r"""Per-row soft-target cross-entropy, with the target built on the fly from the memory row
    ``P = memory[index_i]`` (never written) and the label ``y_i``:

        target_i = (1 − α) · onehot(y_i) + α · P
        loss_i   = Σ_c target_{i,c} (lse(z_i) − z_{i,c})
        ∂loss_i/∂z_i = S_i · softmax(z_i) − target_i,   S_i = Σ_c target_{i,c} = (1 − α) + α Σ_c P_c

    (S_i is 1 for a memory row that sums to 1; the gradient uses its actual sum, as autograd of
    the reference does.) The forward reads the logits and the memory row once (online max and
    sum), optionally writes ``softmax(z_i)`` into ``probs_out`` in the same pass, and saves
    ``lse`` and ``S`` of each row; the backward recomputes the gradient from the logits and the
    memory, scaled by the incoming row gradient in fp32. The memory is saved for the backward,
    so writing it in place between forward and backward is an autograd error, not a silent
    change of the gradient.
    """

    @staticmethod
    def forward(ctx, z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f, probs_BC):
        loss_B, stats_B2 = _pskd_fwd_op(z_BC, labels_B, memory_NC, index_B, alpha_t, alpha_f,
                                        probs_BC)
        ctx.save_for_backward(z_BC, labels_B, memory_NC, index_B, alpha_t, stats_B2)
        ctx.alpha_f = alpha_f
        return loss_B

    @staticmethod
    def backward(ctx, grad_B):
        z_BC, labels_B, memory_NC, index_B, alpha_t, stats_B2 = ctx.saved_tensors
        dz_BC = None
        if ctx.needs_input_grad[0]:
            dz_BC = _pskd_bwd_op(grad_B, z_BC, labels_B, memory_NC, index_B, alpha_t, ctx.alpha_f,
                                 stats_B2)
        return dz_BC, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# public function
# ------------------------------------------------------------------------------------------------
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
    """Cross-entropy of ``logits`` against ``(1 − alpha)·onehot(labels) + alpha·memory[index]``,
    gathered and built inside the kernel. Returns fp32: the mean over rows (``"batchmean"``) or
    one value per row (``"none"``).

    ``logits`` ``[B, C]`` (any float dtype, any row stride); ``memory`` ``[N, C]`` of past
    probabilities in any float dtype, never written; ``index`` ``[B]`` integer rows of it
    (duplicates allowed). ``alpha`` is a Python number or a 0-dim tensor on the logits' device
    (a tensor keeps ``torch.compile`` from recompiling when alpha changes every epoch; it is read
    by the kernel, never by the host). If ``probs_out`` (``[B, C]``, any float dtype, unit class
    stride) is given, the row softmax of ``logits`` (T = 1) is written into it in the same pass.
    CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernel; other
    tensors, and float64 ones, run ``skd_kernels.reference.pskd_loss``.
    """
    if not _dispatch.use_triton(logits):
        return reference.pskd_loss(logits, labels, memory, index, alpha, reduction,
                                   probs_out=probs_out)
    reference.check_reduction(reduction)
    z_BC = _dispatch.as_rows(logits)
    B, C = z_BC.shape
    if memory.dim() != 2 or memory.shape[1] != C:
        raise ValueError(f"memory must be [N, {C}], got {tuple(memory.shape)}")
    memory_NC = _dispatch.as_rows(memory.detach())
    if probs_out is not None and (probs_out.shape != logits.shape or probs_out.stride(-1) != 1):
        raise ValueError(f"probs_out must be {tuple(logits.shape)} with a unit class stride, got "
                         f"{tuple(probs_out.shape)} with strides {probs_out.stride()}")
    probs_BC = None if probs_out is None else probs_out.view(B, C)
    alpha_t, alpha_f = None, 0.0
    if isinstance(alpha, torch.Tensor):
        if alpha.device == z_BC.device:
            alpha_t = alpha.detach().reshape(())
        else:  # a CPU scalar beside CUDA logits: reading it waits on no GPU work
            alpha_f = float(alpha)
    else:
        alpha_f = float(alpha)
    loss_B = PSKDLossFunction.apply(z_BC, labels.reshape(-1), memory_NC, index.reshape(-1),
                                    alpha_t, alpha_f, probs_BC)
    return reference.reduce_rows(loss_B.reshape(logits.shape[:-1]), reduction)
