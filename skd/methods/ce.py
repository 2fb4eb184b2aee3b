"""Plain cross-entropy (``ce``) and label smoothing (``ls``): the seeds' baselines.

Under Mixup/CutMix, ``ce`` is the DeiT/Swin head loss: cross-entropy against the batch's mixed
soft target, label smoothing (``mixup.label_smoothing``) inside it. ``ls`` refuses mixed batches:
that combination is ``ce`` with ``mixup.label_smoothing``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded, one_of
from skd.methods.base import Method, MethodConfig
from skd.methods.registry import register_method
from skd.mixup import batch_cross_entropy


@register_method("ce")
class CrossEntropy(Method):
    """Cross-entropy against the label, or against the mixed soft target of a Mixup/CutMix batch."""

    supports_mixup = True

    @dataclass
    class Config(MethodConfig):
        name: str = "ce"

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        return {"loss": batch_cross_entropy(logits, batch), "logits": logits}


@register_method("ls")
class LabelSmoothing(Method):
    """``uniform``: (1−ε)·onehot + ε/C (PS-KD's baseline); ``others``: ε/(C−1) off-label (TF-KD)."""

    @dataclass
    class Config(MethodConfig):
        name: str = "ls"
        smoothing: float = bounded(0.1, ge=0, le=1)
        """ε, the probability mass moved off the label."""
        mode: str = one_of("uniform", ("uniform", "others"))
        """``uniform`` (PS-KD) or ``others`` (TF-KD)."""

    @classmethod
    def mixup_refusal(cls, cfg: MethodConfig) -> str | None:
        return "label smoothing of mixed targets is mixup.label_smoothing with method.name=ce"

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        loss = losses.cross_entropy(logits, batch["label"], smoothing=self.cfg.smoothing,
                                    smoothing_mode=self.cfg.mode)
        return {"loss": loss, "logits": logits}
