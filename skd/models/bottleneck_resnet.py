"""The CIFAR ResNet-101 of PS-KD, for 32-px inputs.

``lgcnsai/PS-KD-Pytorch`` ``models/preact_resnet.py::CIFAR_ResNet101_Bottle`` =
``CIFAR_ResNet(Bottleneck_CIFAR, [3, 4, 23, 3])``: the container of the PreAct ResNet-18
(``skd.models.preact_resnet.PreActResNet``: conv3x3(3→64) + BN + ReLU stem, stages of 64, 128,
256, 512 planes, global average pool, ``Linear(2048, C)`` named ``linear``) with bottleneck
blocks.

PS-KD's README calls this net "PreAct ResNet-101", but its blocks are post-activation
(kuangliu's ``Bottleneck``): conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(×4)-BN, plus the
shortcut (identity, or conv1x1(stride)-BN), then ReLU. PyTorch default initialisation.
Parameter names match the official ones, so PS-KD checkpoints load.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CIFAR10_MEAN, CIFAR10_STD, build_cifar_model, cifar_cfg
from skd.models.preact_resnet import PreActResNet

__all__ = ["Bottleneck"]


class Bottleneck(nn.Module):
    """PS-KD ``Bottleneck_CIFAR``: a post-activation bottleneck with 4× expansion."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


default_cfgs = generate_default_cfgs({
    "resnet101_cifar": cifar_cfg(classifier="linear", mean=CIFAR10_MEAN, std=CIFAR10_STD),
})


@register_model
def resnet101_cifar(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PS-KD's CIFAR ResNet-101 (its "PreAct ResNet-101"; post-activation bottlenecks), 42.70M
    parameters at 100 classes."""
    return build_cifar_model(PreActResNet, "resnet101_cifar", pretrained, num_stages=5,
                             num_blocks=(3, 4, 23, 3), block=Bottleneck, **kwargs)
