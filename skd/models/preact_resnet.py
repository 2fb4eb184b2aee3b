"""The PreAct ResNet-18 of CS-KD and PS-KD, for 32-px inputs (docs/methods.md §2.4).

``alinlab/cs-kd`` ``models/resnet.py::CIFAR_ResNet18`` = ``CIFAR_ResNet(PreActBlock, [2,2,2,2])``,
the same net as ``lgcnsai/PS-KD-Pytorch`` ``models/preact_resnet.py::CIFAR_ResNet18_preActBasic``:

- stem conv3x3(3→64) + BN + ReLU; four stages of two pre-activation blocks (64, 128, 256, 512);
- the quirk: a block computes ``out = relu(bn1(x))`` and applies its shortcut (identity, or a
  bias-free strided conv1x1 without BN) to ``out``, not to ``x`` as kuangliu's PreActResNet does;
- no final BN-ReLU after layer4; global average pool (``avg_pool2d(·, 4)`` at 32 px) then
  ``Linear(512, C)`` with bias; PyTorch default initialisation.

Parameter names match the official ones, so official checkpoints load.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CIFAR10_MEAN, CIFAR10_STD, CifarNet, build_cifar_model, cifar_cfg

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU, conv3x3, BN-ReLU, conv3x3, plus a shortcut taken from the pre-activated input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)  # the official quirk: shortcut of relu(bn1(x)), not of x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(CifarNet):
    """CS-KD / PS-KD ``CIFAR_ResNet`` with ``PreActBlock`` (or another ``block`` class taking
    ``(in_planes, planes, stride)`` with an ``expansion``). Feature indices: 0 stem (post-ReLU,
    64 ch, ×1), 1..4 layer1..layer4 outputs (the blocks' outputs: raw residual sums for
    ``PreActBlock``; 64/128/256/512 × expansion ch, ×1/1/2/4/8)."""

    head_name = "linear"

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 100,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 block: type[nn.Module] = PreActBlock) -> None:
        super().__init__()
        widths = (64, 128, 256, 512)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.feature_info = [dict(num_chs=64, reduction=1, module="bn1")]
        in_planes, reduction = 64, 1
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_planes, reduction=reduction,
                                          module=f"layer{i + 1}"))
        self._init_head(in_planes, num_classes, global_pool, drop_rate)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]


default_cfgs = generate_default_cfgs({
    "preact_resnet18_cifar": cifar_cfg(classifier="linear", mean=CIFAR10_MEAN, std=CIFAR10_STD),
})


@register_model
def preact_resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PreAct ResNet-18 of CS-KD / PS-KD (32 px, shortcut-after-preactivation quirk), 11.22M
    parameters at 100 classes."""
    return build_cifar_model(PreActResNet, "preact_resnet18_cifar", pretrained, num_stages=5,
                             num_blocks=(2, 2, 2, 2), **kwargs)
