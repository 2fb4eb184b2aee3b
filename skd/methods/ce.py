"""Plain cross-entropy (``ce``) and label smoothing (``ls``): the seeds' baselines."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skd import losses
from skd.methods.base import Method, MethodConfig
from skd.methods.registry import register_method


@register_method("ce")
class CrossEntropy(Method):
    @dataclass
    class Config(MethodConfig):
        name: str = "ce"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        return {"loss": losses.cross_entropy(logits, batch["label"]), "logits": logits}


@register_method("ls")
class LabelSmoothing(Method):
    """``uniform``: (1−ε)·onehot + ε/C (PS-KD's baseline); ``others``: ε/(C−1) off-label (TF-KD)."""

    @dataclass
    class Config(MethodConfig):
        name: str = "ls"
        smoothing: float = 0.1
        """ε, the probability mass moved off the label."""
        mode: str = "uniform"
        """``uniform`` (PS-KD) or ``others`` (TF-KD)."""

        def __post_init__(self) -> None:
            if self.mode not in ("uniform", "others"):
                raise ValueError(f"method.mode must be 'uniform' or 'others', got {self.mode!r}")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        loss = losses.cross_entropy(logits, batch["label"], smoothing=self.cfg.smoothing,
                                    smoothing_mode=self.cfg.mode)
        return {"loss": loss, "logits": logits}
