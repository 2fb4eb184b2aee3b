"""The collectives that methods and memories share, on the default process group.

Every rank must call them in the same order with tensors of one shape, so batches that may come
out short (an epoch's last batch, a skipped corrupt image) are padded to the per-rank capacity
first. Without a process group (one process) they return their input. None of them reads a value
on the host, so none of them waits for the device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["world", "pad_rows", "all_gather", "all_gather_padded"]

# torch >= 2.10 renamed all_gather_into_tensor (now deprecated, with a warning per call).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pad_rows(x: torch.Tensor, capacity: int, value: float = 0.0) -> torch.Tensor:
    """``x`` (``[n, ...]``) with rows of ``value`` appended up to ``capacity`` rows."""
    if x.shape[0] > capacity:  # a host integer: no sync
        raise ValueError(f"{x.shape[0]} rows, more than the capacity {capacity} every rank pads its "
                         f"batch to (the per-process batch size)")
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, capacity - x.shape[0]), value=value)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (one shape on all ranks), concatenated along dim 0 in rank order."""
    _, world_size = world()
    if world_size == 1:
        return x
    out = x.new_empty(world_size * x.shape[0], *x.shape[1:])
    _all_gather_single(out, x.contiguous())
    return out


def all_gather_padded(x: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows ``x`` (``[n_r, ...]``, ``n_r <= capacity``, same trailing shape), each
    padded with zeros to ``capacity`` rows and concatenated in rank order: ``[W·capacity, ...]``,
    with the bool mask ``[W·capacity]`` of the real rows. Rank r's rows start at ``r·capacity``.
    One collective: each row travels with a flag (1 on real rows, 0 on padding)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    gathered = all_gather(pad_rows(torch.cat([flat, flat.new_ones(n, 1)], dim=1), capacity))
    return gathered[:, :-1].reshape(-1, *x.shape[1:]), gathered[:, -1] != 0
