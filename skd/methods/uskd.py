"""USKD, Universal Self-KD (Yang et al., ICCV 2023), ``yzd-v/cls_KD`` (METHODS §6).

``loss = CE(z, y) + α·L_t + β·L_nt + L_weak`` (``skd.losses.uskd_loss`` plus the head CE).
``L_weak`` trains a weak head, ``nn.Linear(channels, C)``, on an intermediate feature: the global
average pool of the second-to-last stage of a CNN (ResNet layer3), or the CLS token after block
``int(0.5·L) − 1`` of a ViT. The feature is not detached, so the weak-head loss reaches the
backbone. The weak head belongs to the method: it is trained (and checkpointed) with the model,
and dropped at export (the trainer exports ``method.model`` only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.features import forward_with_pooled_feature, mid_feature_index, pooled_feature_channels
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method


@register_method("uskd")
class USKD(Method):
    @dataclass
    class Config(MethodConfig):
        name: str = "uskd"
        alpha: float = 1.0
        """α, weight of the target part L_t (1 on ImageNet, 0.1 on CIFAR-100)."""
        beta: float = 0.1
        """β, weight of the Zipf non-target part L_nt (0.1 on ImageNet and CIFAR-100)."""
        mu: float = 0.005
        """μ, weight inside the weak-head loss L_weak (0.005 on ImageNet, 0.1 on CIFAR-100)."""
        rank: str = "prob"
        """Rank score of the Zipf labels: ``prob`` (paper-era code, default) or ``logprob``
        (current official HEAD, METHODS §6.2)."""
        feature_index: int | None = None
        """``forward_intermediates`` index of the weak head's feature; empty: −2 for CNNs
        (second-to-last stage), ``int(0.5·L) − 1`` for ViTs."""

        def __post_init__(self) -> None:
            if self.rank not in ("prob", "logprob"):
                raise ValueError(f"method.rank must be 'prob' or 'logprob', got {self.rank!r}")

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.feature_index = mid_feature_index(model) if cfg.feature_index is None else cfg.feature_index
        channels = pooled_feature_channels(model, self.feature_index)
        self.weak_head = nn.Linear(channels, data.num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        labels = batch["label"]
        logits, feature = forward_with_pooled_feature(self.model, batch["image"], self.feature_index)
        weak_logits = self.weak_head(feature)
        ce = losses.cross_entropy(logits, labels)
        uskd = losses.uskd_loss(logits, weak_logits, labels, cfg.alpha, cfg.beta, cfg.mu, cfg.rank)
        return {"loss": ce + uskd, "logits": logits, "parts": {"ce": ce, "uskd": uskd}}
