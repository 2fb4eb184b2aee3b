"""Relational KD (Park et al., CVPR 2019) as RepDistiller runs it (``--distill rkd``,
``distiller_zoo/RKD.py``).

``loss = γ·CE + α·KD + β·(25·L_distance + 50·L_angle)`` on the pre-logits embeddings
(RepDistiller's ``feat[-1]``, the pooled vector the classifier reads): smooth-L1 between the
mean-normalised pairwise distances and between the cosines of all angles of the batch;
RepDistiller's ``-a 0 -b 1``. No trainable connector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.features import Features
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig
from skd.methods.registry import register_method


@register_method("rkd")
class RKD(FeatureKD):
    with_embedding = True

    @dataclass
    class Config(FeatureKDConfig):
        name: str = "rkd"
        feat_weight: float = bounded(1.0, ge=0)
        """β, weight of the RKD loss (RepDistiller ``-b 1``)."""
        distance_weight: float = bounded(25.0, ge=0)
        """Weight of the distance term (``RKDLoss(w_d=25)``)."""
        angle_weight: float = bounded(50.0, ge=0)
        """Weight of the angle term (``RKDLoss(w_a=50)``)."""

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.rkd_loss(student.embedding, teacher.embedding, self.cfg.distance_weight,
                               self.cfg.angle_weight)
