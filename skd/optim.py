"""Optimizer and lr-scheduler keyword arguments from the config (timm ``optimizer_kwargs`` style)."""
from __future__ import annotations

from typing import Any

from skd.config import OptimConfig, SchedConfig


def optimizer_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    """Arguments for ``timm.optim.create_optimizer_v2``."""
    kwargs: dict[str, Any] = dict(opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  filter_bias_and_bn=cfg.wd_exclude_norm_bias, **cfg.kwargs)
    if cfg.opt in ("sgd", "nesterov", "momentum"):
        kwargs["momentum"] = cfg.momentum
    return kwargs


def scheduler_kwargs(cfg: SchedConfig, num_epochs: int, updates_per_epoch: int) -> dict[str, Any]:
    """Arguments for ``timm.scheduler.create_scheduler_v2``. Epoch-based schedules are applied
    at the start of each epoch, so a milestone m means "epochs m, m+1, ... use the decayed lr"."""
    return dict(sched=cfg.sched, num_epochs=num_epochs, decay_epochs=cfg.decay_epochs,
                decay_milestones=list(cfg.decay_milestones), decay_rate=cfg.decay_rate,
                warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                step_on_epochs=cfg.step_on_epochs, updates_per_epoch=updates_per_epoch)
