"""TF-KD, Teacher-free KD (Yuan et al., CVPR 2020), parity with
``yuanli2333/Teacher-free-Knowledge-Distillation`` (docs/methods.md §4).

``mode: reg`` (TF-KD_reg, the manually designed virtual teacher)::

    L = (1−α)·CE(z, y) + α·m·KL(softmax(p^d/T) ‖ softmax(z)) / C      # p^d: 0.99 on the label

``mode: self`` (TF-KD_self, a pre-trained teacher, by default of the student's architecture)::

    L = (1−α)·CE(s, y) + α·m·T²·KL(softmax(t/T) ‖ softmax(s/T)) / C

The ÷C is ``nn.KLDivLoss()``'s default 'mean' reduction in the official code;
``kl_reduction: batchmean`` is the clean opt-in.

Mixup/CutMix: refused (the official code has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded, one_of
from skd.methods.base import DataSpec
from skd.methods.registry import register_method
from skd.methods.teacher import TeacherConfig, TeacherMethod

# ResNet-18 values of the official experiments/*/params.json (docs/methods.md §4.1, §4.2).
_DEFAULT_MULTIPLIER = {"reg": 100.0, "self": 50.0}


@register_method("tfkd")
class TFKD(TeacherMethod):
    @dataclass
    class Config(TeacherConfig):
        name: str = "tfkd"
        mode: str = one_of("reg", ("reg", "self"))
        """``reg``: virtual teacher (TF-KD_reg); ``self``: pre-trained teacher (TF-KD_self)."""
        reg_temperature: float = bounded(20.0, gt=0)
        """T of the virtual teacher softmax (reg; ResNet-18 ``params.json``)."""
        reg_alpha: float = bounded(0.1, ge=0, le=1)
        """α of the reg loss (ResNet-18 ``params.json``)."""
        correct_prob: float = bounded(0.99, ge=0, le=1)
        """Virtual-teacher probability of the label (hard-coded ``a`` in the official code)."""
        temperature: float = bounded(6.0, gt=0)
        """T of teacher and student softmaxes (self; ResNet-18 ``params.json``)."""
        alpha: float = bounded(0.95, ge=0, le=1)
        """α of the self loss (ResNet-18 ``params.json``)."""
        multiplier: float | None = bounded(None, ge=0)
        """m, the KL multiplier (``params.multiplier``); empty means the ResNet-18 value of the
        mode: 100 (reg) or 50 (self)."""
        kl_reduction: str = one_of("mean", ("mean", "batchmean"))
        """``mean``: ÷N·C as ``nn.KLDivLoss()`` in the official code; ``batchmean``: ÷N."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.multiplier = (_DEFAULT_MULTIPLIER[cfg.mode] if cfg.multiplier is None
                           else cfg.multiplier)

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        return cfg.mode == "self"

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images, labels = batch["image"], batch["label"]
        logits = self.model(images)
        if self.teacher is None:
            loss = losses.tfkd_reg_loss(logits, labels, cfg.reg_temperature, cfg.reg_alpha,
                                        self.multiplier, cfg.correct_prob,
                                        kl_reduction=cfg.kl_reduction)
            alpha = cfg.reg_alpha
        else:
            teacher = self.teacher_logits(images)
            loss = losses.tfkd_self_loss(logits, teacher, labels, cfg.temperature, cfg.alpha,
                                         self.multiplier, kl_reduction=cfg.kl_reduction)
            alpha = cfg.alpha
        with torch.no_grad():  # the fused loss gives one scalar; split it for logging
            ce = (1.0 - alpha) * losses.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits, "parts": {"ce": ce, "kl": loss.detach() - ce}}
