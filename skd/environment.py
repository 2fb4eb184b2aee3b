"""What a run needs from the machine it runs on, checked when the run starts.

A ``TrainConfig`` describes a run (types, ranges, choices; ``skd.config``); whether this machine
and its packages can carry it out is a separate question, asked by ``check_environment`` at the
start of ``skd train`` (``Trainer``) and ``skd eval``: the model names are known to timm (skd's
CIFAR nets included), the optimizer is one of timm's, and ``data.backend=dali`` has DALI, a GPU
if its pipeline runs there, and no augmentation DALI lacks. So a config written on a GPU node with
DALI loads, compares and reports on a laptop, and is evaluated there with the torch backend.
"""
from __future__ import annotations

import difflib

from skd.config import TrainConfig
from skd.errors import ConfigError

__all__ = ["check_environment"]


def check_environment(cfg: TrainConfig, *, evaluation: bool = False) -> None:
    """Raise ``ConfigError`` naming the key if this machine cannot run ``cfg``; with
    ``evaluation``, only what evaluating its model needs (the model, the loader backend)."""
    import timm

    import skd.models  # noqa: F401  registers skd's CIFAR nets with timm

    models = [("model.name", cfg.model.name)]
    if getattr(cfg.method, "teacher", "") and not evaluation:  # empty: the student's architecture
        models.append(("method.teacher", cfg.method.teacher))
    for key, name in models:
        if not timm.is_model(name):
            _refuse(key, name, timm.list_models(), "timm model", "timm.list_models()")
    if not evaluation:
        from timm.optim import list_optimizers

        names, opt = list_optimizers(), cfg.optim.opt.lower()
        # timm also takes a prefixed name such as "lookahead_adamw": its last part is the optimizer.
        if opt not in names and opt.split("_")[-1] not in names:
            _refuse("optim.opt", cfg.optim.opt, names, "timm optimizer", "timm.optim.list_optimizers()")
    if cfg.data.backend == "dali":
        from skd.data.dali_loader import check_dali_config
        check_dali_config(cfg.data, training=not evaluation)


def _refuse(key: str, value: str, names: list[str], kind: str, listing: str) -> None:
    """The error for an unknown name, with the closest known ones."""
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else f" (see {listing})"
    raise ConfigError(f"config key '{key}' = {value!r}: not a {kind}{hint}")
