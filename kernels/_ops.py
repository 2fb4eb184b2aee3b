"""The scaffolding every fused row loss shares: a Triton forward and backward wrapped as
``torch.library`` custom ops (one opaque call each for ``torch.compile`` and CUDA graphs, with
shape-only fake versions), and the ``torch.autograd.Function`` that ties them together.

A kernel module provides two host launchers named ``_forward`` and ``_backward``, fully
type-annotated (the annotations are the ops' schemas; the launchers are looked up on the module at
every call, so a test can wrap them):

- ``forward(logits_BC, *inputs, *outputs) -> (loss_B fp32, stats_BS fp32)``: per-row losses and
  ``S`` per-row statistics for the backward; the trailing ``outputs`` are optional tensors the
  kernel writes in the same pass (``probs_out``, a top-k), never read;
- ``backward(grad_B, logits_BC, *inputs, stats_BS) -> grad_logits_BC`` in the logits' dtype.

The gradient flows to the logits only; no input is ever written.
"""
from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["fused_row_loss"]


def fused_row_loss(name: str, module: ModuleType, *, num_stats: int,
                   outputs: tuple[str, ...] = ()) -> type[torch.autograd.Function]:
    """Custom ops ``skd_kernels::<name>_fwd`` / ``_bwd`` around ``module._forward`` /
    ``module._backward`` and an autograd Function whose ``apply(logits_BC, *inputs, *outputs)``
    returns the row losses."""
    def fwd(*args):
        return module._forward(*args)

    def bwd(*args):
        return module._backward(*args)

    fwd_op = torch.library.custom_op(f"skd_kernels::{name}_fwd", fwd, mutates_args=outputs,
                                     schema=torch.library.infer_schema(module._forward, mutates_args=outputs))
    bwd_op = torch.library.custom_op(f"skd_kernels::{name}_bwd", bwd, mutates_args=(),
                                     schema=torch.library.infer_schema(module._backward, mutates_args=()))

    @fwd_op.register_fake
    def _(logits_BC, *args):
        B = logits_BC.shape[0]
        return logits_BC.new_empty(B, dtype=torch.float32), logits_BC.new_empty(B, num_stats, dtype=torch.float32)

    @bwd_op.register_fake
    def _(grad_B, logits_BC, *args):
        return torch.empty(logits_BC.shape, dtype=logits_BC.dtype, device=logits_BC.device)

    num_outputs = len(outputs)

    class RowLossFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            loss_B, stats_BS = fwd_op(*args)
            inputs = args[: len(args) - num_outputs]
            # Tensors (and absent optional tensors) are saved; numbers and flags kept as they are.
            ctx.is_tensor = [isinstance(a, torch.Tensor) or a is None for a in inputs]
            ctx.save_for_backward(*[a for a, t in zip(inputs, ctx.is_tensor) if t], stats_BS)
            ctx.plain = [a for a, t in zip(inputs, ctx.is_tensor) if not t]
            ctx.num_args = len(args)
            return loss_B

        @staticmethod
        def backward(ctx, grad_B):
            *tensors, stats_BS = ctx.saved_tensors
            tensors, plain = iter(tensors), iter(ctx.plain)
            inputs = [next(tensors) if t else next(plain) for t in ctx.is_tensor]
            grad_logits = bwd_op(grad_B, *inputs, stats_BS) if ctx.needs_input_grad[0] else None
            return (grad_logits,) + (None,) * (ctx.num_args - 1)

    RowLossFunction.__name__ = RowLossFunction.__qualname__ = f"{name.title().replace('_', '')}Function"
    return RowLossFunction
