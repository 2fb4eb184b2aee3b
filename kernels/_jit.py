"""The ``@triton.jit`` helpers and constants that the three kernel modules share: padded lanes,
the online log-sum-exp, the row softmax recomputed from saved statistics, the soft-target gradient
and scalar arguments that are either a number or a 0-dim tensor.

Every row statistic is saved as two fp32 numbers, the row max ``m`` and ``log d`` with
``d = Σ exp(x − m)``, never as one ``lse = m + log d``: rounding ``lse`` costs up to half an ulp
of ``|m|`` (3e-5 at |logits| ~ 1e3, 5e-4 at 1e4), which ``exp(x − lse)`` turns into the same
relative error of every probability; ``exp((x − m) − log d)`` keeps them within a few fp32 ulps
at any scale, as eager PyTorch does.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["NEG", "load_scalar", "load_logits", "online_logsumexp", "softmax", "soft_target_grad"]

# Finite "minus infinity" for padded lanes and rows: exp() of it is 0, and padded rows never meet
# inf - inf (so no NaN is ever computed, also not in rows or lanes that are not stored).
NEG = tl.constexpr(-1e30)


@triton.jit
def load_scalar(ptr, value, IS_TENSOR: tl.constexpr):
    """A scalar argument as fp32: read from the 0-dim tensor at ``ptr`` (IS_TENSOR), else ``value``."""
    if IS_TENSOR:
        return tl.load(ptr).to(tl.float32)
    else:
        return value


@triton.jit
def load_logits(ptrs, mask):
    """A block of logits as fp32, ``NEG`` on padded lanes (so exp() of them is 0, never inf)."""
    return tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), NEG)


@triton.jit
def online_logsumexp(m, d, x):
    """One block of a row-wise online log-sum-exp: the running max ``m`` and normaliser
    ``d = Σ exp(x − m)`` ([BLOCK_B]) updated with the block ``x`` ([BLOCK_B, BLOCK_C], padded lanes
    at ``NEG``). Start from ``m = NEG``, ``d = 0``."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new, tl.exp(m - m_new) * d + tl.sum(tl.exp(x - m_new[:, None]), axis=1)


@triton.jit
def softmax(x, m, log_d):
    """``exp(x − lse)`` of a block ``x`` [BLOCK_B, N] from the row statistics ``m``, ``log_d``
    [BLOCK_B] of ``online_logsumexp``, as ``exp((x − m) − log d)`` (see the module docstring)."""
    return tl.exp((x - m[:, None]) - log_d[:, None])


@triton.jit
def soft_target_grad(g, tsum, p, target):
    """``g·(S·p − target)``: the gradient of ``Σ_c target_c (lse − z_c)`` scaled by the incoming
    row gradient ``g``, with ``S = Σ_c target_c`` and ``p`` the softmax ([BLOCK_B] and
    [BLOCK_B, N])."""
    return g[:, None] * (tsum[:, None] * p - target)
