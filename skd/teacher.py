"""Loading frozen teachers (KD, NKD, ICKD, TF-KD_self; see ``skd.methods.teacher``).

A teacher is any ``timm.create_model`` name (skd's CIFAR nets included; a run checks it with
``skd.environment.check_environment``) plus a local checkpoint: a safetensors file, or a torch
file read with ``weights_only=True`` (never unpickled code; ``skd.weights``). The checkpoint may be

- an skd run checkpoint (``checkpoints/step-*.pt``: the student is ``state["method"]`` under the
  ``model.`` prefix) or an skd export (``model.safetensors``),
- a plain ``state_dict``,
- a dict holding one under ``state_dict``, ``model`` (RepDistiller / ICKD teachers), ``net``
  (CS-KD / PS-KD) or ``module``; a DDP ``module.`` prefix is stripped.

With ``checkpoint_format="mmcls"`` the state dict has mmcls / mmpretrain names (``backbone.*``,
``head.*``; NKD's official teachers) and is renamed to timm's by ``skd.convert.mmcls_to_timm``.

The teacher is returned in eval mode with ``requires_grad=False`` on every parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

import skd.models  # noqa: F401  registers the CIFAR architectures with timm
from skd.convert import CHECKPOINT_FORMATS, mmcls_to_timm
from skd.weights import load_state_dict_file, load_weights

__all__ = ["load_teacher", "load_state_dict_file"]


def load_teacher(name: str, checkpoint: str | Path, num_classes: int, *,
                 checkpoint_format: str = "timm", **kwargs: Any) -> nn.Module:
    """Build the timm model ``name`` with ``num_classes`` outputs, load ``checkpoint`` (names in
    ``checkpoint_format``: ``timm`` or ``mmcls``) strictly, and freeze it (eval mode, no gradients).
    A missing, unreadable or ill-fitting checkpoint is an ``SkdError`` naming the file."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"teacher checkpoint format {checkpoint_format!r} is not one of "
                         f"{CHECKPOINT_FORMATS}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    state = load_state_dict_file(checkpoint, "teacher checkpoint")
    if checkpoint_format == "mmcls":
        state = mmcls_to_timm(state, model, source=str(checkpoint))
    load_weights(model, state, f"teacher checkpoint {checkpoint}",
                 f"teacher model {name!r} with {num_classes} classes")
    model.eval()
    model.requires_grad_(False)
    return model
