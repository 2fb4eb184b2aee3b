"""USKD, Universal Self-KD (Yang et al., ICCV 2023), ``yzd-v/cls_KD`` (docs/methods.md §6).

``loss = CE(z, y) + α·L_t + β·L_nt + L_weak`` (``skd.losses.uskd_loss`` plus the head CE).
``L_weak`` trains a weak head, ``nn.Linear(channels, C)``, on an intermediate feature: the global
average pool of the second-to-last stage of a CNN (ResNet layer3), or the CLS token after block
``int(0.5·L) − 1`` of a ViT. The feature is not detached, so the weak-head loss reaches the
backbone. The weak head belongs to the method: it is trained (and checkpointed) with the model,
and dropped at export (the trainer exports ``method.model`` only).

Mixup/CutMix (the official DeiT and Swin recipes): the head CE is against the batch's mixed,
label-smoothed soft target, and ``uskd_loss`` gets the mixed labels without smoothing, as
mmcls's batch augments hand them to it (it uses their top-2 classes and values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded, one_of
from skd.features import forward_with_pooled_feature, mid_feature_index, pooled_feature_channels
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method
from skd.mixup import batch_cross_entropy, mixed_onehot


@register_method("uskd")
class USKD(Method):
    supports_mixup = True

    @dataclass
    class Config(MethodConfig):
        name: str = "uskd"
        alpha: float = bounded(1.0, ge=0)
        """α, weight of the target part L_t (1 on ImageNet, 0.1 on CIFAR-100)."""
        beta: float = bounded(0.1, ge=0)
        """β, weight of the Zipf non-target part L_nt (0.1 on ImageNet and CIFAR-100)."""
        mu: float = bounded(0.005, ge=0)
        """μ, weight inside the weak-head loss L_weak (0.005 on ImageNet, 0.1 on CIFAR-100)."""
        rank: str = one_of("prob", ("prob", "logprob"))
        """Rank score of the Zipf labels: ``prob`` (paper-era code, default) or ``logprob``
        (current official HEAD, docs/methods.md §6.2)."""
        feature_index: int | None = None
        """``forward_intermediates`` index of the weak head's feature; empty: −2 for CNNs
        (second-to-last stage), ``int(0.5·L) − 1`` for ViTs."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.feature_index = mid_feature_index(model) if cfg.feature_index is None else cfg.feature_index
        channels = pooled_feature_channels(model, self.feature_index)
        self.weak_head = nn.Linear(channels, data.num_classes)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        labels = mixed_onehot(batch, self.data.num_classes) if "mix_lam" in batch else batch["label"]
        logits, feature = forward_with_pooled_feature(self.model, batch["image"], self.feature_index)
        weak_logits = self.weak_head(feature)
        ce = batch_cross_entropy(logits, batch)
        uskd = losses.uskd_loss(logits, weak_logits, labels, cfg.alpha, cfg.beta, cfg.mu, cfg.rank)
        return {"loss": ce + uskd, "logits": logits, "parts": {"ce": ce, "uskd": uskd}}
