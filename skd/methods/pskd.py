"""PS-KD (Kim et al., ICCV 2021), with the parity semantics of lgcnsai/PS-KD-Pytorch (METHODS.md §3).

The target of sample i at epoch t is ``(1 − α_t)·onehot(y_i) + α_t·P_i(t−1)``, where P_i(t−1) is
the softmax (T = 1) the model gave sample i during its own training step of the previous epoch,
before that step's optimizer update. α_t = α_T·(t+1)/E; the epoch-0 target is one-hot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import skd_kernels
from skd.memory import SoftTargetMemory
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pskd_alpha(epoch: int, num_epochs: int, alpha_T: float) -> float:
    """α_t = max(0, α_T·(epoch+1)/E), epoch 0-indexed (official ``main.py``)."""
    return max(0.0, alpha_T * (epoch + 1) / num_epochs)


@register_method("pskd")
class PSKD(Method):
    @dataclass
    class Config(MethodConfig):
        name: str = "pskd"
        alpha_T: float = 0.8
        """Final weight of the past predictions (0.8 on CIFAR-100; 0.3 on ImageNet per the paper)."""
        memory_dtype: str = "float16"
        """Storage of the [N, C] memory: float16 (default), bfloat16, or float32 for bit parity."""

        def __post_init__(self) -> None:
            if self.memory_dtype not in _DTYPES:
                raise ValueError(f"method.memory_dtype must be one of {list(_DTYPES)}, "
                                 f"got {self.memory_dtype!r}")

    def __init__(self, model: torch.nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.memory = SoftTargetMemory(data.num_samples, data.num_classes, _DTYPES[cfg.memory_dtype])
        self.alpha_t = 0.0

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        # The official code overwrites the memory rows with one-hot labels during epoch 0, so
        # the epoch-0 target is exactly one-hot; α = 0 gives the same target without the write.
        self.alpha_t = 0.0 if epoch == 0 else pskd_alpha(epoch, num_epochs, self.cfg.alpha_T)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        table = self.memory.to_device(logits.device)
        probs = torch.empty(logits.shape, dtype=table.dtype, device=logits.device)
        loss = skd_kernels.pskd_loss(logits, batch["label"], table, batch["index"], self.alpha_t,
                                 probs_out=probs)
        return {"loss": loss, "logits": logits, "probs": probs}

    @torch.no_grad()
    def after_step(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        self.memory.write(batch["index"], out["probs"], capacity=self.data.batch_size)

    def epoch_stats(self) -> dict[str, float]:
        return {"alpha_t": self.alpha_t}
