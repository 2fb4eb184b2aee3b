"""ShuffleNetV2 (Ma et al., ECCV 2018) as a timm model: torchvision's network (the same layers as
mmcls's ``ShuffleNetV2``, the student of cls_KD's USKD ShuffleNetV2 row) behind timm's interface.

``timm.create_model("shufflenet_v2_x1_0")`` builds it (timm has no ShuffleNet). The blocks are
torchvision's ``InvertedResidual`` and every parameter keeps torchvision's name, so a state dict
of ``torchvision.models.shufflenet_v2_x1_0`` loads unchanged (and our own safetensors files load
with ``pretrained_cfg_overlay=dict(file=...)``). Initialisation is PyTorch's default, as in
torchvision.

Feature indices (``forward_intermediates``): 0 the stem (conv1 + max pool, 24 channels, stride
4), 1..3 ``stage2``..``stage4`` (116, 232, 464 channels, strides 8, 16, 32), 4 ``conv5`` (1024
channels): the map the head pools. USKD's weak head reads index −2, ``stage4``: mmcls's
``out_indices=(2, 3)`` feature ``fea_s[-2]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

from skd.models._cifar import CifarNet, build_cifar_model

__all__ = ["ShuffleNetV2"]


class ShuffleNetV2(CifarNet):
    """torchvision ``ShuffleNetV2(stages_repeats, stages_out_channels)`` with the stem-and-stages
    timm interface that skd's nets share (``CifarNet``: it is not CIFAR-specific)."""

    def __init__(self, stages_repeats: tuple[int, int, int], stages_out_channels: tuple[int, ...],
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        stem = stages_out_channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=stem, reduction=4, module="maxpool")]
        channels, reduction = stem, 4
        for i, (repeats, out) in enumerate(zip(stages_repeats, stages_out_channels[1:4]), start=2):
            blocks = [InvertedResidual(channels, out, 2)] + [InvertedResidual(out, out, 1) for _ in range(repeats - 1)]
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
            channels, reduction = out, reduction * 2
            self.feature_info.append(dict(num_chs=out, reduction=reduction, module=f"stage{i}"))
        last = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(channels, last, 1, 1, 0, bias=False), nn.BatchNorm2d(last),
                                   nn.ReLU(inplace=True))
        self.feature_info.append(dict(num_chs=last, reduction=reduction, module="conv5"))
        self._init_head(last, num_classes, global_pool, drop_rate)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.conv1(x))

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.stage2, self.stage3, self.stage4, self.conv5]


default_cfgs = generate_default_cfgs({
    "shufflenet_v2_x1_0": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1.0", "classifier": "fc",
    },
})


@register_model
def shufflenet_v2_x1_0(pretrained: bool = False, **kwargs: Any) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x (2.28M parameters at 1000 classes), torchvision's ``shufflenet_v2_x1_0``."""
    return build_cifar_model(ShuffleNetV2, "shufflenet_v2_x1_0", pretrained, num_stages=5,
                             stages_repeats=(4, 8, 4), stages_out_channels=(24, 116, 232, 464, 1024), **kwargs)
