"""Neuron selectivity transfer (Huang & Wang, 2017) as RepDistiller runs it (``--distill nst``,
``distiller_zoo/NST.py``).

``loss = γ·CE + α·KD + β·Σ_maps MMD²_poly(F_s, F_t)`` over every stage after the stem
(RepDistiller's ``feat[1:-1]``): the squared MMD, with the kernel ``(a·b)²``, between the
channels' L2-normalised spatial activation patterns; RepDistiller's ``-a 0 -b 50``. No trainable
connector.
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


@register_method("nst")
class NST(FeatureKD):
    @dataclass
    class Config(FeatureKDConfig):
        name: str = "nst"
        feat_weight: float = bounded(50.0, ge=0)
        """β, weight of the summed MMD losses (RepDistiller ``-b 50``)."""
        features: list[int | str] = field(default_factory=list)
        """Maps compared (feature indices or submodule names); empty: every stage after the
        stem (RepDistiller ``feat[1:-1]``; its WRNs need ``[1, 2, block3]``)."""

    def feature_taps(self) -> list[FeatureTap]:
        return self.cfg.features or stages_after_stem(self.model)

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses.nst_loss(s, t) for s, t in zip(student.maps, teacher.maps))
