"""Correlation congruence (Peng et al., ICCV 2019) as RepDistiller runs it
(``--distill correlation``, ``distiller_zoo/CC.py``, the CC authors' code).

``loss = γ·CE + α·KD + β·L_CC(embed_s(e_s), embed_t(e_t))`` on the pre-logits embeddings
(RepDistiller's ``feat[-1]``). Both embeddings are trainable ``nn.Linear(·, feat_dim)``
(``models/util.py::LinearEmbed``, PyTorch's default init): the teacher's too, as official (it is
in RepDistiller's ``trainable_list``). RepDistiller's ``-a 0 -b 0.02``, ``--feat_dim 128``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.features import Features
from skd.methods.base import DataSpec
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig
from skd.methods.registry import register_method


@register_method("cc")
class CC(FeatureKD):
    with_embedding = True

    @dataclass
    class Config(FeatureKDConfig):
        name: str = "cc"
        feat_weight: float = bounded(0.02, ge=0)
        """β, weight of the correlation loss (RepDistiller ``-b 0.02``)."""
        feat_dim: int = bounded(128, ge=1)
        """Width of both linear embeddings (``--feat_dim 128``)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.embed_s = nn.Linear(self.student_dim, cfg.feat_dim)
        self.embed_t = nn.Linear(self.teacher_dim, cfg.feat_dim)

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.cc_loss(self.embed_s(student.embedding), self.embed_t(teacher.embedding))
