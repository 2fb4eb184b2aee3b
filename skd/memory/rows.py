"""What every memory placement shares: the row layout, the fetched rows of a batch, and the rule
that decides which write wins when one step writes a row more than once."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from skd.errors import CheckpointError

Fields = dict[str, tuple[int, torch.dtype]]
"""The rows of a memory: a name → (row width, dtype), e.g. ``{"table": (C, torch.float16)}``."""


class FetchedRows:
    """The rows of a batch as the kernels read them: batch row ``i`` is ``tensors[name][index[i]]``
    (the whole replicated table and the batch's ids, or the fetched rows in arrival order and each
    batch row's position among them). A sharded fetch may still be in flight: call ``wait()``
    before reading, as late as possible (the model's forward runs meanwhile)."""

    def __init__(self, tensors: dict[str, torch.Tensor], index: torch.Tensor,
                 pending: Sequence[Any] = ()) -> None:
        self.tensors = tensors
        self.index = index
        self._pending = list(pending)

    def wait(self) -> FetchedRows:
        for work in self._pending:
            work.wait()
        self._pending.clear()
        return self


def allocate(num_rows: int, fields: Fields, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Zeroed ``[num_rows, width]`` tensors, one per field."""
    return {name: torch.zeros(num_rows, width, dtype=dtype, device=device)
            for name, (width, dtype) in fields.items()}


def on_device(tensors: dict[str, torch.Tensor] | None, num_rows: int, fields: Fields,
              device: torch.device | None) -> dict[str, torch.Tensor]:
    """``tensors`` moved to ``device`` when they are elsewhere, or allocated (zeros; on the CPU
    without ``device``) when there are none yet."""
    if tensors is None:
        return allocate(num_rows, fields, device or "cpu")
    if device is not None and next(iter(tensors.values())).device != device:
        return {name: t.to(device) for name, t in tensors.items()}
    return tensors


def check_state(state: dict[str, torch.Tensor], fields: Fields, num_rows: int, what: str) -> None:
    """A clear error when saved rows do not match this memory's fields."""
    if set(state) != set(fields):
        raise CheckpointError(f"{what} holds {sorted(state)}, expected {sorted(fields)}: saved with "
                              f"another method.memory setting?")
    for name, (width, _) in fields.items():
        if tuple(state[name].shape) != (num_rows, width):
            raise CheckpointError(f"{what}: '{name}' has shape {tuple(state[name].shape)}, expected "
                                  f"{(num_rows, width)}")


def last_write_wins(index: torch.Tensor, scratch: int) -> torch.Tensor:
    """``index`` with every occurrence of a repeated id but the last replaced by ``scratch``.

    Writes gathered from all ranks are ordered by rank, then by position in the rank's batch, so
    the rule is: **the highest rank wins, then the later position**. After it, an indexed write
    ``table[result] = rows`` has one writer per real row (only the scratch row gets several), so it
    stores the same values on CUDA as on the CPU, without a host synchronisation: a stable sort of
    the ids, the last of each run kept.
    """
    ids, order = torch.sort(index, stable=True)
    last = torch.ones_like(ids, dtype=torch.bool)
    last[:-1] = ids[1:] != ids[:-1]
    keep = torch.empty_like(last)
    keep[order] = last
    return torch.where(keep, index, scratch)
