"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) as RepDistiller runs it
(``--distill pkt``, ``distiller_zoo/PKT.py``).

``loss = γ·CE + α·KD + β·L_PKT`` on the pre-logits embeddings (RepDistiller's ``feat[-1]``):
a KL between the row-normalised cosine-similarity distributions of the batch, averaged over
all B² entries; RepDistiller's ``-a 0 -b 30000``. No trainable connector.
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


@register_method("pkt")
class PKT(FeatureKD):
    with_embedding = True

    @dataclass
    class Config(FeatureKDConfig):
        name: str = "pkt"
        feat_weight: float = bounded(30000.0, ge=0)
        """β, weight of the PKT loss (RepDistiller ``-b 30000``)."""

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.pkt_loss(student.embedding, teacher.embedding)
