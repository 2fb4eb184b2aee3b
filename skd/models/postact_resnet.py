"""The CIFAR ResNet-18 and ResNet-50 of BYOT's first author, for 32-px inputs (docs/methods.md §12).

``ArchipLab-LinfengZhang/pytorch-scalable-neural-networks`` ``sresnet.py::resnet18/resnet50``
(and ``pytorch-self-distillation-final`` ``resnet.py``) without their auxiliary modules:
torchvision's post-activation ``BasicBlock`` / ``Bottleneck`` (stride on the 3×3 conv, shortcut
conv1x1(stride) + BN) in four stages of 64, 128, 256, 512 planes, after a conv3x3(3→64, stride
1) + BN + ReLU stem with no max-pool; the classifier reads the global average pool of layer4
(``AvgPool2d(4, 4)`` at 32 px). The official code initialises every convolution Kaiming-normal
(fan-out, ReLU) and every BatchNorm to 1/0, as here.

The container is the CS-KD / PS-KD ``CIFAR_ResNet`` (``skd.models.preact_resnet.PreActResNet``);
with PS-KD's post-activation bottleneck it is the same ResNet-50.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CIFAR10_MEAN, CIFAR10_STD, build_cifar_model, cifar_cfg, kaiming_conv_bn_init
from skd.models.bottleneck_resnet import Bottleneck
from skd.models.preact_resnet import PreActResNet

__all__ = ["BasicBlock"]


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3(stride)-BN-ReLU, conv3x3-BN, plus the shortcut
    (identity, or conv1x1(stride)-BN), then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _official_init(model: PreActResNet, pretrained: bool) -> PreActResNet:
    """Kaiming-normal convolutions and unit BatchNorms, unless weights were loaded."""
    if not pretrained:
        kaiming_conv_bn_init(model)
    return model


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(classifier="linear", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    for name in ("resnet18_cifar", "resnet50_cifar")
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """BYOT's CIFAR ResNet-18 (post-activation basic blocks, 3×3 stem, no max-pool), 11.22M
    parameters at 100 classes."""
    return _official_init(build_cifar_model(PreActResNet, "resnet18_cifar", pretrained, num_stages=5,
                                            num_blocks=(2, 2, 2, 2), block=BasicBlock, **kwargs), pretrained)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """BYOT's CIFAR ResNet-50 (post-activation bottlenecks, 3×3 stem, no max-pool), 23.71M
    parameters at 100 classes."""
    return _official_init(build_cifar_model(PreActResNet, "resnet50_cifar", pretrained, num_stages=5,
                                            num_blocks=(3, 4, 6, 3), block=Bottleneck, **kwargs), pretrained)
