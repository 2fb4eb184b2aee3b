"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller runs it
(``--distill attention``, ``distiller_zoo/AT.py``).

``loss = γ·CE + α·KD + β·Σ_maps L_AT(F_s, F_t)`` over every stage after the stem (RepDistiller's
``feat[1:-1]``), ``L_AT`` = mean squared difference of the L2-normalised spatial attention maps
``mean_c F^p`` (p = 2); RepDistiller's ``-a 0 -b 1000``. No trainable connector.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.features import FeatureTap, Features
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig, stages_after_stem
from skd.methods.registry import register_method


@register_method("at")
class AT(FeatureKD):
    @dataclass
    class Config(FeatureKDConfig):
        name: str = "at"
        feat_weight: float = bounded(1000.0, ge=0)
        """β, weight of the summed attention losses (RepDistiller ``-b 1000``)."""
        p: float = bounded(2.0, gt=0)
        """Exponent of the attention map ``mean_c F^p`` (``Attention(p=2)``)."""
        features: list[int | str] = field(default_factory=list)
        """Maps compared (feature indices or submodule names); empty: every stage after the
        stem (RepDistiller ``feat[1:-1]``; its WRNs need ``[1, 2, block3]``)."""

    def feature_taps(self) -> list[FeatureTap]:
        return self.cfg.features or stages_after_stem(self.model)

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses.at_loss(s, t, self.cfg.p) for s, t in zip(student.maps, teacher.maps))
