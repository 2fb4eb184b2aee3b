"""BYOT, Be Your Own Teacher (Zhang et al., ICCV 2019), as its first author's code trains it
(docs/methods.md §12).

The network is cut into sections; after each section but the last, an auxiliary classifier (a
bottleneck of convolutions, a global average pool and a linear layer) predicts the class. The
model's own classifier, the deepest, is the teacher of the shallower ones::

    loss = CE(z, y) + Σ_i [(1 − α)·CE(z_i, y) + α·T²·KL(softmax(z/T) ‖ softmax(z_i/T))]
                    + λ·Σ_i mean_rows ‖f_i − F‖²

z and F are the model's logits and the pooled vector its classifier reads, f_i and z_i each
head's pooled vector and logits (``skd.losses.byot_loss``). The heads read the maps of
``skd.features.forward_with_maps`` (any timm model: stage outputs of a CNN, block outputs of a
ViT), in the same forward pass as the logits. They belong to the method: trained and
checkpointed with the model, dropped at export (``model.safetensors`` is the bare timm model,
evaluated through its own, deepest, classifier).

Mixup/CutMix: refused (the official code has none).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.errors import ConfigError
from skd.features import (FeatureTap, forward_with_maps, is_token_model,
                          num_feature_maps, probe_features)
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method
from skd.models._cifar import kaiming_conv_bn_init

__all__ = ["BYOT", "BottleneckHead", "section_taps"]


class BottleneckHead(nn.Module):
    """An auxiliary classifier: the official ``ScalaNet`` bottleneck (conv 1×1 to ``width``,
    conv k×k with stride k, conv 1×1 to ``out_channels``, each followed by BatchNorm and ReLU),
    a global average pool and ``Linear(out_channels, num_classes)``.

    k is the ratio of the section's resolution to the last section's, so the map reaches the
    last section's size; at 32 px the official ``AvgPool2d(4, 4)`` of its 4×4 map is this global
    average pool. A map whose side is not a multiple of k (inputs far smaller than the model was
    built for) is zero-padded at the bottom and right to the next multiple.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, num_classes: int) -> None:
        super().__init__()

        def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=k), nn.BatchNorm2d(cout), nn.ReLU()]

        self.stride = stride
        self.reduce = nn.Sequential(*conv_bn_relu(in_channels, width, 1))
        self.downsample = nn.Sequential(*conv_bn_relu(width, width, stride))
        self.expand = nn.Sequential(*conv_bn_relu(width, out_channels, 1))
        self.fc = nn.Linear(out_channels, num_classes)
        kaiming_conv_bn_init(self)  # the official initialisation of every convolution and BatchNorm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled feature [B, out_channels], logits [B, num_classes])`` of a map ``[B, C, H, W]``."""
        x = self.reduce(x)
        k = self.stride
        if x.shape[2] % k or x.shape[3] % k:  # shapes only: no host synchronisation
            x = F.pad(x, (0, -x.shape[3] % k, 0, -x.shape[2] % k))
        feature = self.expand(self.downsample(x)).mean(dim=(2, 3))
        return feature, self.fc(feature)


def section_taps(model: nn.Module) -> list[int]:
    """The maps the heads read by default: the three stage outputs before the last of a CNN (a
    ResNet's layer1-3, the official sections), or the blocks ending the first three quarters of a
    ViT (``L/4 − 1``, ``L/2 − 1``, ``3L/4 − 1``)."""
    n = num_feature_maps(model)
    if is_token_model(model):
        return sorted({max(n * q // 4 - 1, 0) for q in (1, 2, 3)})
    return list(range(max(n - 4, 0), n - 1))


@register_method("byot")
class BYOT(Method):
    @dataclass
    class Config(MethodConfig):
        name: str = "byot"
        temperature: float = bounded(3.0, gt=0)
        """T of the KL of each head against the deepest classifier (the official code's 3)."""
        alpha: float = bounded(0.5, ge=0, le=1)
        """α: each head's loss is (1 − α)·CE + α·T²·KL (the official ``--lambda_KD``, 0.5)."""
        feature_weight: float = bounded(6.4e-5, ge=0)
        """λ, weight of the hints, per row: the official 5e-7 on a sum over its batch of 128."""
        head_width: int = bounded(128, ge=1)
        """Channels inside each head's bottleneck (the official 128)."""
        taps: list[int | str] = field(default_factory=list)
        """Maps the heads read (feature indices or submodule names), shallowest first; empty:
        ``section_taps`` (a ResNet's layer1-3, a ViT's quarter blocks)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.taps: list[FeatureTap] = list(cfg.taps) or section_taps(model)
        # One dry run sizes the heads: each tap's channels and resolution against the last map's,
        # and the width of the pooled vector the classifier reads (the hints' target).
        probe = probe_features(model, [*self.taps, -1], with_embedding=True)
        *maps, last = probe.maps
        if not maps:
            raise ConfigError(f"config key 'method.taps': {type(model).__name__} has a single feature map, so "
                              f"no section for an auxiliary classifier; name the maps in method.taps")
        for tap, m in zip(self.taps, maps):
            if m.dim() != 4:
                raise ConfigError(f"config key 'method.taps': map {tap!r} of {type(model).__name__} has "
                                  f"shape {tuple(m.shape)}, not [B, C, H, W]")
        width = probe.embedding.shape[1]
        self.heads = nn.ModuleList(
            BottleneckHead(m.shape[1], cfg.head_width, width, max(1, round(m.shape[2] / last.shape[2])),
                           data.num_classes)
            for m in maps)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        features = forward_with_maps(self.model, batch["image"], self.taps, with_embedding=True)
        head_features, head_logits = zip(*(head(m) for head, m in zip(self.heads, features.maps)))
        parts = losses.byot_loss(features.logits, batch["label"], list(head_logits), list(head_features),
                                 features.embedding, cfg.temperature, cfg.alpha, cfg.feature_weight)
        return {"loss": sum(parts.values()), "logits": features.logits, "parts": parts}
