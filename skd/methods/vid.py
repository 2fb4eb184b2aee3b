"""Variational information distillation (Ahn et al., CVPR 2019) as RepDistiller runs it
(``--distill vid``, ``distiller_zoo/VID.py``, the VID authors' code).

``loss = γ·CE + α·KD + β·Σ_maps L_VID`` over every stage after the stem (RepDistiller's
``feat[1:-1]``). Per map, a regressor (three bias-free 1×1 convs with ReLUs, widths
C_s → C_t → C_t → C_t, PyTorch's default init) predicts the teacher map's mean from the student
map, and a trained per-channel variance ``softplus(log_scale) + eps`` (initially
``init_pred_var`` = 5) scales the Gaussian negative log-likelihood. The student map is pooled to
the teacher's size *before* the regressor when larger (the teacher map when smaller).
RepDistiller's ``-a 0 -b 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.features import FeatureTap, Features
from skd.methods.base import DataSpec
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig, stages_after_stem
from skd.methods.registry import register_method


class VariationalRegressor(nn.Module):
    """``VIDLoss``'s trainable part: the mean regressor and the per-channel ``log_scale``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        # softplus⁻¹(init_pred_var − eps), so that the initial variance is init_pred_var.
        self.log_scale = nn.Parameter(
            torch.full((out_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        student_map, teacher_map = losses.match_size(student_map, teacher_map)
        return losses.vid_loss(self.regressor(student_map), teacher_map, self.log_scale, self.eps)


@register_method("vid")
class VID(FeatureKD):
    @dataclass
    class Config(FeatureKDConfig):
        name: str = "vid"
        feat_weight: float = bounded(1.0, ge=0)
        """β, weight of the summed VID losses (RepDistiller ``-b 1``)."""
        init_pred_var: float = bounded(5.0, gt=0)
        """Initial per-channel variance (``VIDLoss(init_pred_var=5.0)``)."""
        eps: float = bounded(1e-5, ge=0)
        """Added to the variance (``VIDLoss(eps=1e-5)``)."""
        features: list[int | str] = field(default_factory=list)
        """Maps compared (feature indices or submodule names); empty: every stage after the
        stem (RepDistiller ``feat[1:-1]``; its WRNs need ``[1, 2, block3]``)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.regressors = nn.ModuleList(
            VariationalRegressor(s[0], t[0], t[0], cfg.init_pred_var, cfg.eps)
            for s, t in zip(self.student_shapes, self.teacher_shapes))

    def feature_taps(self) -> list[FeatureTap]:
        return self.cfg.features or stages_after_stem(self.model)

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(vid(s, t) for s, t, vid in zip(student.maps, teacher.maps, self.regressors))
