"""The CIFAR PyramidNet-200 (α = 240, bottleneck) of PS-KD, with or without ShakeDrop.

``lgcnsai/PS-KD-Pytorch`` ``models/pyramid.py::PyramidNet(dataset='cifar100', depth=200,
alpha=240, bottleneck=True)`` (``--classifier_type PyramidNet``, the README's "PyramidNet-200"),
and ``models/pyramid_shake_drop.py::PyramidNet_ShakeDrop`` with the same arguments
(``--classifier_type PyramidNet_SD``); both come from ``dyhan0920/PyramidNet-PyTorch``:

- stem conv3x3(3→16) + BN, no ReLU; three stages (``layer1..3``) of (depth − 2) / 9 = 22
  bottlenecks whose width grows by α / 66 per block: block k (1-based over the whole net) has
  ``round(16 + k·α/66)`` planes and 4× as many output channels;
- a bottleneck is BN, conv1x1, BN-ReLU, conv3x3(stride), BN-ReLU, conv1x1(×4), BN, plus the
  shortcut: the input (2×2 average-pooled, ``ceil_mode``, in the first block of stages 2 and 3)
  zero-padded in channels, so no block has a projection;
- BN-ReLU (``bn_final``), global average pool (``AvgPool2d(8)`` at 32 px), ``Linear(1024, C)``
  named ``fc``; convolutions normal(0, √(2 / (k²·out))), BN weights 1 and biases 0, the Linear
  PyTorch's default.

ShakeDrop (``shakedrop=True``) multiplies each residual branch by a random factor during
training; its drop probability grows linearly over the 66 blocks to 0.5 at the last one, and it
has no parameters, so both variants have the same parameter names, which match the official
ones: PS-KD checkpoints of either load.

Feature indices: 0 stem (16 ch, ×1), 1..2 ``layer1..2`` outputs (384/704 ch, ×1/2),
3 = relu(bn_final(``layer3``)) (1024 ch, ×4), the map the head pools.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from skd.models._cifar import CIFAR10_MEAN, CIFAR10_STD, CifarNet, build_cifar_model, cifar_cfg

__all__ = ["PyramidNet", "ShakeDrop"]


class _ShakeDropFunction(torch.autograd.Function):
    """``x·forward_scale`` whose gradient is ``grad·backward_scale``: ShakeDrop scales the
    forward and the backward pass by different random factors."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_scale: torch.Tensor,
                backward_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(backward_scale)
        return x * forward_scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (backward_scale,) = ctx.saved_tensors
        return grad * backward_scale, None, None


class ShakeDrop(nn.Module):
    """ShakeDrop (Yamada et al., 2018) as PS-KD's ``models/shakedrop/shakedrop.py`` does it.

    Training: one gate per batch is open with probability ``1 − p_drop``; when open the branch
    passes unchanged, when closed the forward multiplies each sample by α ~ U(−1, 1) and the
    backward multiplies its gradient by an independent β ~ U(0, 1). Evaluation:
    ``(1 − p_drop)·x``.
    The official code draws β inside the backward and reads the gate with ``.item()``; here both
    factors are drawn in the forward as tensors (the same distribution, no host synchronisation).
    """

    def __init__(self, p_drop: float) -> None:
        super().__init__()
        self.p_drop = p_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * (1.0 - self.p_drop)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        gate = torch.empty((), device=x.device).bernoulli_(1.0 - self.p_drop)
        alpha = torch.empty(shape, device=x.device).uniform_(-1.0, 1.0)
        beta = torch.empty(shape, device=x.device).uniform_(0.0, 1.0)
        forward_scale = (gate + (1.0 - gate) * alpha).to(x.dtype)
        backward_scale = (gate + (1.0 - gate) * beta).to(x.dtype)
        return _ShakeDropFunction.apply(x, forward_scale, backward_scale)

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop}"


class PyramidBottleneck(nn.Module):
    """The pyramidal bottleneck, with the official attribute names (``bn1..bn4``,
    ``conv1..conv3``); the shortcut is zero-padded to the branch's channels."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 p_shakedrop: float | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None
        self.shake_drop = ShakeDrop(p_shakedrop) if p_shakedrop is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        out = self.bn4(out)
        if self.shake_drop is not None:
            out = self.shake_drop(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        missing = out.shape[1] - shortcut.shape[1]
        if missing:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, missing))
        return out + shortcut


class PyramidNet(CifarNet):
    """PS-KD ``PyramidNet`` / ``PyramidNet_ShakeDrop`` for CIFAR with bottlenecks:
    depth = 9n + 2, widening α spread evenly over the 3n blocks."""

    def __init__(self, depth: int = 200, alpha: float = 240, shakedrop: bool = False,
                 num_classes: int = 100, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        addrate = alpha / (3 * n * 1.0)
        # The official expression, kept verbatim so the eval-time scales are bit-identical:
        # p_drop rises linearly from 0.5/(3n) at the first block to 0.5 at the last.
        p_drops = [1.0 - (1.0 - (0.5 / (3 * n)) * (i + 1)) for i in range(3 * n)]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.feature_info = [dict(num_chs=16, reduction=1, module="bn1")]
        in_planes, width = 16, 16.0
        for i in range(3):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                # the official float accumulation: block widths are round(16 + k·addrate)
                width = width + addrate
                planes = int(round(width))
                blocks.append(PyramidBottleneck(
                    in_planes, planes, stride if j == 0 else 1,
                    p_drops[i * n + j] if shakedrop else None))
                in_planes = planes * PyramidBottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_planes, reduction=2 ** i,
                                          module="bn_final" if i == 2 else f"layer{i + 1}"))
        self.bn_final = nn.BatchNorm2d(in_planes)
        self._init_head(in_planes, num_classes, global_pool, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def _last_stage(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_final(self.layer3(x)))

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.layer1, self.layer2, self._last_stage]


default_cfgs = generate_default_cfgs({
    "pyramidnet200_cifar": cifar_cfg(mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "pyramidnet200_shakedrop_cifar": cifar_cfg(mean=CIFAR10_MEAN, std=CIFAR10_STD),
})


@register_model
def pyramidnet200_cifar(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PS-KD's CIFAR PyramidNet-200 (α = 240, bottleneck), 26.84M parameters at 100 classes."""
    return build_cifar_model(PyramidNet, "pyramidnet200_cifar", pretrained, num_stages=4,
                             depth=200, alpha=240, **kwargs)


@register_model
def pyramidnet200_shakedrop_cifar(pretrained: bool = False, **kwargs: Any) -> PyramidNet:
    """PS-KD's ``PyramidNet_ShakeDrop``: PyramidNet-200 (α = 240) with ShakeDrop, 26.84M."""
    return build_cifar_model(PyramidNet, "pyramidnet200_shakedrop_cifar", pretrained,
                             num_stages=4, depth=200, alpha=240, shakedrop=True, **kwargs)
