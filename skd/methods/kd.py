"""Hinton KD with RepDistiller's weights (METHODS §1.2), and the base of every teacher method.

``loss = γ·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`` (batchmean). RepDistiller's KD
recipe is ``-r 0.1 -a 0.9 --kd_T 4``, the defaults here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.methods.base import DataSpec, Method
from skd.methods.registry import register_method
from skd.teacher import TeacherConfig, create_teacher


class TeacherMethod(Method):
    """A method with a frozen teacher (``self.teacher``): eval mode, no gradients, outside the
    optimizer and checkpoints. Its forward runs inside the method's, so under the same autocast."""

    def __init__(self, model: nn.Module, cfg: TeacherConfig, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.teacher = create_teacher(cfg, model, data.num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(images)


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
