"""Build the student (any timm model, skd's CIFAR nets included) from a ``ModelConfig``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import timm
from torch import nn

import skd.models  # noqa: F401  registers the CIFAR architectures with timm

if TYPE_CHECKING:
    from skd.config import ModelConfig


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The student: ``timm.create_model`` with the config's weights and arguments (the name was
    checked when the config was built)."""
    kwargs = dict(cfg.kwargs)
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.checkpoint:
        # timm loads a local file through the pretrained-config overlay; num_classes in the
        # overlay keeps timm from discarding a classifier that already has the right size.
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.checkpoint, num_classes=num_classes)
    return timm.create_model(cfg.name, pretrained=cfg.pretrained or bool(cfg.checkpoint),
                             num_classes=num_classes, **kwargs)
