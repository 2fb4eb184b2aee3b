"""Similarity-preserving KD (Tung & Mori, ICCV 2019) as RepDistiller runs it
(``--distill similarity``, ``distiller_zoo/SP.py``).

``loss = γ·CE + α·KD + β·L_SP(F_s, F_t)`` on the last map (RepDistiller's ``feat[-2]``):
``L_SP`` matches the row-normalised B×B similarity matrices of the flattened maps, ÷ B²;
RepDistiller's ``-a 0 -b 3000``. No trainable connector.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.errors import ConfigError
from skd.features import FeatureTap, Features
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig
from skd.methods.registry import register_method


@register_method("sp")
class SP(FeatureKD):
    @dataclass
    class Config(FeatureKDConfig):
        name: str = "sp"
        feat_weight: float = bounded(3000.0, ge=0)
        """β, weight of the similarity loss (RepDistiller ``-b 3000``)."""
        features: list[int | str] = field(default_factory=lambda: [-1])
        """Maps compared, the loss summed over them: the last stage (RepDistiller ``feat[-2]``;
        its WRNs need ``[block3]``)."""

        def __post_init__(self) -> None:
            if not self.features:
                raise ConfigError("config key 'method.features' must name at least one map for 'sp'")

    def feature_taps(self) -> list[FeatureTap]:
        return self.cfg.features

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses.sp_loss(s, t) for s, t in zip(student.maps, teacher.maps))
