"""TF-KD, Teacher-free KD (Yuan et al., CVPR 2020), parity with
``yuanli2333/Teacher-free-Knowledge-Distillation`` (METHODS §4).

``mode: reg`` (TF-KD_reg, the manually designed virtual teacher)::

    L = (1−α)·CE(z, y) + α·m·KL(softmax(p^d/T) ‖ softmax(z)) / C      # p^d: 0.99 on the label

``mode: self`` (TF-KD_self, a pre-trained teacher, by default of the student's architecture)::

    L = (1−α)·CE(s, y) + α·m·T²·KL(softmax(t/T) ‖ softmax(s/T)) / C

The ÷C is ``nn.KLDivLoss()``'s default 'mean' reduction in the official code;
``kl_reduction: batchmean`` is the clean opt-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.methods.base import DataSpec
from skd.methods.registry import register_method
from skd.methods.teacher import TeacherConfig, TeacherMethod

# ResNet-18 values of the official experiments/*/params.json (METHODS §4.1, §4.2).
_DEFAULT_MULTIPLIER = {"reg": 100.0, "self": 50.0}


@register_method("tfkd")
class TFKD(TeacherMethod):
    @dataclass
    class Config(TeacherConfig):
        name: str = "tfkd"
        mode: str = "reg"
        """``reg``: virtual teacher (TF-KD_reg); ``self``: pre-trained teacher (TF-KD_self)."""
        reg_temperature: float = 20.0
        """T of the virtual teacher softmax (reg; ResNet-18 ``params.json``)."""
        reg_alpha: float = 0.1
        """α of the reg loss (ResNet-18 ``params.json``)."""
        correct_prob: float = 0.99
        """Virtual-teacher probability of the label (hard-coded ``a`` in the official code)."""
        temperature: float = 6.0
        """T of teacher and student softmaxes (self; ResNet-18 ``params.json``)."""
        alpha: float = 0.95
        """α of the self loss (ResNet-18 ``params.json``)."""
        multiplier: float | None = None
        """m, the KL multiplier (``params.multiplier``); empty means the ResNet-18 value of the
        mode: 100 (reg) or 50 (self)."""
        kl_reduction: str = "mean"
        """``mean``: ÷N·C as ``nn.KLDivLoss()`` in the official code; ``batchmean``: ÷N."""

        def __post_init__(self) -> None:
            if self.mode not in ("reg", "self"):
                raise ValueError(f"method.mode must be 'reg' or 'self', got {self.mode!r}")
            if self.kl_reduction not in ("mean", "batchmean"):
                raise ValueError(f"method.kl_reduction must be 'mean' or 'batchmean', "
                                 f"got {self.kl_reduction!r}")

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.multiplier = (_DEFAULT_MULTIPLIER[cfg.mode] if cfg.multiplier is None
                           else cfg.multiplier)

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        return cfg.mode == "self"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
