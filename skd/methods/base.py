"""The method protocol: everything method-specific about a training step lives behind it.

A method is an ``nn.Module`` (timm ``task`` style) that owns the student model and any extra
trainable modules (USKD's weak head, ICKD's embed), holds its state (PS-KD's memory) in its
``state_dict``, and computes the loss from a batch. The training loop only calls ``forward``,
``start_epoch`` and ``after_step`` (and, around checkpoints, ``rank_state`` and
``load_rank_states`` for state too large to gather), and wraps the whole method for DDP (a frozen
teacher has no trainable parameters, so DDP reduces no gradients for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from skd.batch import Batch


@dataclass
class MethodConfig:
    """Base of every method's config; each method subclasses it with its own fields."""

    name: str = "ce"
    """Method name: one of ``skd.methods.list_methods()``."""


@dataclass(frozen=True)
class DataSpec:
    """What a method may need to know about the training data."""

    num_classes: int
    num_samples: int
    batch_size: int
    """Per-process training batch size."""


class Method(nn.Module):
    """Base class. Subclasses define ``Config`` and ``forward``; the rest is optional."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    image_keys: tuple[str, ...] = ("image",)
    """Batch entries that are image tensors ``[B, 3, H, W]`` (put in the model's memory format); a
    method whose config decides what the loader delivers sets its own in ``__init__`` (BAKE)."""
    supports_mixup: ClassVar[bool] = False
    """Whether the method trains on Mixup/CutMix batches (``skd.mixup``: mixed images, plus
    ``target``, ``mix_lam``, ``mix_partner`` and ``mix_smoothing`` describing their soft targets).
    With ``mixup`` on, a method without it is refused before any work starts."""

    def __init__(self, model: nn.Module, cfg: MethodConfig, data: DataSpec) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.data = data

    @classmethod
    def train_loader_options(cls, cfg: MethodConfig) -> dict[str, Any]:
        """Extra ``skd.data.create_loader`` arguments for the training loader, e.g.
        ``with_partner`` (CS-KD: a same-class partner image per anchor in ``batch["partner"]``)."""
        return {}

    @classmethod
    def mixup_refusal(cls, cfg: MethodConfig) -> str | None:
        """Why this method and config cannot train on mixed batches, or None if they can."""
        return None if cls.supports_mixup else "its official code trains without Mixup/CutMix"

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar, "logits": [B, C]}``, optionally ``"parts"``: a dict of
        scalar loss terms to log, and any private tensors ``after_step`` needs.
        """
        raise NotImplementedError

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called before the first step of every epoch (0-indexed), also on resume."""

    @torch.no_grad()
    def after_step(self, batch: Batch, out: dict[str, torch.Tensor]) -> None:
        """Called after every batch (each micro-batch under accumulation) with its forward output."""

    def epoch_stats(self) -> dict[str, float]:
        """Per-epoch values worth logging (e.g. PS-KD's α_t)."""
        return {}

    def rank_state(self) -> dict[str, torch.Tensor]:
        """This process's part of a state too large to gather (PS-KD's sharded memory), for every
        rank to save beside the checkpoint; empty for methods without one (the usual case)."""
        return {}

    def load_rank_states(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """Restore this process's part from ``parts``: the ``rank_state()`` of every rank of the
        saved run, in rank order, for any number of ranks then and now. Tensors may be
        memory-mapped (``torch.load(mmap=True)``); implementations read only what they need."""
        if any(parts):
            raise ValueError(f"method '{self.cfg.name}' keeps no per-rank state, but the checkpoint "
                             f"holds per-rank parts {sorted(next(p for p in parts if p))[:5]}")

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that stay in eval mode and out of checkpoints (a teacher)."""
        return []

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict`` without frozen modules: what a checkpoint must hold."""
        frozen = [name for name, m in self.named_children() if m in self.frozen_modules()]
        return {k: v for k, v in self.state_dict().items()
                if not any(k.startswith(f + ".") for f in frozen)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        frozen = [name for name, m in self.named_children() if m in self.frozen_modules()]
        missing = [k for k in missing if not any(k.startswith(f + ".") for f in frozen)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match method '{self.cfg.name}': "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
