"""Optimizer and lr scheduler from the config (timm ``optimizer_kwargs`` style).

Parameter groups are built from the *student* exactly as timm builds them for a model (its
``no_weight_decay()`` names, its ``group_matcher`` for layer-wise lr decay), not from the method
wrapper around it, which has neither. A method's extra trainable modules (USKD's weak head,
ICKD's embed, connectors of feature methods) go into groups of their own with the base lr.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from skd.config import OptimConfig, SchedConfig

__all__ = ["create_optimizer", "optimizer_kwargs", "param_groups", "scheduler_kwargs", "MOMENTUM_OPTIMIZERS"]

MOMENTUM_OPTIMIZERS = ("sgd", "nesterov", "momentum")
"""The timm optimizers that are given ``optim.momentum``; the others ignore it."""


def optimizer_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    """Arguments for ``timm.optim.create_optimizer_v2`` besides the parameters."""
    kwargs: dict[str, Any] = dict(opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.kwargs)
    if cfg.opt in MOMENTUM_OPTIMIZERS:
        kwargs["momentum"] = cfg.momentum
    return kwargs


def param_groups(student: nn.Module, extra: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict[str, Any]]:
    """timm's parameter groups of ``student``, then those of the ``extra`` (name, parameter) pairs.

    The student's ``no_weight_decay()`` parameters never decay (as in timm); with
    ``wd_exclude_norm_bias`` no 1-d parameter decays either (biases, norm weights), in the extra
    modules too. ``layer_decay`` scales the lr of the student's layers (``lr_scale``, applied by
    timm's schedulers); extra modules keep the base lr.
    """
    no_decay = set(getattr(student, "no_weight_decay", lambda: set())())
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(student, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                          no_weight_decay_list=no_decay,
                                          weight_decay_exclude_1d=cfg.wd_exclude_norm_bias)
    else:
        groups = param_groups_weight_decay(student, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay,
                                           weight_decay_exclude_1d=cfg.wd_exclude_norm_bias)
    groups = [g for g in groups if g["params"]]
    decay = [p for _, p in extra if not (cfg.wd_exclude_norm_bias and p.ndim <= 1)]
    plain = [p for _, p in extra if cfg.wd_exclude_norm_bias and p.ndim <= 1]
    groups += [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, cfg.weight_decay), (plain, 0.0)) if ps]
    return groups


def create_optimizer(method: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of a method: its student ``method.model`` grouped as timm does, plus every
    other trainable parameter of the method (frozen teachers have none)."""
    extra = [(n, p) for n, p in method.named_parameters() if p.requires_grad and not n.startswith("model.")]
    return create_optimizer_v2(param_groups(method.model, extra, cfg), **optimizer_kwargs(cfg))


def scheduler_kwargs(cfg: SchedConfig, num_epochs: int, updates_per_epoch: int) -> dict[str, Any]:
    """Arguments for ``timm.scheduler.create_scheduler_v2``. A ``multistep`` milestone m means
    "epochs m, m+1, ... (0-indexed) use the decayed lr": timm's multistep scheduler applies
    milestone m one step early (at t = m − 1, its historical convention), so it is handed m + 1
    (one update later when the lr is updated every optimizer step)."""
    shift = 1.0 if cfg.step_on_epochs else 1.0 / updates_per_epoch
    return dict(sched=cfg.sched, num_epochs=num_epochs, decay_epochs=cfg.decay_epochs,
                decay_milestones=[m + shift for m in cfg.decay_milestones], decay_rate=cfg.decay_rate,
                warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                step_on_epochs=cfg.step_on_epochs, updates_per_epoch=updates_per_epoch)
