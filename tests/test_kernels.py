"""Triton kernels against ``skd_kernels.reference`` computed in float64.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``,
set by conftest.py); with one, on CUDA tensors. Loss and gradient are compared on the same inputs
(rounded to the input dtype first), so the loss is held to fp32 accuracy for every dtype and only
the gradient, written in the input dtype, gets a per-dtype tolerance.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import skd_kernels
from skd_kernels import _dispatch, reference

# skd_kernels.softmax_kl is the function; these are the modules that define the kernels.
softmax_kl_mod = importlib.import_module("skd_kernels.softmax_kl")
pskd_mod = importlib.import_module("skd_kernels.pskd")
pskd_topk_mod = importlib.import_module("skd_kernels.pskd_topk")

if _dispatch.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 or a CUDA device")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSS_TOL = 2e-5  # relative to the loss scale: fp32 accumulation, whatever the input dtype
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # the output rounding
# fp32 gradients at large |logits|: eager PyTorch in fp32 stays within ~1e-7 of float64 there; a
# softmax recomputed as exp(z − lse) from one fp32 lse = max + log(sum) would be off by up to
# half an ulp of the max (1e-4 at |z| ~ 1e3, 5e-4 at 1e4).
LARGE_LOGITS_GRAD_TOL = {**GRAD_TOL, torch.float32: 1e-6}


def assert_close(actual, expected, tol):
    """|actual − expected| ≤ tol·(|expected| + max|expected|), elementwise, in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-12))


def weight_rows(loss, reduction, B):
    """A scalar whose gradient w.r.t. the loss is not 1: ×3 for a mean, random weights per row."""
    if reduction == "batchmean":
        return loss * 3.0
    return (loss * torch.linspace(-1.0, 2.0, B, dtype=loss.dtype, device=loss.device)).sum()


def logits(B, C, dtype, scale=3.0):
    return (torch.randn(B, C, device=DEVICE) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------
# softmax_kl
# ------------------------------------------------------------------------------------------------
def check_softmax_kl(s, t, T, reduction="batchmean", labels=None, ce_weight=1.0, kl_weight=1.0,
                     grad_tol=GRAD_TOL):
    """Kernel vs float64 reference: loss, student gradient (grad_output != 1), no teacher
    gradient, inputs unchanged."""
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    s0, t0 = s.detach().clone(), t.detach().clone()
    kw = dict(labels=labels, ce_weight=ce_weight, kl_weight=kl_weight)
    loss = skd_kernels.softmax_kl(s, t, T, reduction, **kw)
    assert loss.dtype == torch.float32
    weight_rows(loss, reduction, s.shape[0]).backward()

    s64 = s.detach().double().requires_grad_()
    ref = reference.softmax_kl(s64, t.detach().double(), T, reduction, **kw)
    weight_rows(ref, reduction, s.shape[0]).backward()

    assert_close(loss, ref, LOSS_TOL)
    assert s.grad.dtype == s.dtype and s.grad.shape == s.shape
    assert_close(s.grad, s64.grad, grad_tol[s.dtype])
    assert t.grad is None
    assert torch.equal(s.detach(), s0) and torch.equal(t.detach(), t0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C", [(1, 1), (1, 7), (4, 7), (37, 1000), (5, 1031), (2, 21841)])
@pytest.mark.parametrize("with_labels", [False, True], ids=["kl", "kl+ce"])
def test_softmax_kl_shapes_and_dtypes(B, C, dtype, with_labels):
    labels = torch.randint(0, C, (B,), device=DEVICE) if with_labels else None
    check_softmax_kl(logits(B, C, dtype), logits(B, C, dtype), 4.0, labels=labels)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_softmax_kl_temperatures(T, dtype):
    B, C = 13, 1001
    labels = torch.randint(0, C, (B,), device=DEVICE)
    check_softmax_kl(logits(B, C, dtype), logits(B, C, dtype), T, "none", labels=labels,
                     ce_weight=0.7, kl_weight=1.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0.5, 4.0])
def test_softmax_kl_extreme_logits(T, dtype):
    """|logits| up to 1e4 (clamped: many ties at the max), and rows far from 0 whose softmax is
    not one-hot (offset ± a few), where the fp32 gradient must stay as accurate as eager
    PyTorch's."""
    B, C = 8, 300
    s = logits(B, C, dtype, scale=1e4).clamp(-1e4, 1e4)
    t = logits(B, C, dtype, scale=1e4).clamp(-1e4, 1e4)
    t[0] = s[0]  # KL exactly 0 at |logits| = 1e4
    s[1] = (s[1].float() / 64).round() * 64  # multiples of 64: exact in every dtype, also + 2048
    t[1] = s[1].float() + 2048  # a constant shift: KL 0 again
    s[2, :] = 1e4  # a flat row
    for row, offset in ((5, 1e2), (6, -1e3), (7, 1e4)):
        s[row], t[row] = logits(2, C, torch.float32) + offset
    check_softmax_kl(s, t, T, "none", labels=torch.randint(0, C, (B,), device=DEVICE),
                     grad_tol=LARGE_LOGITS_GRAD_TOL)
    loss = skd_kernels.softmax_kl(s, t, T, "none")
    assert loss[0].abs().item() <= 1e-4 and loss[1].abs().item() <= 1e-4 * T * T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_kl_multi_block_rows(monkeypatch, dtype):
    """Rows wider than one block (here 128 columns): the online max/sum path."""
    monkeypatch.setattr(_dispatch, "MAX_BLOCK_C", 128)
    B, C = 6, 1031
    check_softmax_kl(logits(B, C, dtype), logits(B, C, dtype), 2.0, "none",
                     labels=torch.randint(0, C, (B,), device=DEVICE), ce_weight=0.5)


def test_softmax_kl_strided_rows():
    B, C = 9, 300
    big_s = logits(B, C + 17, torch.float32)
    big_t = logits(B, 2 * C, torch.float32)
    s, t = big_s[:, 5:5 + C], big_t[:, ::2]  # a row stride of C + 17; a class stride of 2
    assert _dispatch.as_rows(s).data_ptr() == s.data_ptr()  # sliced rows are not copied
    check_softmax_kl(s, t, 2.0, labels=torch.randint(0, C, (B,), device=DEVICE))
    # One teacher row broadcast to the batch (row stride 0).
    check_softmax_kl(big_s[:, :C], big_t[0, :C].expand(B, C), 3.0, "none")


def test_softmax_kl_leading_dims_and_errors():
    s, t = logits(6, 50, torch.float32), logits(6, 50, torch.float32)
    rows = skd_kernels.softmax_kl(s.view(2, 3, 50), t.view(2, 3, 50), 2.0, "none")
    assert rows.shape == (2, 3)
    expected = reference.softmax_kl(s.double(), t.double(), 2.0, "none")
    assert_close(rows.flatten(), expected, LOSS_TOL)
    with pytest.raises(ValueError, match="reduction"):
        skd_kernels.softmax_kl(s, t, reduction="mean")
    with pytest.raises(ValueError, match="shape"):
        skd_kernels.softmax_kl(s, t[:, :49])


# ------------------------------------------------------------------------------------------------
# pskd_loss
# ------------------------------------------------------------------------------------------------
def check_pskd(z, labels, memory, index, alpha, reduction="batchmean", probs_dtype=None,
               grad_tol=GRAD_TOL):
    """Kernel vs float64 reference: loss, gradient (grad_output != 1), probs_out, memory intact."""
    z = z.detach().requires_grad_()
    z0, memory0 = z.detach().clone(), memory.clone()
    probs = None if probs_dtype is None else torch.full(z.shape, float("nan"), dtype=probs_dtype,
                                                       device=z.device)
    loss = skd_kernels.pskd_loss(z, labels, memory, index, alpha, reduction, probs_out=probs)
    assert loss.dtype == torch.float32
    weight_rows(loss, reduction, z.shape[0]).backward()

    z64 = z.detach().double().requires_grad_()
    alpha64 = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    ref = reference.pskd_loss(z64, labels, memory.double(), index, alpha64, reduction)
    weight_rows(ref, reduction, z.shape[0]).backward()

    assert_close(loss, ref, LOSS_TOL)
    assert z.grad.dtype == z.dtype
    assert_close(z.grad, z64.grad, grad_tol[z.dtype])
    if probs is not None:
        probs_tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[probs_dtype]
        torch.testing.assert_close(probs.double().cpu(), torch.softmax(z64.detach(), -1).cpu(),
                                   rtol=probs_tol, atol=probs_tol)
    assert torch.equal(memory, memory0) and torch.equal(z.detach(), z0)


def pskd_inputs(B, C, dtype, memory_dtype, N=64):
    memory = torch.softmax(torch.randn(N, C, device=DEVICE) * 2, -1).to(memory_dtype)
    index = torch.randint(0, N, (B,), device=DEVICE)
    index[-1] = index[0]  # a duplicate index
    return logits(B, C, dtype), torch.randint(0, C, (B,), device=DEVICE), memory, index


@pytest.mark.parametrize("memory_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C", [(1, 1), (1, 7), (37, 1000), (5, 1031), (2, 21841)])
def test_pskd_shapes_and_memory_dtypes(B, C, memory_dtype):
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, memory_dtype)
    check_pskd(z, labels, memory, index, 0.35, probs_dtype=memory_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.35, "tensor"])
def test_pskd_alpha_and_logit_dtypes(dtype, alpha):
    z, labels, memory, index = pskd_inputs(13, 1001, dtype, torch.float16)
    if alpha == "tensor":
        alpha = torch.tensor(0.35, device=DEVICE)
    check_pskd(z, labels, memory, index, alpha, "none", probs_dtype=dtype)


def test_pskd_duplicate_indices_and_unnormalised_memory():
    """Every row reads memory row 3; rows of zeros (the official initial memory) and of sums != 1
    make the target sum S differ from 1, which the gradient S·softmax − target must honour."""
    B, C = 8, 50
    z, labels, _, _ = pskd_inputs(B, C, torch.float32, torch.float32)
    memory = torch.rand(5, C, device=DEVICE)
    memory[3] = 0.0
    all_three = torch.full((B,), 3, device=DEVICE)
    check_pskd(z, labels, memory, all_three, 0.6, probs_dtype=torch.float32)
    pairs = torch.tensor([1, 1, 2, 2, 0, 0, 4, 4], device=DEVICE)
    check_pskd(z, labels, memory, pairs, 0.6, "none")


def test_pskd_multi_block_rows_and_strides(monkeypatch):
    """Rows wider than one block (here 128 columns), logits and probs_out with a row stride."""
    monkeypatch.setattr(_dispatch, "MAX_BLOCK_C", 128)
    B, C = 6, 1031
    _, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.bfloat16)
    z = logits(B, C + 9, torch.bfloat16)[:, 4:4 + C]
    z = z.detach().requires_grad_()
    probs = torch.zeros(B, C + 3, dtype=torch.float32, device=DEVICE)
    loss = skd_kernels.pskd_loss(z, labels, memory, index, 0.5, probs_out=probs[:, :C])
    loss.backward()
    ref_probs = torch.softmax(z.detach().double(), -1)
    torch.testing.assert_close(probs[:, :C].double().cpu(), ref_probs.cpu(), rtol=2e-6, atol=2e-6)
    assert torch.equal(probs[:, C:], torch.zeros(B, 3, device=DEVICE))  # nothing beyond the view
    check_pskd(z, labels, memory, index, 0.5, "none", probs_dtype=torch.float16)


def test_pskd_memory_write_before_backward_is_an_error():
    """The backward re-reads the memory: writing it between forward and backward must fail loudly
    (autograd's version check), not change the gradient silently."""
    z, labels, memory, index = pskd_inputs(4, 10, torch.float32, torch.float16)
    z.requires_grad_()
    loss = skd_kernels.pskd_loss(z, labels, memory, index, 0.5)
    memory[index] = 0.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("case", ["clamped", "offset", "offset-multi-block"])
def test_pskd_extreme_logits(monkeypatch, case):
    """|logits| of 1e4 (clamped: ties at the max), and rows far from 0 whose softmax is not
    one-hot (offset ± a few), in one block and in blocks of 128: fp32 gradients and
    probabilities as accurate as eager PyTorch's."""
    if case == "offset-multi-block":
        monkeypatch.setattr(_dispatch, "MAX_BLOCK_C", 128)
    B, C = 4, 257
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.float16)
    if case == "clamped":
        z = (z * 1e4 / 3).clamp(-1e4, 1e4)
    else:
        z = z + torch.tensor([1e2, -1e3, 1e3, 1e4], device=DEVICE)[:, None]
    check_pskd(z, labels, memory, index, 0.5, "none", probs_dtype=torch.float32,
               grad_tol=LARGE_LOGITS_GRAD_TOL)
    check_mixed(z, labels, mixing_args(B), memory, index, 0.5, "none",
                grad_tol=LARGE_LOGITS_GRAD_TOL)


# ------------------------------------------------------------------------------------------------
# mixed targets: pskd_loss with lam/partner/smoothing, and mixup_cross_entropy (no memory)
# ------------------------------------------------------------------------------------------------
def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check_mixed(z, labels, mixing, memory=None, index=None, alpha=0.0, reduction="batchmean",
                grad_tol=GRAD_TOL):
    """Kernel vs float64 reference, through ``pskd_loss`` with a memory or ``mixup_cross_entropy``
    without: loss, gradient (grad_output != 1), inputs intact."""
    z = z.detach().requires_grad_()
    z0 = z.detach().clone()
    z64 = z.detach().double().requires_grad_()
    mixing64 = {k: _double(v) for k, v in mixing.items()}
    if memory is None:
        loss = skd_kernels.mixup_cross_entropy(z, labels, reduction, **mixing)
        ref = reference.mixup_cross_entropy(z64, labels, reduction, **mixing64)
    else:
        memory0 = memory.clone()
        loss = skd_kernels.pskd_loss(z, labels, memory, index, alpha, reduction, **mixing)
        ref = reference.pskd_loss(z64, labels, memory.double(), index, _double(alpha), reduction,
                                  **mixing64)
        assert torch.equal(memory, memory0)
    assert loss.dtype == torch.float32
    weight_rows(loss, reduction, z.shape[0]).backward()
    weight_rows(ref, reduction, z.shape[0]).backward()
    assert_close(loss, ref, LOSS_TOL)
    assert z.grad.dtype == z.dtype
    assert_close(z.grad, z64.grad, grad_tol[z.dtype])
    assert torch.equal(z.detach(), z0)


def mixing_args(B, lam=0.3, smoothing=0.1, flip=True):
    """timm's batch-mode pairing (row i with row B−1−i) or a random permutation."""
    partner = torch.arange(B, device=DEVICE).flip(0) if flip else torch.randperm(B, device=DEVICE)
    return dict(lam=lam, partner=partner, smoothing=smoothing)


@pytest.mark.parametrize("with_memory", [False, True], ids=["no-memory", "memory"])
@pytest.mark.parametrize("B,C", [(1, 1), (1, 7), (37, 1000), (5, 1031), (2, 21841)])
def test_mixed_target_shapes(B, C, with_memory):
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.float16)
    if with_memory:
        check_mixed(z, labels, mixing_args(B), memory, index, 0.35)
    else:
        check_mixed(z, labels, mixing_args(B))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scalars", ["float", "tensor"])
@pytest.mark.parametrize("with_memory", [False, True], ids=["no-memory", "memory"])
def test_mixed_target_dtypes_and_tensor_scalars(dtype, scalars, with_memory):
    """λ, ε (and α) as Python numbers or as 0-dim tensors on the device; a random pairing."""
    B, C = 13, 1001
    z, labels, memory, index = pskd_inputs(B, C, dtype, torch.bfloat16)
    lam, eps, alpha = 0.62, 0.1, 0.35
    if scalars == "tensor":
        lam, eps, alpha = (torch.tensor(v, device=DEVICE) for v in (lam, eps, alpha))
    mixing = mixing_args(B, lam, eps, flip=False)
    if with_memory:
        check_mixed(z, labels, mixing, memory, index, alpha, "none")
    else:
        check_mixed(z, labels, mixing, reduction="none")


@pytest.mark.parametrize("lam, smoothing", [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0), (0.25, 0.3)])
def test_mixed_target_edge_weights(lam, smoothing):
    """λ at 0 and 1, ε = 1 (a uniform target), pairs with equal labels."""
    B, C = 8, 50
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.float32)
    labels[B - 1] = labels[0]  # row 0 and its partner share a label
    mixing = mixing_args(B, lam, smoothing)
    check_mixed(z, labels, mixing, memory, index, 0.6, "none")
    check_mixed(z, labels, mixing, reduction="none")


def test_mixed_target_multi_block_rows_and_strides(monkeypatch):
    """Rows wider than one block (here 128 columns); logits with a row stride; probs_out."""
    monkeypatch.setattr(_dispatch, "MAX_BLOCK_C", 128)
    B, C = 6, 1031
    _, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.bfloat16)
    z = logits(B, C + 9, torch.bfloat16)[:, 4:4 + C]
    mixing = mixing_args(B, torch.tensor(0.4, device=DEVICE), 0.1, flip=False)
    check_mixed(z, labels, mixing, memory, index, 0.5, "none")
    check_mixed(z, labels, mixing)
    probs = torch.zeros(B, C, dtype=torch.float32, device=DEVICE)
    skd_kernels.pskd_loss(z, labels, memory, index, 0.5, probs_out=probs, **mixing)
    torch.testing.assert_close(probs.double().cpu(), torch.softmax(z.double(), -1).cpu(),
                               rtol=2e-6, atol=2e-6)


def test_unmixed_defaults_are_todays_pskd_loss():
    """λ = 1 with a partner, ε = 0: the plain PS-KD target; no memory and α = 0: plain CE."""
    B, C = 9, 300
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.float16)
    plain = skd_kernels.pskd_loss(z, labels, memory, index, 0.4, "none")
    mixed = skd_kernels.pskd_loss(z, labels, memory, index, 0.4, "none", **mixing_args(B, 1.0, 0.0))
    assert_close(mixed, plain, 1e-6)
    ce = torch.nn.functional.cross_entropy(z.double(), labels, reduction="none")
    assert_close(skd_kernels.mixup_cross_entropy(z, labels, "none"), ce, LOSS_TOL)
    smoothed = torch.nn.functional.cross_entropy(z.double(), labels, reduction="none",
                                                 label_smoothing=0.1)
    assert_close(skd_kernels.mixup_cross_entropy(z, labels, "none", smoothing=0.1), smoothed, LOSS_TOL)


def test_mixup_reference_is_timms_mixup_target():
    """The oracle itself: with timm's pairing (flip) the reference target is timm's
    ``mixup_target``, checked through the loss against an independent float64 computation."""
    from timm.data.mixup import mixup_target

    B, C = 10, 23
    z = logits(B, C, torch.float64)
    labels = torch.randint(0, C, (B,), device=DEVICE)
    target = mixup_target(labels, C, lam=0.37, smoothing=0.1).double()  # built in fp32 by timm
    expected = -(target * torch.log_softmax(z, -1)).sum(-1)
    got = reference.mixup_cross_entropy(z, labels, "none", **mixing_args(B, 0.37, 0.1))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_mixed_target_traces_without_graph_break():
    """Dynamo traces both mixed losses with tensor λ and ε, forward and backward, in one graph."""
    B, C = 8, 40
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.float16)
    mixing = mixing_args(B, torch.tensor(0.3, device=DEVICE), torch.tensor(0.1, device=DEVICE))

    def step(z):
        return (skd_kernels.mixup_cross_entropy(z, labels, **mixing)
                + skd_kernels.pskd_loss(z, labels, memory, index, 0.4, **mixing))

    z_eager, z_comp = z.detach().requires_grad_(), z.detach().requires_grad_()
    eager = step(z_eager)
    eager.backward()
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(z_comp)
    loss.backward()
    assert_close(loss, eager, 1e-6)
    assert_close(z_comp.grad, z_eager.grad, 1e-6)


# ------------------------------------------------------------------------------------------------
# pskd_topk_loss
# ------------------------------------------------------------------------------------------------
VALUES_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # output rounding


def check_pskd_topk(z, labels, values, ids, index, alpha, reduction="batchmean", rest="spread",
                    grad_tol=GRAD_TOL):
    """Kernel vs float64 reference: loss, gradient (grad_output != 1), memory and logits intact,
    and the written rows are the k largest probabilities of softmax(z), largest first, at k
    distinct classes."""
    z = z.detach().requires_grad_()
    z0, values0, ids0 = z.detach().clone(), values.clone(), ids.clone()
    B, k = z.shape[0], values.shape[1]
    values_out = torch.full((B, k), float("nan"), dtype=values.dtype, device=z.device)
    ids_out = torch.full((B, k), -1, dtype=torch.int32, device=z.device)
    loss = skd_kernels.pskd_topk_loss(z, labels, values, ids, index, alpha, reduction, rest=rest,
                                      values_out=values_out, ids_out=ids_out)
    assert loss.dtype == torch.float32
    weight_rows(loss, reduction, B).backward()

    z64 = z.detach().double().requires_grad_()
    alpha64 = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    ref = reference.pskd_topk_loss(z64, labels, values.double(), ids, index, alpha64, reduction,
                                   rest=rest)
    weight_rows(ref, reduction, B).backward()

    assert_close(loss, ref, LOSS_TOL)
    assert z.grad.dtype == z.dtype
    assert_close(z.grad, z64.grad, grad_tol[z.dtype])
    probs64 = torch.softmax(z64.detach(), -1).cpu()
    top64 = probs64.topk(k, dim=-1).values
    tol = VALUES_TOL[values.dtype]
    torch.testing.assert_close(values_out.double().cpu(), top64, rtol=tol, atol=tol)
    torch.testing.assert_close(probs64.gather(1, ids_out.long().cpu()), top64, rtol=1e-6, atol=1e-12)
    assert all(len(set(row)) == k for row in ids_out.tolist())
    assert torch.equal(values, values0) and torch.equal(ids, ids0) and torch.equal(z.detach(), z0)


def topk_inputs(B, C, dtype, values_dtype, k, N=64):
    """Top-k rows of random softmaxes; row 0 never written (zeros), and read by the batch."""
    probs = torch.softmax(torch.randn(N, C, device=DEVICE) * 2, -1)
    values, ids = probs.topk(k, dim=-1)
    values, ids = values.to(values_dtype), ids.int()
    values[0] = 0.0
    index = torch.randint(0, N, (B,), device=DEVICE)
    index[0] = 0
    index[-1] = index[B // 2]  # a duplicate index (B = 1: the unwritten row twice)
    return logits(B, C, dtype), torch.randint(0, C, (B,), device=DEVICE), values, ids, index


@pytest.mark.parametrize("values_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,k", [(1, 1, 1), (1, 7, 3), (37, 1000, 16), (5, 1031, 5), (2, 21841, 32)])
def test_pskd_topk_shapes_and_memory_dtypes(B, C, k, values_dtype):
    check_pskd_topk(*topk_inputs(B, C, torch.float32, values_dtype, k), 0.35)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.35, "tensor"])
@pytest.mark.parametrize("rest", ["spread", "renormalize"])
def test_pskd_topk_rest_alpha_and_logit_dtypes(rest, alpha, dtype):
    if alpha == "tensor":
        alpha = torch.tensor(0.35, device=DEVICE)
    check_pskd_topk(*topk_inputs(13, 1001, dtype, torch.float16, 7), alpha, "none", rest)


@pytest.mark.parametrize("rest", ["spread", "renormalize"])
def test_pskd_topk_multi_block_rows_and_strides(monkeypatch, rest):
    """Rows wider than one block (here 128 columns), k = 20 (not a power of 2), logits and outputs
    with a row stride."""
    monkeypatch.setattr(_dispatch, "MAX_BLOCK_C", 128)
    B, C, k = 6, 1031, 20
    _, labels, values, ids, index = topk_inputs(B, C, torch.float32, torch.float32, k)
    z = logits(B, C + 9, torch.bfloat16)[:, 4:4 + C]
    check_pskd_topk(z, labels, values, ids, index, 0.5, "none", rest)
    out = torch.zeros(B, 2 * k, dtype=torch.float16, device=DEVICE)
    out_ids = torch.zeros(B, 2 * k, dtype=torch.int32, device=DEVICE)
    skd_kernels.pskd_topk_loss(z, labels, values, ids, index, 0.5, rest=rest,
                               values_out=out[:, :k], ids_out=out_ids[:, :k])
    assert not out[:, k:].any() and not out_ids[:, k:].any()  # nothing beyond the views
    top = torch.softmax(z.double(), -1).topk(k)
    torch.testing.assert_close(out[:, :k].double(), top.values, rtol=1e-3, atol=1e-3)


def test_pskd_topk_every_class_kept_ties_and_extreme_logits():
    """k = C: no other class to spread over. A flat row: k distinct classes of probability 1/C.
    Logits of ±1e4 (clamped: ties at the max) and of 1e3, with fp32 gradients and top-k values
    as accurate as eager PyTorch's."""
    B, C = 4, 12
    z, labels, values, ids, index = topk_inputs(B, C, torch.float32, torch.float32, C)
    values[1:] = values[1:] * 0.9  # rest 0.1 with no class left to take it
    check_pskd_topk(z, labels, values, ids, index, 0.6, "none")
    z, labels, values, ids, index = topk_inputs(B, 300, torch.float32, torch.float32, 8)
    z[1] = 2.5
    z[2] = (z[2] * 1e4 / 3).clamp(-1e4, 1e4)
    z[3] = z[3] + 1e3
    check_pskd_topk(z, labels, values, ids, index, 0.6, "none", "renormalize",
                    grad_tol=LARGE_LOGITS_GRAD_TOL)


def test_pskd_topk_memory_write_before_backward_is_an_error():
    z, labels, values, ids, index = topk_inputs(4, 10, torch.float32, torch.float16, 3)
    z.requires_grad_()
    loss = skd_kernels.pskd_topk_loss(z, labels, values, ids, index, 0.5)
    values[index] = 0.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------------------------------------
# argument checks and padded lanes, every op
# ------------------------------------------------------------------------------------------------
def good_args():
    """Valid arguments of every op: B = 6 rows of C = 10 classes, N = 8 memory rows, k = 3."""
    B, C, N = 6, 10, 8
    memory = torch.softmax(torch.randn(N, C, device=DEVICE), -1)
    values, ids = memory.topk(3, dim=-1)
    return SimpleNamespace(
        z=logits(B, C, torch.float32), t=logits(B, C, torch.float32),
        labels=torch.randint(0, C, (B,), device=DEVICE), memory=memory,
        index=torch.randint(0, N, (B,), device=DEVICE),
        partner=torch.arange(B, device=DEVICE).flip(0), values=values, ids=ids.int(),
        empty=lambda *shape, **kw: torch.empty(*shape, device=DEVICE, **kw))


def _kl(x, **kw):
    return skd_kernels.softmax_kl(x.z, kw.pop("t", x.t), 2.0, **kw)


def _pskd(x, **kw):
    args = {k: kw.pop(k, getattr(x, k)) for k in ("labels", "memory", "index")}
    return skd_kernels.pskd_loss(x.z, args["labels"], args["memory"], args["index"], 0.5, **kw)


def _mixup(x, **kw):
    return skd_kernels.mixup_cross_entropy(x.z, kw.pop("labels", x.labels), **kw)


def _topk(x, **kw):
    args = {k: kw.pop(k, getattr(x, k)) for k in ("labels", "values", "ids", "index")}
    return skd_kernels.pskd_topk_loss(x.z, args["labels"], args["values"], args["ids"],
                                      args["index"], 0.5, **kw)


# Each call with one bad argument, and the error it must raise. A per-row tensor shorter than
# the batch would be read out of bounds by a kernel (garbage, or an illegal address on a GPU).
BAD_ARGS = {
    "kl-teacher-one-row": (lambda x: _kl(x, t=x.t[:1]), "differ in shape"),
    "kl-teacher-classes": (lambda x: _kl(x, t=x.t[:, :9]), "differ in shape"),
    "kl-labels-short": (lambda x: _kl(x, labels=x.labels[:4]), "labels must be"),
    "kl-labels-2d": (lambda x: _kl(x, labels=x.labels[:, None]), "labels must be"),
    "kl-reduction": (lambda x: _kl(x, reduction="mean"), "reduction"),
    "pskd-labels-short": (lambda x: _pskd(x, labels=x.labels[:4]), "labels must be"),
    "pskd-index-short": (lambda x: _pskd(x, index=x.index[:4]), "index must be"),
    "pskd-partner-short": (lambda x: _pskd(x, lam=0.5, partner=x.partner[:4]), "partner must be"),
    "pskd-memory-classes": (lambda x: _pskd(x, memory=x.memory[:, :9]), "memory must be"),
    "pskd-memory-1d": (lambda x: _pskd(x, memory=x.memory[0]), "memory must be"),
    "pskd-probs-shape": (lambda x: _pskd(x, probs_out=x.empty(6, 9)), "probs_out"),
    "pskd-probs-class-stride": (lambda x: _pskd(x, probs_out=x.empty(6, 20)[:, ::2]), "probs_out"),
    "pskd-lam-without-partner": (lambda x: _pskd(x, lam=torch.tensor(0.5, device=DEVICE)),
                                 "pass partner too"),
    "pskd-reduction": (lambda x: _pskd(x, reduction="sum"), "reduction"),
    "mixup-labels-short": (lambda x: _mixup(x, labels=x.labels[:4]), "labels must be"),
    "mixup-partner-short": (lambda x: _mixup(x, lam=0.5, partner=x.partner[:4]), "partner must be"),
    "mixup-lam-without-partner": (lambda x: _mixup(x, lam=0.5), "pass partner too"),
    "mixup-smoothing": (lambda x: _mixup(x, smoothing=1.5), "smoothing"),
    "topk-labels-short": (lambda x: _topk(x, labels=x.labels[:4]), "labels must be"),
    "topk-index-short": (lambda x: _topk(x, index=x.index[:4]), "index must be"),
    "topk-ids-shape": (lambda x: _topk(x, ids=x.ids[:, :2]), "both be"),
    "topk-ids-int64": (lambda x: _topk(x, ids=x.ids.long()), "memory_ids must be int32"),
    "topk-k-above-C": (lambda x: _topk(x, values=x.empty(8, 11),
                                       ids=x.empty(8, 11, dtype=torch.int32)), "k = 11"),
    "topk-values-out-alone": (lambda x: _topk(x, values_out=x.empty(6, 3)), "go together"),
    "topk-values-out-shape": (lambda x: _topk(x, values_out=x.empty(6, 2),
                                              ids_out=x.empty(6, 3, dtype=torch.int32)),
                              "values_out must be"),
    "topk-ids-out-int64": (lambda x: _topk(x, values_out=x.empty(6, 3),
                                           ids_out=x.empty(6, 3, dtype=torch.int64)),
                           "ids_out must be int32"),
    "topk-rest": (lambda x: _topk(x, rest="drop"), "rest"),
}


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_on_both_paths(monkeypatch, case, path):
    """The same check runs before the kernels and in skd_kernels.reference (the path of CPU
    tensors, float64, and platforms without Triton): a clear ValueError, no kernel launched."""
    monkeypatch.setattr(_dispatch, "FORCE_REFERENCE", path == "reference")
    for module in (softmax_kl_mod, pskd_mod, pskd_topk_mod):
        monkeypatch.setattr(module, "_forward",
                            lambda *a, **k: pytest.fail("a kernel launched before the check"))
    call, match = BAD_ARGS[case]
    with pytest.raises(ValueError, match=match):
        call(good_args())


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_leading_dims_on_both_paths(monkeypatch, path):
    """Logits [2, 3, C] with per-row tensors [2, 3] (partner: flat row numbers) and outputs
    [2, 3, ·]: the same rows and outputs as the flat [6, C] call."""
    monkeypatch.setattr(_dispatch, "FORCE_REFERENCE", path == "reference")
    x = good_args()
    rows = lambda v: v.view(2, 3, *v.shape[1:])  # noqa: E731
    mixing = dict(lam=0.3, partner=x.partner, smoothing=0.1)
    probs_flat, probs = x.empty(6, 10), x.empty(2, 3, 10)
    top = [(x.empty(6, 3), x.empty(6, 3, dtype=torch.int32)),
           (x.empty(2, 3, 3), x.empty(2, 3, 3, dtype=torch.int32))]
    flat = [skd_kernels.softmax_kl(x.z, x.t, 2.0, "none", labels=x.labels),
            skd_kernels.pskd_loss(x.z, x.labels, x.memory, x.index, 0.4, "none",
                                  probs_out=probs_flat, **mixing),
            skd_kernels.pskd_topk_loss(x.z, x.labels, x.values, x.ids, x.index, 0.4, "none",
                                       values_out=top[0][0], ids_out=top[0][1])]
    nested = [skd_kernels.softmax_kl(rows(x.z), rows(x.t), 2.0, "none", labels=rows(x.labels)),
              skd_kernels.pskd_loss(rows(x.z), rows(x.labels), x.memory, rows(x.index), 0.4, "none",
                                    probs_out=probs, **{**mixing, "partner": rows(x.partner)}),
              skd_kernels.pskd_topk_loss(rows(x.z), rows(x.labels), x.values, x.ids, rows(x.index),
                                         0.4, "none", values_out=top[1][0], ids_out=top[1][1])]
    for a, b in zip(nested, flat):
        assert a.shape == (2, 3)
        assert_close(a.flatten(), b, 1e-6)
    assert torch.equal(probs.flatten(0, 1), probs_flat)
    assert torch.equal(top[1][0].flatten(0, 1), top[0][0])
    assert torch.equal(top[1][1].flatten(0, 1), top[0][1])


@pytest.mark.skipif(not _dispatch.INTERPRET, reason="numpy's floating-point flags: interpreter")
def test_padded_lanes_compute_no_inf_or_nan():
    """Padded lanes, rows and top-k slots are never stored, and nothing computed there overflows
    or is NaN either (a padded logit read as 0 against a row max of -1e4 would give exp(1e4)):
    under the interpreter numpy's overflow, invalid and divide flags raise."""
    B, C, k = 5, 50, 3  # 14 padded lanes of 64, padded rows, one padded slot of 4
    z = logits(B, C, torch.float32, scale=1e4).clamp(-1e4, 1e4) - 2e4
    labels = torch.randint(0, C, (B,), device=DEVICE)
    memory = torch.softmax(torch.randn(8, C, device=DEVICE), -1)
    values, ids = memory.topk(k, dim=-1)
    index = torch.randint(0, 8, (B,), device=DEVICE)
    mixing = mixing_args(B)
    calls = [
        lambda x: skd_kernels.softmax_kl(x, x.detach().flip(0), 2.0, labels=labels),
        lambda x: skd_kernels.pskd_loss(x, labels, memory, index, 0.4,
                                        probs_out=torch.empty_like(x), **mixing),
        lambda x: skd_kernels.mixup_cross_entropy(x, labels, **mixing),
        lambda x: skd_kernels.pskd_topk_loss(x, labels, values, ids.int(), index, 0.4,
                                             values_out=torch.empty(B, k, device=DEVICE),
                                             ids_out=torch.empty(B, k, dtype=torch.int32,
                                                                 device=DEVICE)),
    ]
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for call in calls:
            x = z.clone().requires_grad_()
            call(x).backward()
            assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# dispatch, compilation and tracing
# ------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLOATS = {"inv_T", "kl_scale", "kl_coef", "ce_weight", "alpha", "lam", "eps"}
LOW = {"s_ptr": "*bf16", "t_ptr": "*fp16", "ds_ptr": "*bf16", "z_ptr": "*bf16", "dz_ptr": "*bf16",
       "mem_ptr": "*fp16", "p_ptr": "*bf16", "y_ptr": "*i64", "idx_ptr": "*i32",
       "partner_ptr": "*i64", "mv_ptr": "*fp16", "mi_ptr": "*i32", "ov_ptr": "*fp16", "oi_ptr": "*i32"}

def compile_sm90(module, kernel, **constexprs):
    fn = getattr(importlib.import_module(module), kernel)
    sig = {n: "constexpr" if n in constexprs else LOW.get(n, "*fp32") if n.endswith("_ptr")
           else "fp32" if n in FLOATS else "i32" for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

tile = dict(BLOCK_B=2, BLOCK_C=256)
compile_sm90("skd_kernels.softmax_kl", "_softmax_kl_fwd_kernel", HAS_LABELS=True, CE_OWN_LSE=True,
             **tile)
compile_sm90("skd_kernels.softmax_kl", "_softmax_kl_bwd_kernel", HAS_LABELS=True, **tile)
for single in (True, False):  # PS-KD with a mixed target / Mixup CE without a memory
    scalars = dict(ALPHA_IS_TENSOR=single, LAM_IS_TENSOR=single, EPS_IS_TENSOR=not single)
    compile_sm90("skd_kernels.pskd", "_pskd_fwd_kernel", HAS_MEMORY=single, HAS_PARTNER=True,
                 WRITE_PROBS=single, SINGLE_BLOCK=single, **scalars, **tile)
    compile_sm90("skd_kernels.pskd", "_pskd_bwd_kernel", HAS_MEMORY=single, HAS_PARTNER=True,
                 **scalars, **tile)
compile_sm90("skd_kernels.pskd", "_pskd_fwd_kernel", HAS_MEMORY=True, HAS_PARTNER=False,
             ALPHA_IS_TENSOR=True, LAM_IS_TENSOR=False, EPS_IS_TENSOR=False, WRITE_PROBS=True,
             SINGLE_BLOCK=False, **tile)
compile_sm90("skd_kernels.pskd", "_pskd_bwd_kernel", HAS_MEMORY=True, HAS_PARTNER=False,
             ALPHA_IS_TENSOR=True, LAM_IS_TENSOR=False, EPS_IS_TENSOR=False, **tile)
for spread in (True, False):
    compile_sm90("skd_kernels.pskd_topk", "_pskd_topk_fwd_kernel", ALPHA_IS_TENSOR=spread,
                 REST_SPREAD=spread, WRITE_TOPK=True, BLOCK_K=32, **tile)
    compile_sm90("skd_kernels.pskd_topk", "_pskd_topk_bwd_kernel", ALPHA_IS_TENSOR=spread,
                 REST_SPREAD=spread, BLOCK_K=16, **tile)
"""


def test_kernels_compile_for_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects (a non-constexpr global, say): compile
    every kernel for sm_90 ahead of time, which needs no GPU, in a process without the flag."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, cwd=Path(skd_kernels.__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cpu_without_interpreter_takes_reference(monkeypatch):
    """With the interpreter flag off, CPU tensors go to skd_kernels.reference and no kernel launches."""
    monkeypatch.setattr(_dispatch, "INTERPRET", False)

    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton launcher ran for CPU tensors")

    monkeypatch.setattr(softmax_kl_mod, "_forward", no_launch)
    monkeypatch.setattr(pskd_mod, "_forward", no_launch)
    real = {name: getattr(reference, name) for name in ("softmax_kl", "pskd_loss")}
    calls = []
    for name, fn in real.items():
        monkeypatch.setattr(reference, name,
                            lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))

    s, t = torch.randn(3, 7), torch.randn(3, 7)
    memory = torch.softmax(torch.randn(5, 7), -1)
    labels, index = torch.tensor([0, 6, 2]), torch.tensor([4, 4, 1])
    assert torch.equal(skd_kernels.softmax_kl(s, t, 2.0), real["softmax_kl"](s, t, 2.0))
    assert torch.equal(skd_kernels.pskd_loss(s, labels, memory, index, 0.3),
                       real["pskd_loss"](s, labels, memory, index, 0.3))
    assert calls == ["softmax_kl", "pskd_loss"]


def test_float64_takes_reference(monkeypatch):
    """The kernels compute in fp32; fp64 inputs keep the reference's fp64 result and gradient."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton launcher ran for float64 tensors")

    monkeypatch.setattr(softmax_kl_mod, "_forward", no_launch)
    monkeypatch.setattr(pskd_mod, "_forward", no_launch)
    s, t = logits(3, 7, torch.float64), logits(3, 7, torch.float64)
    assert skd_kernels.softmax_kl(s, t, 2.0).dtype == torch.float64
    memory = torch.softmax(torch.randn(5, 7, device=DEVICE), -1)
    labels, index = torch.tensor([0, 6, 2], device=DEVICE), torch.tensor([4, 4, 1], device=DEVICE)
    assert skd_kernels.pskd_loss(s, labels, memory, index, 0.3).dtype == torch.float64


def test_traces_without_graph_break():
    """Dynamo traces both losses, forward and backward, in one graph (aot_eager: no compiler):
    no host synchronisation or data-dependent Python in the path."""
    B, C = 8, 40
    z, labels, memory, index = pskd_inputs(B, C, torch.float32, torch.float16)
    t = logits(B, C, torch.float32)
    alpha = torch.tensor(0.4, device=DEVICE)
    probs = torch.empty(B, C, dtype=torch.float16, device=DEVICE)

    def step(z, probs):
        return (skd_kernels.softmax_kl(z, t, 4.0, labels=labels)
                + skd_kernels.pskd_loss(z, labels, memory, index, alpha, probs_out=probs))

    z_eager = z.detach().requires_grad_()
    step(z_eager, probs).backward()
    probs_eager = probs.clone()
    probs.zero_()
    z_comp = z.detach().requires_grad_()
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(z_comp, probs)
    loss.backward()
    assert_close(loss, step(z.detach(), probs_eager.clone()), 1e-6)
    assert_close(z_comp.grad, z_eager.grad, 1e-6)
    assert torch.equal(probs, probs_eager)


def test_pskd_topk_traces_without_graph_break():
    """Dynamo traces the top-k loss with its outputs, forward and backward, in one graph."""
    z, labels, values, ids, index = topk_inputs(8, 40, torch.float32, torch.float16, 5)
    alpha = torch.tensor(0.4, device=DEVICE)
    out_eager = (torch.empty(8, 5, dtype=torch.float16, device=DEVICE),
                 torch.empty(8, 5, dtype=torch.int32, device=DEVICE))
    out_comp = (torch.empty_like(out_eager[0]), torch.empty_like(out_eager[1]))

    def step(z, out):
        return skd_kernels.pskd_topk_loss(z, labels, values, ids, index, alpha,
                                          values_out=out[0], ids_out=out[1])

    z_eager, z_comp = z.detach().requires_grad_(), z.detach().requires_grad_()
    step(z_eager, out_eager).backward()
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(z_comp, out_comp)
    loss.backward()
    assert_close(z_comp.grad, z_eager.grad, 1e-6)
    assert torch.equal(out_comp[0], out_eager[0]) and torch.equal(out_comp[1], out_eager[1])


def test_pskd_topk_cpu_without_interpreter_takes_reference(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    monkeypatch.setattr(pskd_topk_mod, "_forward",
                        lambda *a, **k: pytest.fail("a Triton launcher ran for CPU tensors"))
    z, labels = torch.randn(3, 7), torch.tensor([0, 6, 2])
    values, ids = torch.softmax(torch.randn(5, 7), -1).topk(2)
    index = torch.tensor([4, 4, 1])
    assert torch.equal(skd_kernels.pskd_topk_loss(z, labels, values, ids.int(), index, 0.3),
                       reference.pskd_topk_loss(z, labels, values, ids.int(), index, 0.3))


@pytest.mark.skipif(not _dispatch.INTERPRET, reason="--smoke runs under TRITON_INTERPRET=1")
def test_bench_harness_smoke(tmp_path, capsys):
    """The benchmark harness end to end on CPU (wall-clock timer, tiny shape): table and JSON."""
    from skd_kernels import bench

    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--shapes", "4x20", "--dtypes", "bf16", "--providers", "triton", "eager",
                "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "git_commit", "date", "copy_GBps"} <= result.keys()
    rows = result["results"]
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == {
        (op, p, m) for op in bench.CASES for p in ("triton", "eager") for m in bench.MODES}
    assert all(r["ms"] > 0 and r["git_commit"] == result["git_commit"] for r in rows)
    assert "softmax_kl" in capsys.readouterr().out


def every_loss(device, B=64, C=1000):
    """The logits ``z`` [B, C] bf16, ``forward()``: the sum of every op on ``z`` (softmax_kl with
    CE; pskd_loss with probs_out, and with a Mixup target; mixup_cross_entropy; pskd_topk_loss
    with the new top-k, k = 32), each tensor scalar a 0-dim device tensor, and the tensors the
    ops write (probs_out, values_out, ids_out)."""
    z = torch.randn(B, C, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(B, C, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, C, (B,), device=device)
    memory = torch.softmax(torch.randn(512, C, device=device), -1).half()
    values, ids = memory.topk(32, dim=-1)
    ids = ids.int()
    index = torch.randint(0, 512, (B,), device=device)
    alpha = torch.tensor(0.3, device=device)
    mixing = dict(lam=torch.tensor(0.6, device=device), partner=torch.randperm(B, device=device),
                  smoothing=torch.tensor(0.1, device=device))
    written = dict(probs=torch.empty(B, C, device=device, dtype=torch.float16),
                   values=torch.empty(B, 32, device=device, dtype=torch.float16),
                   ids=torch.empty(B, 32, device=device, dtype=torch.int32))

    def forward():
        return (skd_kernels.softmax_kl(z, t, 4.0, labels=labels)
                + skd_kernels.pskd_loss(z, labels, memory, index, alpha, probs_out=written["probs"])
                + skd_kernels.pskd_loss(z, labels, memory, index, alpha, **mixing)
                + skd_kernels.mixup_cross_entropy(z, labels, **mixing)
                + skd_kernels.pskd_topk_loss(z, labels, values, ids, index, alpha,
                                             values_out=written["values"], ids_out=written["ids"]))

    return z, forward, written


@pytest.mark.gpu
def test_cuda_graph_capture_and_compile():
    """Forward and backward of every kernel (plain, mixed-target and top-k PS-KD included) replay
    from a CUDA graph, and compile with inductor, matching eager, the written outputs too."""
    if _dispatch.INTERPRET:
        pytest.skip("compiled Triton needed: run with TRITON_INTERPRET=0")
    z, forward, written = every_loss("cuda")

    def step(forward=forward):
        z.grad = None
        loss = forward()
        loss.backward()
        return loss

    def clear_written():  # so that a match proves the outputs were written again
        for out in written.values():
            out.fill_(-1)

    eager_loss = step().detach().clone()
    eager_grad = z.grad.clone()
    eager_written = {name: out.clone() for name, out in written.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    z.grad = None
    with torch.cuda.graph(graph):
        graph_loss = step()
    clear_written()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(graph_loss, eager_loss, 1e-6)
    assert_close(z.grad, eager_grad, 1e-6)  # the same kernels and additions as eager
    for name, out in written.items():
        assert torch.equal(out, eager_written[name]), name

    clear_written()
    compiled_loss = step(torch.compile(forward, fullgraph=True))
    assert_close(compiled_loss, eager_loss, 1e-6)
    # Inductor adds the five bf16 gradients in fp32 and rounds once; eager rounds each sum.
    assert_close(z.grad, eager_grad, GRAD_TOL[z.dtype])
    for name, out in written.items():
        assert torch.equal(out, eager_written[name]), name
