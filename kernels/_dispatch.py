"""Which path a call takes (Triton or ``skd_kernels.reference``), the launch shapes of the kernels
and their scalar arguments.

This module does not import Triton, so ``import skd_kernels`` works where Triton is not installed.
"""
from __future__ import annotations

import os

import torch

__all__ = ["INTERPRET", "FORCE_REFERENCE", "MAX_BLOCK_C", "use_triton", "launch_config",
           "as_rows", "split_scalar", "scalar_args"]

# Triton decides at decoration time whether a @triton.jit kernel is compiled or interpreted, so the
# flag is read once, at import, exactly as Triton reads it (tests set it in tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

# Send every call to skd_kernels.reference, CUDA tensors included (read at each call): the
# baseline of `python -m skd.bench gpu`, which times training steps with and without the kernels.
FORCE_REFERENCE = False

# Widest column block one program holds; wider rows are walked block by block with an online
# max/sum. Tests lower it to reach the multi-block path with small C.
MAX_BLOCK_C = 4096

# Rows per program. On a GPU: at most 4 rows and about 1024 elements, which compiles (sm_90)
# to <= 80 registers without spills, where 8 rows of 128 or 256 columns spill; not timed yet (no
# GPU in this session). The interpreter charges about 1 ms per program, so there a program takes
# many rows.
_GPU_MAX_ROWS, _GPU_TILE = 4, 1024
_INTERPRETER_TILE = 16384


def use_triton(x: torch.Tensor) -> bool:
    """True if ``x`` is a CUDA tensor, or a CPU tensor while ``TRITON_INTERPRET=1``, unless it is
    float64 (the kernels compute in fp32, so fp64 oracles and gradcheck keep the reference) or
    ``FORCE_REFERENCE`` is set."""
    return ((x.is_cuda or (INTERPRET and x.device.type == "cpu")) and x.dtype != torch.float64
            and not FORCE_REFERENCE)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_config(B: int, C: int, device: torch.device) -> tuple[int, int, dict]:
    """``(BLOCK_B, BLOCK_C, launch options)`` for ``B`` rows of ``C`` classes: several rows per
    program when C is small, one row walked in ``MAX_BLOCK_C`` blocks when C is large. FMA fusion
    is pinned on (Triton's default until 3.9), so the numerics do not change with Triton's."""
    block_c = min(_next_power_of_2(max(C, 16)), MAX_BLOCK_C)
    if device.type == "cpu":  # the interpreter
        block_b = min(_INTERPRETER_TILE // block_c, _next_power_of_2(B))
    else:
        block_b = min(_GPU_MAX_ROWS, _GPU_TILE // block_c, _next_power_of_2(B))
    block_b = max(block_b, 1)
    num_warps = max(4, min(16, block_b * block_c // 256))
    return block_b, block_c, {"num_warps": num_warps, "enable_fp_fusion": True}


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, C]`` with a unit class stride. A 2-D tensor with any row stride (a column
    slice, an expanded row) is returned as is; only a strided class dimension is copied."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    return x


def split_scalar(x: float | torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """A kernel's scalar argument as ``(tensor, 0.0)`` when ``x`` is a tensor on ``device`` (read by
    the kernel, never by the host), else ``(None, float(x))`` (a CPU scalar beside CUDA tensors:
    reading it waits on no GPU work)."""
    if isinstance(x, torch.Tensor) and x.device == device:
        return x.detach().reshape(()), 0.0
    return None, float(x)


def scalar_args(dummy: torch.Tensor,
                **scalars: tuple[torch.Tensor | None, float]) -> tuple[list, dict[str, bool]]:
    """The kernel arguments of scalars split by ``split_scalar``: ``(pointer, value)`` for each,
    in order (``dummy``, never read, where there is no tensor), and the constexpr flags
    ``<NAME>_IS_TENSOR`` of the kernel's ``load_scalar``."""
    args, flags = [], {}
    for name, (tensor, value) in scalars.items():
        args += [dummy if tensor is None else tensor, value]
        flags[f"{name.upper()}_IS_TENSOR"] = tensor is not None
    return args, flags
