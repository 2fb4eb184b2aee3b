"""Build the student (any timm model, skd's CIFAR nets included) from a ``ModelConfig``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import timm
from torch import nn

import skd.models  # noqa: F401  registers the CIFAR architectures with timm
from skd.weights import load_state_dict_file, load_weights

if TYPE_CHECKING:
    from skd.config import ModelConfig


def create_model(cfg: ModelConfig, num_classes: int, *, initial_weights: bool = True) -> nn.Module:
    """The student: ``timm.create_model`` with the config's arguments and, with
    ``initial_weights``, its initial weights: timm's pretrained ones (``model.pretrained``) or
    the local file ``model.checkpoint``, read without running code (``skd.weights``) and loaded
    strictly; a missing, unreadable or ill-fitting file is an error naming it."""
    kwargs = dict(cfg.kwargs)
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    pretrained = initial_weights and cfg.pretrained and not cfg.checkpoint
    model = timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if initial_weights and cfg.checkpoint:
        source = f"model.checkpoint {cfg.checkpoint}"
        load_weights(model, load_state_dict_file(cfg.checkpoint, "model.checkpoint"), source,
                     f"model {cfg.name!r} with {num_classes} classes")
    return model
