"""What RepDistiller's feature-distillation baselines share (``HobbitLong/RepDistiller``
``train_student.py`` and ``helper/loops.py::train_distill``).

Every step runs the student and the frozen teacher once each, taking the feature maps a method
asks for (``skd.features.forward_with_maps``: stage indices or named submodules) and, for the
methods that work on the pooled vector, the pre-logits embedding (RepDistiller's ``feat[-1]``)::

    loss = γ·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·L_method(student, teacher)

with RepDistiller's ``-r`` (γ, default 1), ``-a`` (α; 0 in every baseline run of its script) and
``-b`` (β, per method). The parts are logged as ``ce``, ``kl`` (only when α > 0) and the method
name. A method's connector modules (regressors, embeddings) are its submodules: trained with the
student, checkpointed, and dropped at export.

Shapes for building those modules come from one dry run of both nets on a zero image of the
student's default input size (RepDistiller's dry run at 32 px). Mixup/CutMix: refused by every
one of them (RepDistiller has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from skd.batch import Batch
from skd.config_checks import bounded
from skd.features import (FeatureTap, Features, default_input_size, forward_with_maps,
                          num_feature_maps, probe_features)
from skd.methods.base import DataSpec
from skd.methods.teacher import TeacherConfig, TeacherMethod, hard_and_kd_parts

__all__ = ["FeatureKDConfig", "FeatureKD", "stages_after_stem"]


@dataclass
class FeatureKDConfig(TeacherConfig):
    """The loss weights every baseline shares; each method sets its own ``feat_weight``."""

    ce_weight: float = bounded(1.0, ge=0)
    """γ, weight of the hard-label cross-entropy (RepDistiller ``-r``, default 1)."""
    kd_weight: float = bounded(0.0, ge=0)
    """α, weight of Hinton KD (``-a``): 0 in RepDistiller's baseline runs; > 0 adds KD."""
    feat_weight: float = bounded(1.0, ge=0)
    """β, weight of the method's feature loss (``-b``; each method's default is its script value)."""
    temperature: float = bounded(4.0, gt=0)
    """T of the KD term (``--kd_T``)."""


def stages_after_stem(model: nn.Module) -> list[FeatureTap]:
    """Every stage output but the stem: indices 1 … n−1, RepDistiller's ``feat[1:-1]`` on its
    ResNets and VGGs (on its WRNs the last one differs: there ``f3`` is the raw ``block3``)."""
    return list(range(1, num_feature_maps(model)))


class FeatureKD(TeacherMethod):
    """Base of the baselines. A subclass sets ``with_embedding`` if it needs the pre-logits
    vector, returns its maps from ``feature_taps`` and its loss from ``feature_loss``."""

    with_embedding: ClassVar[bool] = False

    def __init__(self, model: nn.Module, cfg: FeatureKDConfig, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.taps = list(self.feature_taps())
        # A bad tap fails here, before training, naming the index or module.
        student_size, teacher_size = self.probe_sizes(default_input_size(model))
        student = probe_features(model, self.taps, self.with_embedding, student_size)
        teacher = probe_features(self.teacher, self.taps, self.with_embedding, teacher_size)
        # (C, H, W) of each map, and the embedding widths (0 when the method does not use them).
        self.student_shapes = [tuple(m.shape[1:]) for m in student.maps]
        self.teacher_shapes = [tuple(m.shape[1:]) for m in teacher.maps]
        self.student_dim = student.embedding.shape[1] if self.with_embedding else 0
        self.teacher_dim = teacher.embedding.shape[1] if self.with_embedding else 0

    def feature_taps(self) -> list[FeatureTap]:
        """The maps this method compares, the same taps on both nets (none by default)."""
        return []

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unweighted ``L_method``. ``out`` is the forward output being built: a method may
        put tensors there that its ``after_step`` needs."""
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> tuple[Features, Features]:
        """Student features (with gradients) and teacher features (without)."""
        student = forward_with_maps(self.model, images, self.taps, self.with_embedding)
        with torch.no_grad():
            teacher = forward_with_maps(self.teacher, self.teacher_images(images), self.taps,
                                        self.with_embedding)
        return student, teacher

    def logit_parts(self, logits: torch.Tensor, labels: torch.Tensor,
                    teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``ce`` = γ·CE, and ``kl`` = α·T²·KL when α > 0 (then ``teacher_logits`` is needed)."""
        cfg = self.cfg
        return hard_and_kd_parts(logits, labels, teacher_logits, cfg.ce_weight, cfg.kd_weight, cfg.temperature)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        student, teacher = self.features(batch["image"])
        out: dict[str, torch.Tensor] = {"logits": student.logits}
        parts = self.logit_parts(student.logits, batch["label"], teacher.logits)
        parts[self.cfg.name] = self.cfg.feat_weight * self.feature_loss(student, teacher, batch, out)
        out["parts"] = parts
        out["loss"] = sum(parts.values())
        return out
