"""PS-KD's per-sample soft-target memory: ``[N, C]`` past probabilities on the training device."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class SoftTargetMemory(nn.Module):
    """Row ``i`` holds the softmax the model gave sample ``i`` the last time it was trained on.

    Every rank holds a full replica (fp16 by default: 2.6 GB for ImageNet-1k). Writes take the
    rows of all ranks (one all-gather of indices and probabilities, one indexed write), so the
    replicas stay identical without a broadcast. The table is deliberately not a buffer: DDP
    would broadcast it every forward. It is saved through the module's extra state.
    """

    def __init__(self, num_samples: int, num_classes: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.num_samples = num_samples
        # Row N is scratch: padded rows of an uneven all-gather land there instead of being
        # filtered out (filtering would need a host sync).
        self.table = torch.zeros(num_samples + 1, num_classes, dtype=dtype)

    @property
    def rows(self) -> torch.Tensor:
        """The ``[N, C]`` memory without the scratch row."""
        return self.table[: self.num_samples]

    def to_device(self, device: torch.device) -> torch.Tensor:
        """Move the table to ``device`` once (it is not moved by ``Module.to``) and return it."""
        if self.table.device != device:
            self.table = self.table.to(device)
        return self.table

    @torch.no_grad()
    def write(self, index: torch.Tensor, probs: torch.Tensor, capacity: int) -> None:
        """Store ``probs[i]`` at row ``index[i]`` for the rows of every rank.

        ``capacity`` is the per-rank batch size: rows are padded to it so every rank
        all-gathers tensors of one shape, even when a batch came out short.
        """
        table = self.to_device(probs.device)
        probs = probs.to(table.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pad = capacity - index.shape[0]
            index = F.pad(index, (0, pad), value=self.num_samples)
            probs = F.pad(probs, (0, 0, 0, pad))
            world = dist.get_world_size()
            index_all = index.new_empty(world * capacity)
            probs_all = probs.new_empty(world * capacity, probs.shape[1])
            dist.all_gather_into_tensor(index_all, index.contiguous())
            dist.all_gather_into_tensor(probs_all, probs.contiguous())
            index, probs = index_all, probs_all
        table[index] = probs

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        table = state["table"]
        if table.shape != self.table.shape:
            raise ValueError(f"PS-KD memory in checkpoint has shape {tuple(table.shape)}, "
                             f"expected {tuple(self.table.shape)} (N+1 rows, C columns)")
        self.table = table.to(device=self.table.device, dtype=self.table.dtype)
