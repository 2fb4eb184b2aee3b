"""The base of the teacher-based methods (KD, NKD, ICKD, TF-KD_self): config fields and a frozen
teacher that stays in eval mode, outside the optimizer, checkpoints and DDP, fed its inputs in
the normalisation and resolution it was trained with."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from skd import losses
from skd.config_checks import bounded, one_of, per_channel
from skd.convert import CHECKPOINT_FORMATS
from skd.errors import ConfigError
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.features import fixed_input_size
from skd.teacher import load_teacher, training_statistics

__all__ = ["TeacherConfig", "TeacherMethod", "TeacherInput", "create_teacher", "teacher_input"]


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
    teacher_mean: list[float] | None = per_channel(None)
    """Per-channel mean the teacher was trained with. Empty: what ``teacher_checkpoint`` records
    (skd's exports and checkpoints do), else the teacher architecture's timm ``pretrained_cfg``
    (timm's and mmcls's ImageNet weights, RepDistiller's CIFAR nets). The student's images are
    renormalised to it; nothing is done when it equals the student's ``data.mean``/``data.std``."""
    teacher_std: list[float] | None = per_channel(None, positive=True)
    """Per-channel standard deviation the teacher was trained with; empty: as ``teacher_mean``."""
    teacher_img_size: int = bounded(0, ge=0)
    """Input resolution of the teacher; 0: as ``teacher_mean`` says where its statistics come
    from. The images are resized (bilinear, antialiased) when it differs from ``data.img_size``."""


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


class TeacherInput(nn.Module):
    """The student's images as the teacher was trained to see them: ``x·a + b`` per channel (from
    the student's normalisation to the teacher's), then a resize to the teacher's resolution.
    Each step is skipped when it changes nothing: the same tensor comes back."""

    def __init__(self, student: DataSpec, mean: tuple[float, ...], std: tuple[float, ...], size: int) -> None:
        """From the student's data (``mean``/``std``/``img_size`` None: unknown, left alone) to
        the teacher's ``mean``, ``std`` and ``size``."""
        super().__init__()
        s_mean, s_std = student.mean or mean, student.std or std
        self.renormalise = tuple(s_mean) != tuple(mean) or tuple(s_std) != tuple(std)
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
                                        for v in (s_mean, s_std, mean, std))
        # (x·σs + μs − μt) / σt, in float64 before rounding to the buffers' float32
        self.register_buffer("scale", (s_std / t_std).float(), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).float(), persistent=False)
        self.size = size if student.img_size is not None and size != student.img_size else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            images = torch.addcmul(self.shift.to(images.dtype), images, self.scale.to(images.dtype))
        if self.size is not None:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return images

    def extra_repr(self) -> str:
        return f"renormalise={self.renormalise}, size={self.size}"


def teacher_input(cfg: TeacherConfig, teacher: nn.Module, data: DataSpec) -> tuple[TeacherInput, str]:
    """The teacher's input adapter, and a line saying what it does and where its numbers come
    from: ``method.teacher_mean``/``teacher_std``/``teacher_img_size``, else what the teacher's
    checkpoint records, else its timm ``pretrained_cfg`` for the statistics and, for a model that
    only takes one input size (a ViT), that size; a CNN is then fed the training resolution."""
    recorded = training_statistics(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
    if recorded is not None:
        mean, std, size, source = recorded["mean"], recorded["std"], recorded["img_size"], cfg.teacher_checkpoint
    else:
        pretrained = getattr(teacher, "pretrained_cfg", None) or {}
        mean, std = pretrained.get("mean", (0.485, 0.456, 0.406)), pretrained.get("std", (0.229, 0.224, 0.225))
        fixed = fixed_input_size(teacher)
        size = fixed[-1] if fixed else data.img_size
        source = f"timm's pretrained_cfg of {pretrained.get('architecture', type(teacher).__name__)}"
    explicit = [k for k in ("teacher_mean", "teacher_std", "teacher_img_size") if getattr(cfg, k)]
    mean, std = tuple(cfg.teacher_mean or mean), tuple(cfg.teacher_std or std)
    size = cfg.teacher_img_size or size
    adapter = TeacherInput(data, mean, std, size)
    what = []
    if adapter.renormalise:
        what.append(f"renormalised from mean {_fmt(data.mean)} std {_fmt(data.std)} to mean {_fmt(mean)} "
                    f"std {_fmt(std)}")
    if adapter.size is not None:
        what.append(f"resized from {data.img_size} to {size} px")
    origin = ", ".join(f"method.{k}" for k in explicit)
    origin = f"{origin}; the rest from {source}" if origin and len(explicit) < 3 else origin or source
    if not what:
        return adapter, f"teacher inputs: the student's (its statistics, from {origin}, are the same)"
    return adapter, f"teacher inputs: {'; '.join(what)} (from {origin})"


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


class TeacherMethod(Method):
    """A method with a frozen teacher (``self.teacher``): eval mode, no gradients, outside the
    optimizer, checkpoints and DDP (``Method.add_frozen``). Its forward runs inside the method's,
    so under the same autocast. Every input goes through ``teacher_images``: the normalisation
    and resolution the teacher was trained with. ``uses_teacher`` may say no for a config
    (TF-KD_reg); ``self.teacher`` is then None."""

    def __init__(self, model: nn.Module, cfg: TeacherConfig, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.teacher_note = ""
        if self.uses_teacher(cfg):
            teacher = self.add_frozen("teacher", create_teacher(cfg, model, data.num_classes))
            adapter, self.teacher_note = teacher_input(cfg, teacher, data)
            self.add_frozen("teacher_input", adapter)

    @classmethod
    def uses_teacher(cls, cfg: TeacherConfig) -> bool:
        return True

    def notes(self) -> list[str]:
        return [self.teacher_note] if self.teacher_note else []

    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen.get("teacher")

    def teacher_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (normalised for the student) as the teacher expects them."""
        return self._frozen["teacher_input"](images)

    def probe_sizes(self, default: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(C, H, W)`` of dry runs of the student and the teacher (to size the modules between
        their features): ``default`` for both, or, when the teacher's inputs are resized, the
        training resolution and the teacher's."""
        size = self._frozen["teacher_input"].size
        if size is None:
            return default, default
        channels = default[0]
        return (channels, self.data.img_size, self.data.img_size), (channels, size, size)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(self.teacher_images(images))


def hard_and_kd_parts(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                      ce_weight: float, kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """RepDistiller's logit terms: ``ce`` = γ·CE, and ``kl`` = α·T²·KL when α > 0 (then
    ``teacher_logits`` is needed)."""
    parts = {"ce": ce_weight * losses.cross_entropy(logits, labels)}
    if kd_weight:
        parts["kl"] = kd_weight * losses.kd_loss(logits, teacher_logits, temperature)
    return parts
