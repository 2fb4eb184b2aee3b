"""FitNet hints (Romero et al., ICLR 2015) as RepDistiller runs it (``--distill hint``).

``loss = γ·CE + α·KD + β·MSE(regressor(F_s[h]), F_t[h])`` with RepDistiller's ``-a 0 -b 100``
and ``--hint_layer 2`` (skd feature index 2: the second stage of its ResNets, WRNs and VGGs).
The regressor is RepDistiller's ``models/util.py::ConvReg``, trained with the student. The hint
is trained jointly with the cross-entropy from the first step: RepDistiller has no FitNet
pre-training stage (its init stage serves only AB, FT and FSP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.errors import ConfigError
from skd.features import FeatureTap, Features
from skd.methods.base import DataSpec
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig
from skd.methods.registry import register_method


def make_regressor(student_shape: tuple[int, int, int],
                   teacher_shape: tuple[int, int, int]) -> nn.Sequential:
    """``ConvReg``: a conv chosen by the map sizes, then BatchNorm and ReLU; PyTorch's default
    init (the conv has a bias), as official. Shapes are ``(C, H, W)``:

    - student twice the teacher's height: Conv3×3, stride 2, padding 1;
    - student half the teacher's height: ConvTranspose4×4, stride 2, padding 1;
    - otherwise, student at least as large: a Conv of kernel ``(1 + H_s − H_t, 1 + W_s − W_t)``
      (1×1 for equal sizes).
    """
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
    if s_h == 2 * t_h:
        conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ConfigError(f"FitNet: no regressor from a {s_h}x{s_w} student hint to a larger "
                          f"{t_h}x{t_w} teacher hint (only half its size is supported)")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU(inplace=True))


@register_method("fitnet")
class FitNet(FeatureKD):
    @dataclass
    class Config(FeatureKDConfig):
        name: str = "fitnet"
        feat_weight: float = bounded(100.0, ge=0)
        """β, weight of the hint MSE (RepDistiller ``-b 100``)."""
        hint_layer: int | str = 2
        """The hint map of both nets: a feature index (RepDistiller ``--hint_layer 2``) or a
        submodule name."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.regressor = make_regressor(self.student_shapes[0], self.teacher_shapes[0])

    def feature_taps(self) -> list[FeatureTap]:
        return [self.cfg.hint_layer]

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.hint_loss(self.regressor(student.maps[0]), teacher.maps[0])
