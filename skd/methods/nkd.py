"""NKD, Normalized KD (Yang et al., ICCV 2023), ``yzd-v/cls_KD`` with the fixed mask (docs/methods.md §5).

``loss = CE(s, y) + L_target + L_non``: the head cross-entropy (weight 1, as mmcls adds it) plus
``skd.losses.nkd_loss``. The teacher runs in eval mode under no_grad.

Mixup/CutMix (the official DeiT recipes): the teacher sees the mixed images, the head CE is
against the batch's mixed, label-smoothed soft target, and the target class of ``nkd_loss`` is
the argmax of that target, as the official code takes it from the mixed labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.methods.registry import register_method
from skd.methods.teacher import TeacherConfig, TeacherMethod
from skd.mixup import batch_cross_entropy


@register_method("nkd")
class NKD(TeacherMethod):
    supports_mixup = True

    @dataclass
    class Config(TeacherConfig):
        name: str = "nkd"
        temperature: float = bounded(1.0, gt=0)
        """λ, the temperature of the normalized non-target part (1 on ImageNet, 3 on CIFAR-100)."""
        gamma: float = bounded(1.5, ge=0)
        """γ, weight of the non-target part (1.5 on ImageNet CNNs, 3.5 on CIFAR-100)."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        logits = self.model(images)
        teacher = self.teacher_logits(images)
        ce = batch_cross_entropy(logits, batch)
        nkd = losses.nkd_loss(logits, teacher, batch.get("target", labels), self.cfg.temperature,
                              self.cfg.gamma)
        return {"loss": ce + nkd, "logits": logits, "parts": {"ce": ce, "nkd": nkd}}
