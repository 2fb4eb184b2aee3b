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

import json
from pathlib import Path
from typing import Any

import timm
import yaml
from torch import nn

import skd.models  # noqa: F401  registers the CIFAR architectures with timm
from skd.convert import CHECKPOINT_FORMATS, mmcls_to_timm
from skd.errors import SkdError
from skd.weights import WEIGHTS_EXPECTED, load_state_dict_file, load_weights, read_torch_file

__all__ = ["load_teacher", "load_state_dict_file", "safetensors_metadata", "training_statistics"]


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


# ---- how a teacher's inputs were normalised ----------------------------------------------------

_SKD_DATA_KEY = "skd_data"
"""The safetensors metadata key under which skd's exports record their input normalisation."""


def safetensors_metadata(model: str, mean: Any, std: Any, img_size: int) -> dict[str, str]:
    """Metadata for exported weights: the model and the normalisation and resolution of the
    inputs it was trained on, read back by ``training_statistics``."""
    data = {"model": model, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "img_size": int(img_size)}
    return {_SKD_DATA_KEY: json.dumps(data)}


def training_statistics(path: str | Path) -> dict[str, Any] | None:
    """``{"mean", "std", "img_size"}`` the weights in ``path`` were trained with, when skd wrote
    them: an export's safetensors metadata, a run checkpoint's config, or the ``config.yaml`` of
    the run directory the file lies in; None for a file made elsewhere."""
    path = Path(path)
    data: dict[str, Any] | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001  an unreadable file is reported when its tensors are loaded
            meta = {}
        if _SKD_DATA_KEY in meta:
            data = json.loads(meta[_SKD_DATA_KEY])
        elif (path.parent / "config.yaml").is_file():  # an export of an skd run before the metadata
            data = _config_data(yaml.safe_load((path.parent / "config.yaml").read_text()))
    else:
        try:
            state = read_torch_file(path, "teacher weights", WEIGHTS_EXPECTED, mmap=True)
        except SkdError:  # reported when its tensors are loaded
            state = None
        if isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("method"), dict):
            data = _config_data(state["config"])
    if not data or not all(k in data for k in ("mean", "std", "img_size")):
        return None
    return {"mean": tuple(float(v) for v in data["mean"]), "std": tuple(float(v) for v in data["std"]),
            "img_size": int(data["img_size"])}


def _config_data(config: Any) -> dict[str, Any] | None:
    """The ``data`` section of an skd config mapping, or None for anything else."""
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else None
