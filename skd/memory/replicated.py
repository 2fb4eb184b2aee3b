"""A memory replicated on every process: all ``N`` rows everywhere, written with an all-gather."""
from __future__ import annotations

import torch
from torch import nn

from skd.collectives import all_gather, pad_rows, world
from skd.memory.rows import Fields, FetchedRows, check_state, last_write_wins, on_device


class ReplicatedRows(nn.Module):
    """Every process holds the ``[N + 1, width]`` tensor of each field; row ``N`` is scratch.

    A write takes the rows of every rank (one all-gather of the ids and one per field, padded to
    the per-rank capacity so every rank sends one shape; padded rows land in the scratch row, which
    filtering would need a host sync to avoid), then one indexed write per field after
    ``last_write_wins``, so the replicas stay identical without a broadcast. The tensors are not
    buffers (DDP would broadcast them every forward): they are allocated on first use, on the
    device of the first batch, and saved through the module's extra state.
    """

    def __init__(self, num_samples: int, fields: Fields) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.fields = dict(fields)
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensors_on(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The ``[N + 1, width]`` tensors, allocated (zeros; on the CPU without ``device``) or
        moved to ``device`` when needed."""
        self._tensors = on_device(self._tensors, self.num_samples + 1, self.fields, device)
        return self._tensors

    def fetch(self, index: torch.Tensor) -> FetchedRows:
        """The rows of the batch ``index``: the whole tables, read at ``index`` (no copy)."""
        return FetchedRows(self.tensors_on(index.device), index)

    @torch.no_grad()
    def write_rows(self, index: torch.Tensor, rows: dict[str, torch.Tensor], capacity: int) -> None:
        """Store ``rows[name][i]`` at row ``index[i]`` for the batches of every rank.

        ``capacity`` is the per-rank batch size: batches are padded to it so every rank
        all-gathers tensors of one shape, even when a batch came out short.
        """
        if index.shape[0] > capacity:  # a host integer: no sync
            raise ValueError(f"write of {index.shape[0]} rows, more than the capacity {capacity} every rank "
                             f"pads its batch to (the per-process batch size)")
        tensors = self.tensors_on(index.device)
        rows = {name: rows[name].to(t.dtype) for name, t in tensors.items()}
        if world()[1] > 1:
            index = all_gather(pad_rows(index, capacity, value=self.num_samples))
            rows = {name: all_gather(pad_rows(r, capacity)) for name, r in rows.items()}
        index = last_write_wins(index, self.num_samples)
        for name, t in tensors.items():
            t[index] = rows[name]

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors_on())

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state(state, self.fields, self.num_samples + 1, "memory in checkpoint")
        device = None if self._tensors is None else next(iter(self._tensors.values())).device
        self._tensors = {name: state[name].to(device=device, dtype=dtype)
                         for name, (_, dtype) in self.fields.items()}


class SoftTargetMemory(ReplicatedRows):
    """One replicated ``[N, C]`` table (plus the scratch row): PS-KD's dense memory, CRD's
    embeddings. Row ``i`` holds what the model gave sample ``i`` the last time it was trained on
    (fp16 by default: 2.6 GB for ImageNet-1k's soft targets)."""

    def __init__(self, num_samples: int, num_classes: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__(num_samples, {"table": (num_classes, dtype)})

    @property
    def table(self) -> torch.Tensor:
        """The ``[N + 1, C]`` table, scratch row included."""
        return self.tensors_on()["table"]

    @property
    def rows(self) -> torch.Tensor:
        """The ``[N, C]`` memory without the scratch row."""
        return self.table[: self.num_samples]

    def to_device(self, device: torch.device) -> torch.Tensor:
        """The table on ``device`` (it is not moved by ``Module.to``)."""
        return self.tensors_on(device)["table"]

    def write(self, index: torch.Tensor, probs: torch.Tensor, capacity: int) -> None:
        """``write_rows`` of the one table."""
        self.write_rows(index, {"table": probs}, capacity)
