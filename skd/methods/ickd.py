"""ICKD, Inter-Channel Correlation KD (Liu et al., ICCV 2021), ``ADLab-AutoDrive/ICKD`` (docs/methods.md §7).

``loss = γ·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·L_ICKD(embed(F_s), F_t)``,
where F are the last-stage feature maps (the input of the head's pooling), the teacher's used
raw, and ``embed`` maps the student's channels to the teacher's: Conv1x1 + BN (the CIFAR-100
code) or Conv3x3 + BN (the ImageNet code). The embed is trained with the student and dropped at export.

Defaults are the README's main variant, "ICKD-C": ``-r 1 -a 1 -b 2.5`` with KD at T = 4.
``kd_weight: 0`` is "ICKD-C (w/o KL)". Mixup/CutMix: refused (the official code has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded, one_of
from skd.features import forward_with_last_map, last_map_channels
from skd.methods.base import DataSpec
from skd.methods.registry import register_method
from skd.methods.teacher import TeacherConfig, TeacherMethod, hard_and_kd_parts


def make_embed(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv(k×k, no bias, same padding) + BatchNorm2d: ICKD's ``Embed`` (CIFAR, k = 1; its
    BatchNorm is the attribute named ``l2norm``) or ``ChannelSimilarityEmbed`` (ImageNet, k = 3)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


@register_method("ickd")
class ICKD(TeacherMethod):
    @dataclass
    class Config(TeacherConfig):
        name: str = "ickd"
        ce_weight: float = bounded(1.0, ge=0)
        """γ, weight of the hard-label cross-entropy (RepDistiller ``-r``)."""
        kd_weight: float = bounded(1.0, ge=0)
        """α, weight of the KD term (``-a``): 1 is "ICKD-C", 0 is "ICKD-C (w/o KL)"."""
        ickd_weight: float = bounded(2.5, ge=0)
        """β, weight of the inter-channel correlation loss (``-b``; README 2.5)."""
        temperature: float = bounded(4.0, gt=0)
        """T of the KD term (RepDistiller ``--kd_T``)."""
        embed_kernel: int = one_of(1, (1, 3))
        """Student embed kernel: 1 (Conv1x1+BN, CIFAR-100 code) or 3 (Conv3x3+BN, ImageNet code)."""
        norm: str = one_of("cifar", ("cifar", "imagenet"))
        """ICKD loss normaliser: ``cifar`` (÷C·B) or ``imagenet`` (÷C·B², torchdistill's
        ChSimLoss)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.embed = make_embed(last_map_channels(model), last_map_channels(self.teacher),
                                cfg.embed_kernel)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images, labels = batch["image"], batch["label"]
        logits, feature = forward_with_last_map(self.model, images)
        with torch.no_grad():
            teacher_logits, teacher_feature = forward_with_last_map(self.teacher, self.teacher_images(images))
        parts = hard_and_kd_parts(logits, labels, teacher_logits, cfg.ce_weight, cfg.kd_weight, cfg.temperature)
        parts["ickd"] = cfg.ickd_weight * losses.ickd_loss(self.embed(feature), teacher_feature, cfg.norm)
        return {"loss": sum(parts.values()), "logits": logits, "parts": parts}
