"""What every skd CIFAR net shares: the timm model interface around a list of feature stages.

A net is a stem followed by stages; ``_feature_fns`` lists them as callables (stem first), and
``feature_info`` describes each one. Feature index i is the output of callable i, so index 0 is
the stem and index −1 is the last stage: the map the head pools (``forward_head(inter[-1])`` are
the logits). This matches timm's ResNet, whose indices are stem, layer1..layer4.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from skd.weights import extract_state_dict

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
"""RepDistiller ``dataset/cifar100.py``."""
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""CS-KD / PS-KD normalise CIFAR-100 with the CIFAR-10 statistics (docs/methods.md §2.4, §3.4)."""
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg for a 32-px CIFAR-100 net with no published weights of ours."""
    return {
        "url": "", "num_classes": 100, "input_size": (3, 32, 32), "pool_size": (1, 1),
        "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": False,
        "mean": CIFAR100_MEAN, "std": CIFAR100_STD, "first_conv": "conv1", "classifier": "fc",
        **kwargs,
    }


def _checkpoint_filter(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """timm's ``pretrained_cfg_overlay=dict(file=...)`` accepts what ``skd.weights`` reads: the
    official checkpoints (RepDistiller / ICKD ``{"model": ...}``, PS-KD ``{"net": ...}`` with DDP
    ``module.`` prefixes) as well as skd's own."""
    return extract_state_dict(state_dict, "pretrained file")


def kaiming_conv_bn_init(module: nn.Module) -> None:
    """The official CIFAR nets' initialisation: Kaiming-normal (fan-out) convolutions, BatchNorms
    of weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _pool(pool_type: str) -> SelectAdaptivePool2d:
    # timm flattens only when it pools ("" is a pass-through that keeps the map).
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


def build_cifar_model(cls: type[nn.Module], variant: str, pretrained: bool, num_stages: int,
                      **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` with ``features_only`` served by ``forward_intermediates``
    (``num_stages`` counts the stem)."""
    return build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=_checkpoint_filter,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_stages))),
        **kwargs,
    )


class CifarNet(nn.Module):
    """Base class: subclasses build the stem, stages and the head Linear (named ``head_name``),
    set ``feature_info`` and implement ``_feature_fns``."""

    head_name: str = "fc"

    def _init_head(self, num_features: int, num_classes: int, global_pool: str,
                   drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.global_pool = _pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        pooled = num_features * self.global_pool.feat_mult()
        head = nn.Linear(pooled, num_classes) if num_classes > 0 else nn.Identity()
        setattr(self, self.head_name, head)

    def _feature_fns(self, height: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Stem, then each stage, as callables; ``height`` is the input height (VGG needs it)."""
        raise NotImplementedError

    # ---- the timm interface ------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool(global_pool)
        pooled = self.num_features * self.global_pool.feat_mult()
        head = nn.Linear(pooled, num_classes) if num_classes > 0 else nn.Identity()
        setattr(self, self.head_name, head)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._feature_fns(x.shape[-2]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(fn, x, use_reentrant=False)
            else:
                x = fn(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: ``(final_features, [maps at indices])``.

        Index 0 is the stem, 1.. the stages, −1 the last stage (= ``forward_features``); an int
        takes the last n. ``norm`` has nothing to apply (the last stage already ends with
        whatever norm the net has) and is accepted for interface compatibility.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        fns = self._feature_fns(x.shape[-2])
        take_indices, max_index = feature_take_indices(len(fns), indices)
        if stop_early:
            fns = fns[:max_index + 1]
        intermediates = []
        for i, fn in enumerate(fns):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(fn, x, use_reentrant=False)
            else:
                x = fn(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the head (when asked) and return absolute indices; stages are not pruned."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices
