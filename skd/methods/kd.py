"""Hinton KD with RepDistiller's weights (docs/methods.md §1.2).

``loss = γ·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`` (batchmean). RepDistiller's KD
recipe is ``-r 0.1 -a 0.9 --kd_T 4``, the defaults here.

Mixup/CutMix (as timm's ``train.py`` distils): the teacher sees the mixed images and the CE is
against the batch's mixed, label-smoothed soft target.
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


@register_method("kd")
class KD(TeacherMethod):
    supports_mixup = True

    @dataclass
    class Config(TeacherConfig):
        name: str = "kd"
        temperature: float = bounded(4.0, gt=0)
        """T of the softened softmaxes (RepDistiller ``--kd_T``)."""
        ce_weight: float = bounded(0.1, ge=0)
        """γ, weight of the hard-label cross-entropy (RepDistiller ``-r``)."""
        kd_weight: float = bounded(0.9, ge=0)
        """α, weight of the T²-scaled KL term (RepDistiller ``-a``)."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch["image"]
        logits = self.model(images)
        teacher = self.teacher_logits(images)
        ce = self.cfg.ce_weight * batch_cross_entropy(logits, batch)
        kl = self.cfg.kd_weight * losses.kd_loss(logits, teacher, self.cfg.temperature)
        return {"loss": ce + kl, "logits": logits, "parts": {"ce": ce, "kl": kl}}
