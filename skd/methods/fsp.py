"""FSP, "A Gift from Knowledge Distillation" (Yim et al., CVPR 2017), as RepDistiller runs it
(``--distill fsp``: ``distiller_zoo/FSP.py``, ``helper/pretrain.py::init``).

RepDistiller trains FSP in two stages, reproduced here by epoch:

1. **Init stage**, the first ``init_epochs`` epochs (RepDistiller ``--init_epochs 30``): the loss
   is only the FSP loss (weight ``feat_weight``, 1: the official stage sums the FSP terms
   unweighted), over all maps including the stem (RepDistiller's ``feat[:-1]``), pairs of
   consecutive maps. The classifier gets no gradient, as official (its init optimizer holds the
   feature modules only). The whole student runs in train mode; the official stage leaves
   modules outside its feature list in eval mode (on the WRNs the final ``bn1``, whose running
   statistics skd therefore updates; docs/feature_kd.md).
2. **Main stage**, the remaining epochs: ``γ·CE + α·KD`` only. RepDistiller's ``-b 50`` multiplies
   a loss that its main loop sets to 0 for FSP, so it has no effect; its run uses ``-a 0``.

RepDistiller's epochs count the main stage only (240 after 30 init epochs), so its recipe is
``epochs: 270`` here with the lr milestones shifted by 30 (the init stage runs at the constant
base lr 0.05, as official). The optimizer is not rebuilt between the stages (RepDistiller builds
a fresh SGD for the main stage): the momentum of the feature weights carries over.

FSP needs equal channel counts map by map (RepDistiller: N/A for wrn_40_2 → wrn_40_1). During the
init stage DDP would see the idle classifier as an unused parameter and stop, so a run with
``init_epochs > 0`` must use one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.collectives import world
from skd.config_checks import bounded
from skd.errors import ConfigError
from skd.features import FeatureTap, Features, num_feature_maps
from skd.methods.base import DataSpec
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig
from skd.methods.registry import register_method


@register_method("fsp")
class FSP(FeatureKD):
    @dataclass
    class Config(FeatureKDConfig):
        name: str = "fsp"
        feat_weight: float = bounded(1.0, ge=0)
        """Weight of the FSP loss in the init stage (official: the unweighted sum, 1)."""
        init_epochs: int = bounded(30, ge=0)
        """Epochs of the FSP-only init stage before the CE stage (``--init_epochs 30``)."""
        features: list[int | str] = field(default_factory=list)
        """Maps whose consecutive pairs give the FSP matrices; empty: all of them, stem included
        (RepDistiller ``feat[:-1]``; its WRNs need ``[0, 1, 2, block3]``)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        if len(self.taps) < 2:
            raise ConfigError("method 'fsp' needs at least two maps in method.features")
        channels_s = [shape[0] for shape in self.student_shapes]
        channels_t = [shape[0] for shape in self.teacher_shapes]
        if channels_s != channels_t:
            raise ConfigError(f"method 'fsp' needs equal channel counts map by map, got student "
                              f"{channels_s} and teacher {channels_t}")
        if cfg.init_epochs and world()[1] > 1:
            raise ConfigError("method 'fsp' with init_epochs > 0 trains on one process only: the "
                              "classifier is idle during the init stage, which DDP rejects")
        self.init_stage = cfg.init_epochs > 0

    def feature_taps(self) -> list[FeatureTap]:
        return self.cfg.features or list(range(num_feature_maps(self.model)))

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        self.init_stage = epoch < self.cfg.init_epochs

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.fsp_loss(student.maps, teacher.maps)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.init_stage:
            student, teacher = self.features(batch["image"])
            fsp = self.cfg.feat_weight * self.feature_loss(student, teacher, batch, {})
            return {"loss": fsp, "logits": student.logits.detach(), "parts": {"fsp": fsp}}
        images = batch["image"]
        logits = self.model(images)
        teacher_logits = self.teacher_logits(images) if self.cfg.kd_weight else None
        parts = self.logit_parts(logits, batch["label"], teacher_logits)
        return {"loss": sum(parts.values()), "logits": logits, "parts": parts}
