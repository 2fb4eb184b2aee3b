"""RepDistiller's CIFAR nets (``HobbitLong/RepDistiller`` ``models/``), the students and teachers of
the RepDistiller / ICKD tables: resnet8x4, resnet32x4, resnet20/32/56/110 (``resnet.py``),
wrn_16_2, wrn_40_1, wrn_40_2 (``wrn.py``), vgg8 and vgg13 (``vgg.py``; RepDistiller's
``model_dict`` maps them to the BN variants ``vgg8_bn`` / ``vgg13_bn``).

Layers, initialisation and parameter names follow the official files, so RepDistiller / ICKD
checkpoints (``{"model": state_dict}``) load with ``pretrained_cfg_overlay=dict(file=...)``.
The only change: the fixed-size final pools (``AvgPool2d(8)``) are global average pools, which is
the same at 32 px and also works at other sizes.

Feature indices (``forward_intermediates``; at 32 px), index 0 being the stem:

- ResNet: 0 stem relu(bn(conv)), 1..3 layer1..layer3 outputs, post-ReLU (RepDistiller ``f0..f3``
  with ``preact=False``; ICKD's ``feat[-2]`` is index 3). Reductions 1, 1, 2, 4.
- WRN: 0 stem conv, 1..2 block1..block2 outputs (raw residual sums), 3 = relu(bn1(block3)): the
  final BN-ReLU belongs to the last stage, which is ICKD's ``feat[-2]`` for WRN (RepDistiller's
  ``f3`` is the raw block3 output). Reductions 1, 1, 2, 4.
- VGG: 0..4 = relu(block0..block4) (RepDistiller ``f0..f4``), pools before blocks 1..3, and
  before block 4 only for 64-px inputs (the official ``if h == 64``). Reductions 1, 2, 4, 8, 8.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CifarNet, build_cifar_model, cifar_cfg, kaiming_conv_bn_init

__all__ = ["CifarResNet", "WideResNet", "VGG"]


# ---- resnet.py ---------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (identity, or conv1x1-BN), then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CifarResNet(CifarNet):
    """RepDistiller ``ResNet(depth, num_filters, 'basicblock')``: depth = 6n+2, three stages of n
    basic blocks with ``num_filters[1:]`` channels after a ``num_filters[0]``-channel stem."""

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int],
                 num_classes: int = 100, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.feature_info = [dict(num_chs=num_filters[0], reduction=1, module="bn1")]
        inplanes, reduction = num_filters[0], 1
        for i, planes in enumerate(num_filters[1:]):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(inplanes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=reduction,
                                          module=f"layer{i + 1}"))
        self._init_head(inplanes, num_classes, global_pool, drop_rate)
        kaiming_conv_bn_init(self)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3]


# ---- wrn.py ------------------------------------------------------------------------------------

class WideBasicBlock(nn.Module):
    """Pre-activation wide block. When the shape changes, the 1x1 shortcut takes relu(bn1(x));
    otherwise the identity takes x (the official ``equalInOut`` logic)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None  # official name, kept for checkpoint compatibility
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class _WideStage(nn.Module):
    """RepDistiller's ``NetworkBlock``: a ``layer`` Sequential of n wide blocks."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    """RepDistiller ``WideResNet(depth, widen_factor)``: depth = 6n+4, stages of 16k/32k/64k
    channels, then BN-ReLU, global pool, Linear."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _WideStage(n, channels[0], channels[1], 1)
        self.block2 = _WideStage(n, channels[1], channels[2], 2)
        self.block3 = _WideStage(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.feature_info = [
            dict(num_chs=channels[0], reduction=1, module="conv1"),
            dict(num_chs=channels[1], reduction=1, module="block1"),
            dict(num_chs=channels[2], reduction=2, module="block2"),
            dict(num_chs=channels[3], reduction=4, module="bn1"),
        ]
        self._init_head(channels[3], num_classes, global_pool, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _last_stage(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.block3(x)))

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self.conv1, self.block1, self.block2, self._last_stage]


# ---- vgg.py ------------------------------------------------------------------------------------

_VGG_CFGS = {
    "S": ((64,), (128,), (256,), (512,), (512,)),  # vgg8
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # vgg13
}


def _vgg_block(widths: tuple[int, ...], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """conv3x3(+BN)(+ReLU) per width; the last ReLU is left out (applied by the net), so the
    module indices match the official ``_make_layers``."""
    layers: list[nn.Module] = []
    for v in widths:
        layers.append(nn.Conv2d(in_channels, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(CifarNet):
    """RepDistiller ``VGG(cfg, batch_norm)``: five conv blocks, max-pools between them, global
    average pool, ``Linear(512, C)`` (``classifier``)."""

    head_name = "classifier"

    def __init__(self, cfg: str = "S", batch_norm: bool = True, num_classes: int = 100,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        widths = _VGG_CFGS[cfg]
        in_channels = in_chans
        self.feature_info = []
        for i, block_widths in enumerate(widths):
            self.add_module(f"block{i}", _vgg_block(block_widths, in_channels, batch_norm))
            in_channels = block_widths[-1]
            self.feature_info.append(dict(num_chs=in_channels, reduction=2 ** min(i, 3),
                                          module=f"block{i}"))
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self._init_head(in_channels, num_classes, global_pool, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        pool3 = self.pool3 if height == 64 else nn.Identity()  # official: pool3 only at 64 px
        return [
            lambda x: F.relu(self.block0(x)),
            lambda x: F.relu(self.block1(self.pool0(x))),
            lambda x: F.relu(self.block2(self.pool1(x))),
            lambda x: F.relu(self.block3(self.pool2(x))),
            lambda x: F.relu(self.block4(pool3(x))),
        ]


# ---- registration ------------------------------------------------------------------------------

default_cfgs = generate_default_cfgs({
    **{f"{name}_cifar": cifar_cfg() for name in (
        "resnet8", "resnet8x4", "resnet32x4", "resnet20", "resnet32", "resnet56", "resnet110",
        "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "vgg8_cifar": cifar_cfg(first_conv="block0.0", classifier="classifier"),
    "vgg13_cifar": cifar_cfg(first_conv="block0.0", classifier="classifier"),
})


def _resnet(variant: str, pretrained: bool, depth: int, num_filters: tuple[int, ...],
            **kwargs: Any) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, num_stages=4, depth=depth,
                             num_filters=num_filters, **kwargs)


def _wrn(variant: str, pretrained: bool, depth: int, widen_factor: int,
         **kwargs: Any) -> WideResNet:
    return build_cifar_model(WideResNet, variant, pretrained, num_stages=4, depth=depth,
                             widen_factor=widen_factor, **kwargs)


def _vgg(variant: str, pretrained: bool, cfg: str, **kwargs: Any) -> VGG:
    return build_cifar_model(VGG, variant, pretrained, num_stages=5, cfg=cfg, batch_norm=True,
                             **kwargs)


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model
def resnet8_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet8 (0.08M); the embedded demo's model."""
    return _resnet("resnet8_cifar", pretrained, 8, _THIN, **kwargs)


@register_model
def resnet8x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet8x4 (1.23M parameters at 100 classes)."""
    return _resnet("resnet8x4_cifar", pretrained, 8, _X4, **kwargs)


@register_model
def resnet32x4_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet32x4 (7.43M)."""
    return _resnet("resnet32x4_cifar", pretrained, 32, _X4, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet20 (0.28M)."""
    return _resnet("resnet20_cifar", pretrained, 20, _THIN, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet32 (0.47M)."""
    return _resnet("resnet32_cifar", pretrained, 32, _THIN, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet56 (0.86M)."""
    return _resnet("resnet56_cifar", pretrained, 56, _THIN, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """RepDistiller resnet110 (1.74M)."""
    return _resnet("resnet110_cifar", pretrained, 110, _THIN, **kwargs)


@register_model
def wrn_16_2_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """RepDistiller wrn_16_2 (0.70M)."""
    return _wrn("wrn_16_2_cifar", pretrained, 16, 2, **kwargs)


@register_model
def wrn_40_1_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """RepDistiller wrn_40_1 (0.57M)."""
    return _wrn("wrn_40_1_cifar", pretrained, 40, 1, **kwargs)


@register_model
def wrn_40_2_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """RepDistiller wrn_40_2 (2.26M)."""
    return _wrn("wrn_40_2_cifar", pretrained, 40, 2, **kwargs)


@register_model
def vgg8_cifar(pretrained: bool = False, **kwargs: Any) -> VGG:
    """RepDistiller vgg8 = ``vgg8_bn`` (3.97M)."""
    return _vgg("vgg8_cifar", pretrained, "S", **kwargs)


@register_model
def vgg13_cifar(pretrained: bool = False, **kwargs: Any) -> VGG:
    """RepDistiller vgg13 = ``vgg13_bn`` (9.46M)."""
    return _vgg("vgg13_cifar", pretrained, "B", **kwargs)
