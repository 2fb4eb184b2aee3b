"""The base of the teacher-based methods (KD, NKD, ICKD, TF-KD_self): config fields and a frozen
teacher that stays in eval mode, outside the optimizer and outside checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from skd import losses
from skd.config_checks import one_of
from skd.convert import CHECKPOINT_FORMATS
from skd.errors import ConfigError
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.teacher import load_teacher

__all__ = ["TeacherConfig", "TeacherMethod", "create_teacher"]


@dataclass
class TeacherConfig(MethodConfig):
    """The teacher fields shared by every teacher-based method's ``Config``."""

    teacher: str = ""
    """timm model name of the teacher; empty means the student's own architecture."""
    teacher_checkpoint: str = ""
    """Teacher weights: safetensors, or a torch file (loaded with weights_only); required."""
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` when building the teacher."""
    teacher_format: str = one_of("timm", CHECKPOINT_FORMATS)
    """Parameter names in ``teacher_checkpoint``: ``timm``, or ``mmcls`` (mmcls / mmpretrain
    ``backbone.*``/``head.*`` checkpoints, renamed while loading; see ``skd convert mmcls``)."""


def create_teacher(cfg: TeacherConfig, student: nn.Module, num_classes: int) -> nn.Module:
    """The teacher described by a method config; ``cfg.teacher`` empty means the student's
    architecture (TF-KD_self's pre-trained same-architecture teacher)."""
    if not cfg.teacher_checkpoint:
        raise ConfigError(f"method '{cfg.name}' needs a teacher: set method.teacher_checkpoint "
                          f"(a safetensors or torch file; e.g. the model.safetensors of a 'ce' run)")
    name = cfg.teacher or _architecture(student)
    return load_teacher(name, cfg.teacher_checkpoint, num_classes,
                        checkpoint_format=cfg.teacher_format, **cfg.teacher_kwargs)


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ConfigError("method.teacher is empty and the student's timm architecture is unknown; "
                          "set method.teacher to a timm model name")
    return name


class TeacherMethod(Method):
    """A method with a frozen teacher (``self.teacher``): eval mode, no gradients, outside the
    optimizer and checkpoints. Its forward runs inside the method's, so under the same autocast.
    ``uses_teacher`` may say no for a config (TF-KD_reg); ``self.teacher`` is then None."""

    def __init__(self, model: nn.Module, cfg: TeacherConfig, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.teacher = create_teacher(cfg, model, data.num_classes) if self.uses_teacher(cfg) else None

    @classmethod
    def uses_teacher(cls, cfg: TeacherConfig) -> bool:
        return True

    def frozen_modules(self) -> list[nn.Module]:
        return [] if self.teacher is None else [self.teacher]

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(images)


def hard_and_kd_parts(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                      ce_weight: float, kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """RepDistiller's logit terms: ``ce`` = γ·CE, and ``kl`` = α·T²·KL when α > 0 (then
    ``teacher_logits`` is needed)."""
    parts = {"ce": ce_weight * losses.cross_entropy(logits, labels)}
    if kd_weight:
        parts["kl"] = kd_weight * losses.kd_loss(logits, teacher_logits, temperature)
    return parts
