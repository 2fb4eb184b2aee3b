"""The CIFAR DenseNet-121 of PS-KD, for 32-px inputs.

``lgcnsai/PS-KD-Pytorch`` ``models/densenet_cifar.py::CIFAR_DenseNet121(bias=True)``
(kuangliu's CIFAR DenseNet): growth rate 32, dense blocks of 6, 12, 24, 16 layers, compression
0.5; stem conv3x3(3→64) without BN; each layer is BN-ReLU-conv1x1(→128)-BN-ReLU-conv3x3(→32)
and concatenates ``[new, input]`` (new features first); transitions are BN-ReLU-conv1x1 then
2×2 average pooling; the head is BN-ReLU, global average pool (``avg_pool2d(·, 4)`` at 32 px)
and ``Linear(1024, C)`` with bias, named ``linear``. PyTorch default initialisation. Parameter
names match the official ones, so PS-KD checkpoints load.

Feature indices (as timm's DenseNet: the dense-block outputs, before the transitions): 0 stem
conv (64 ch, ×1), 1..3 ``dense1..dense3`` (256/512/1024 ch, ×1/2/4), 4 = relu(bn(``dense4``))
(1024 ch, ×8), the map the head pools.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CIFAR10_MEAN, CIFAR10_STD, CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarDenseNet"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4g)-BN-ReLU-conv3x3(g); output ``cat([new, x])`` (official order)."""

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1, then 2×2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(CifarNet):
    """kuangliu / PS-KD ``CIFAR_DenseNet``: four dense blocks (``dense1..4``) joined by
    transitions (``trans1..3``), a final ``bn`` and the ``linear`` head."""

    head_name = "linear"

    def __init__(self, num_layers: tuple[int, int, int, int] = (6, 12, 24, 16),
                 growth_rate: int = 32, reduction: float = 0.5, num_classes: int = 100,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_chans, planes, 3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=planes, reduction=1, module="conv1")]
        stride = 1
        for i, n in enumerate(num_layers):
            self.add_module(f"dense{i + 1}", nn.Sequential(*[
                DenseLayer(planes + j * growth_rate, growth_rate) for j in range(n)]))
            planes += n * growth_rate
            last = i == len(num_layers) - 1
            self.feature_info.append(dict(num_chs=planes, reduction=stride,
                                          module="bn" if last else f"dense{i + 1}"))
            if not last:
                out_planes = int(math.floor(planes * reduction))
                self.add_module(f"trans{i + 1}", Transition(planes, out_planes))
                planes, stride = out_planes, stride * 2
        self.bn = nn.BatchNorm2d(planes)
        self._init_head(planes, num_classes, global_pool, drop_rate)

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [
            self.conv1,
            self.dense1,
            lambda x: self.dense2(self.trans1(x)),
            lambda x: self.dense3(self.trans2(x)),
            lambda x: F.relu(self.bn(self.dense4(self.trans3(x)))),
        ]


default_cfgs = generate_default_cfgs({
    "densenet121_cifar": cifar_cfg(classifier="linear", mean=CIFAR10_MEAN, std=CIFAR10_STD),
})


@register_model
def densenet121_cifar(pretrained: bool = False, **kwargs: Any) -> CifarDenseNet:
    """PS-KD's CIFAR DenseNet-121 (growth 32), 7.05M parameters at 100 classes."""
    return build_cifar_model(CifarDenseNet, "densenet121_cifar", pretrained, num_stages=5,
                             num_layers=(6, 12, 24, 16), growth_rate=32, **kwargs)
