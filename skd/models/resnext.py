"""The CIFAR ResNeXt-29 (8×64d) of PS-KD, for 32-px inputs.

``lgcnsai/PS-KD-Pytorch`` ``models/resnext.py::CifarResNeXt(cardinality=8, depth=29,
base_width=64, widen_factor=4)`` (Pau Rodríguez's CIFAR ResNeXt, the network of the ResNeXt
paper's CIFAR experiments):

- stem conv3x3(3→64) + BN + ReLU (``conv_1_3x3``, ``bn_1``); three stages (``stage_1..3``) of
  (depth − 2) / 9 = 3 bottlenecks with 256, 512, 1024 output channels, the first of stages 2 and
  3 with stride 2;
- a bottleneck (type C) is conv1x1(→D)-BN-ReLU, grouped conv3x3(D, groups = cardinality)-BN-ReLU,
  conv1x1(→out)-BN, plus the shortcut (identity, or conv1x1(stride)-BN when the channels change),
  then ReLU, with D = cardinality · int(base_width · out / (64 · widen_factor)) = 512/1024/2048;
- global average pool (``avg_pool2d(·, 8)`` at 32 px), ``Linear(1024, C)`` named ``classifier``;
- initialisation as official: convolutions Kaiming-normal (fan-out), the classifier weight
  Kaiming-normal (fan-in), BN weights 1, every bias 0.

Parameter names (``stage_1.stage_1_bottleneck_0.conv_reduce.weight``, ...) match the official
ones, so PS-KD checkpoints load.

Feature indices: 0 stem (64 ch, ×1), 1..3 ``stage_1..3`` outputs (256/512/1024 ch, ×1/2/4).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CIFAR10_MEAN, CIFAR10_STD, CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarResNeXt"]


class ResNeXtBottleneck(nn.Module):
    """Type-C ResNeXt bottleneck with the official attribute names."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, cardinality: int,
                 base_width: int, widen_factor: int) -> None:
        super().__init__()
        width = cardinality * int(base_width * (out_channels / (widen_factor * 64.0)))
        self.conv_reduce = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality,
                                   bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut.add_module(
                "shortcut_conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        return F.relu(self.shortcut(x) + out)


class CifarResNeXt(CifarNet):
    """PS-KD ``CifarResNeXt``: depth = 9n + 2, three stages of n bottlenecks."""

    head_name = "classifier"

    def __init__(self, depth: int = 29, cardinality: int = 8, base_width: int = 64,
                 widen_factor: int = 4, num_classes: int = 100, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        stages = [64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor]
        self.conv_1_3x3 = nn.Conv2d(in_chans, stages[0], 3, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(stages[0])
        self.feature_info = [dict(num_chs=stages[0], reduction=1, module="bn_1")]
        for i in range(3):
            name, stride = f"stage_{i + 1}", 1 if i == 0 else 2
            stage = nn.Sequential()
            for j in range(n):
                stage.add_module(f"{name}_bottleneck_{j}", ResNeXtBottleneck(
                    stages[i] if j == 0 else stages[i + 1], stages[i + 1], stride if j == 0 else 1,
                    cardinality, base_width, widen_factor))
            self.add_module(name, stage)
            self.feature_info.append(dict(num_chs=stages[i + 1], reduction=2 ** i, module=name))
        self._init_head(stages[3], num_classes, global_pool, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_1(self.conv_1_3x3(x)))

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.stage_1, self.stage_2, self.stage_3]


default_cfgs = generate_default_cfgs({
    "resnext29_8x64d_cifar": cifar_cfg(first_conv="conv_1_3x3", classifier="classifier",
                                       mean=CIFAR10_MEAN, std=CIFAR10_STD),
})


@register_model
def resnext29_8x64d_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNeXt:
    """PS-KD's CIFAR ResNeXt-29 (8×64d, widen factor 4), 34.52M parameters at 100 classes."""
    return build_cifar_model(CifarResNeXt, "resnext29_8x64d_cifar", pretrained, num_stages=4,
                             depth=29, cardinality=8, base_width=64, widen_factor=4, **kwargs)
