"""The method protocol: everything method-specific about a training step lives behind it.

A method is an ``nn.Module`` (timm ``task`` style) that owns the student model and any extra
trainable modules (USKD's weak head, ICKD's embed), holds its state (PS-KD's memory) in its
``state_dict``, and computes the loss from a batch. The training loop calls ``forward``,
``start_epoch`` and ``after_step`` in the step, ``epoch_stats`` and ``notes`` to report, and,
around checkpoints, ``rank_state`` and ``load_rank_states`` for state too large to gather; the
loaders read ``train_loader_options`` and ``image_keys``, the config check ``mixup_refusal``.
The method is what DDP wraps. Frozen modules
(a teacher) are held outside the method's module tree (``add_frozen``), as timm keeps its
distillation teacher outside DDP: they are in no optimizer, checkpoint or DDP synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from skd.batch import Batch
from skd.errors import CheckpointError


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
    mean: tuple[float, ...] | None = None
    """Per-channel mean the images were normalised with (``data.mean``); None: unknown (a
    teacher then gets the images as they are)."""
    std: tuple[float, ...] | None = None
    """Per-channel standard deviation the images were normalised with (``data.std``)."""
    img_size: int | None = None
    """Training image resolution (``data.img_size``); None: unknown (never resized)."""


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
        self._frozen: dict[str, nn.Module] = {}  # a plain dict: not submodules

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

    def notes(self) -> list[str]:
        """Lines worth showing when training starts (e.g. how a teacher's inputs are prepared)."""
        return []

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
            raise CheckpointError(f"method '{self.cfg.name}' keeps no per-rank state, but the checkpoint "
                                  f"holds per-rank parts {sorted(next(p for p in parts if p))[:5]}")

    def add_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Hold ``module`` frozen (eval mode, no gradients) outside the module tree: it is not in
        ``parameters()``, ``state_dict()`` or the DDP wrapper (whose buffer broadcast and gradient
        reduction would be wasted on it), yet ``to()`` and ``cuda()`` move it with the method."""
        module.eval()
        module.requires_grad_(False)
        self._frozen[name] = module
        return module

    def frozen_modules(self) -> list[nn.Module]:
        """The modules held by ``add_frozen`` (a teacher and what feeds it)."""
        return list(self._frozen.values())

    def _apply(self, fn: Any, recurse: bool = True) -> Method:
        super()._apply(fn, recurse)
        for module in self._frozen.values():
            module._apply(fn, recurse)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: the whole ``state_dict`` (frozen modules are not in it)."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # torch's "size mismatch for ...": tensors of another shape
            raise CheckpointError(f"checkpoint does not match method '{self.cfg.name}': "
                                  f"{str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise CheckpointError(f"checkpoint does not match method '{self.cfg.name}': "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
