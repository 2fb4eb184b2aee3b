"""The training batch: one type for what the loaders deliver, Mixup adds and the methods read.

A batch is a plain ``dict`` of tensors (so ``accelerate`` and ``DataLoader`` move and collate it
as usual); ``Batch`` names its entries and their meaning in one place. Loaders fill the required
entries and those a method asks for through ``Method.train_loader_options``; ``skd.mixup`` adds
the ``mix_*`` entries and ``target`` to a mixed batch; the training loop moves every entry to the
device and never reads one by name except ``label`` (to count images).
"""
from __future__ import annotations

from typing import TypedDict

import torch
from typing_extensions import NotRequired

__all__ = ["Batch"]


class Batch(TypedDict):
    image: torch.Tensor
    """``[B, 3, H, W]`` normalised images (float; on the GPU already with the DALI backend)."""
    label: torch.Tensor
    """``[B]`` int64 class indices in ``[0, num_classes)``."""
    index: torch.Tensor
    """``[B]`` int64 global sample ids in the training (or evaluation) shards: the row of a
    sample in per-sample state such as PS-KD's memory."""
    partner: NotRequired[torch.Tensor]
    """CS-KD (``with_partner``): ``[B, 3, H, W]`` a same-class partner image per anchor."""
    partner_index: NotRequired[torch.Tensor]
    """CS-KD: ``[B]`` int64 sample ids of the partners."""
    repeat: NotRequired[torch.Tensor]
    """DLB (``repeat_previous``): ``[B', 3, H, W]`` the samples of this process's previous batch,
    augmented anew (``B' = 0`` at the first batch of the first epoch)."""
    repeat_label: NotRequired[torch.Tensor]
    """DLB: ``[B']`` int64 classes of the repeated samples."""
    repeat_index: NotRequired[torch.Tensor]
    """DLB: ``[B']`` int64 sample ids of the repeated samples."""
    target: NotRequired[torch.Tensor]
    """Mixup/CutMix: ``[B, C]`` fp32 mixed, label-smoothed soft targets (timm's ``mixup_target``)."""
    mix_lam: NotRequired[torch.Tensor]
    """Mixup/CutMix: 0-dim fp32 λ, the weight of each row's own sample."""
    mix_partner: NotRequired[torch.Tensor]
    """Mixup/CutMix: ``[B]`` int64 row each row is mixed with (``B − 1 − i``)."""
    mix_smoothing: NotRequired[torch.Tensor]
    """Mixup/CutMix: 0-dim fp32 label-smoothing ε inside the mixed target."""
