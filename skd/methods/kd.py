"""Hinton KD with RepDistiller's weights (METHODS §1.2).

``loss = γ·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`` (batchmean). RepDistiller's KD
recipe is ``-r 0.1 -a 0.9 --kd_T 4``, the defaults here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skd import losses
from skd.methods.registry import register_method
from skd.methods.teacher import TeacherConfig, TeacherMethod


@register_method("kd")
class KD(TeacherMethod):
    @dataclass
    class Config(TeacherConfig):
        name: str = "kd"
        temperature: float = 4.0
        """T of the softened softmaxes (RepDistiller ``--kd_T``)."""
        ce_weight: float = 0.1
        """γ, weight of the hard-label cross-entropy (RepDistiller ``-r``)."""
        kd_weight: float = 0.9
        """α, weight of the T²-scaled KL term (RepDistiller ``-a``)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        logits = self.model(images)
        teacher = self.teacher_logits(images)
        ce = self.cfg.ce_weight * losses.cross_entropy(logits, labels)
        kl = self.cfg.kd_weight * losses.kd_loss(logits, teacher, self.cfg.temperature)
        return {"loss": ce + kl, "logits": logits, "parts": {"ce": ce, "kl": kl}}
