"""PS-KD (Kim et al., ICCV 2021), with the parity semantics of lgcnsai/PS-KD-Pytorch.

The target of sample i at epoch t is ``(1 − α_t)·onehot(y_i) + α_t·P_i(t−1)``, where P_i(t−1) is
the softmax (T = 1) the model gave sample i during its own training step of the previous epoch,
before that step's optimizer update. α_t = α_T·(t+1)/E; the epoch-0 target is one-hot.

The memory of the P_i (``method.memory``) is dense (``[N, C]``) or top-k (the k largest
probabilities and their classes per sample), replicated on every process or sharded over them
(``skd.memory``). Every layout is read inside the loss kernel and written after the optimizer
step with the rows of every rank; sharded and replicated layouts give identical results.

Mixup/CutMix (not in the official code): sample i mixed with sample j at weight λ trains against
``(1 − α_t)·target_i + α_t·(λ·P_i + (1 − λ)·P_j)``, ``target_i`` the batch's mixed, label-smoothed
soft target, built in the same kernel. The row written for sample i after the step is still the
softmax of its own training input, which is the mixed image. A top-k memory refuses mixing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import skd_kernels
from skd.batch import Batch
from skd.config_checks import bounded, one_of
from skd.errors import ConfigError
from skd.memory import ReplicatedRows, ShardedRows, SoftTargetMemory
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method
from skd.mixup import mixed_target_args
from skd_kernels.reference import REST_RULES

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MEMORIES = ("replicated", "sharded", "topk", "sharded_topk")


def pskd_alpha(epoch: int, num_epochs: int, alpha_T: float) -> float:
    """α_t = max(0, α_T·(epoch+1)/E), epoch 0-indexed (official ``main.py``)."""
    return max(0.0, alpha_T * (epoch + 1) / num_epochs)


@register_method("pskd")
class PSKD(Method):
    supports_mixup = True

    @dataclass
    class Config(MethodConfig):
        name: str = "pskd"
        alpha_T: float = bounded(0.8, ge=0, le=1)
        """Final weight of the past predictions (0.8 on CIFAR-100; 0.3 on ImageNet per the paper)."""
        memory_dtype: str = one_of("float16", tuple(_DTYPES))
        """Storage of the memory's probabilities: float16 (default), bfloat16, or float32 for bit
        parity."""
        memory: str = one_of("replicated", MEMORIES)
        """Layout of the memory: ``replicated`` (an [N, C] table on every process), ``sharded``
        (process r of W holds rows [r·N/W, (r+1)·N/W); batches fetch and write their rows with
        all-to-all), ``topk`` (the memory_k largest probabilities and their class ids per sample,
        on every process) or ``sharded_topk``."""
        memory_k: int = bounded(16, ge=1)
        """Classes kept per sample by a top-k memory (at most the number of classes)."""
        memory_rest: str = one_of("spread", REST_RULES)
        """Top-k memory: the probability outside the k kept classes is ``spread`` evenly over the
        other classes (default: a row still sums to 1, as the softmax it stands for) or dropped,
        the k kept values rescaled to sum to 1 (``renormalize``)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        dtype, N, C = _DTYPES[cfg.memory_dtype], data.num_samples, data.num_classes
        self.topk = cfg.memory in ("topk", "sharded_topk")
        if self.topk and cfg.memory_k > C:
            raise ConfigError(f"config key 'method.memory_k' = {cfg.memory_k}: must be at most the "
                              f"number of classes, {C}")
        fields = ({"values": (cfg.memory_k, dtype), "ids": (cfg.memory_k, torch.int32)}
                  if self.topk else {"table": (C, dtype)})
        if cfg.memory == "replicated":
            self.memory = SoftTargetMemory(N, C, dtype)
        elif cfg.memory == "topk":
            self.memory = ReplicatedRows(N, fields)
        else:
            self.memory = ShardedRows(N, fields)
        self.alpha_t = 0.0

    @classmethod
    def mixup_refusal(cls, cfg: Config) -> str | None:
        if cfg.memory in ("topk", "sharded_topk"):
            return (f"method.memory={cfg.memory} cannot mix two samples' memory rows; use "
                    f"method.memory=replicated or sharded")
        return None

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        # The official code overwrites the memory rows with one-hot labels during epoch 0, so
        # the epoch-0 target is exactly one-hot; α = 0 gives the same target without the write.
        self.alpha_t = 0.0 if epoch == 0 else pskd_alpha(epoch, num_epochs, self.cfg.alpha_T)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        fetched = self.memory.fetch(batch["index"])  # a sharded fetch runs during the forward
        logits = self.model(batch["image"])
        rows = fetched.wait()
        B, C = logits.shape
        if self.topk:
            k, values = self.cfg.memory_k, rows.tensors["values"]
            new = {"values": logits.new_empty(B, k, dtype=values.dtype),
                   "ids": logits.new_empty(B, k, dtype=torch.int32)}
            loss = skd_kernels.pskd_topk_loss(
                logits, batch["label"], values, rows.tensors["ids"], rows.index, self.alpha_t,
                rest=self.cfg.memory_rest, values_out=new["values"], ids_out=new["ids"])
        else:
            table = rows.tensors["table"]
            new = {"table": logits.new_empty(B, C, dtype=table.dtype)}
            loss = skd_kernels.pskd_loss(logits, batch["label"], table, rows.index, self.alpha_t,
                                         probs_out=new["table"], **mixed_target_args(batch))
        return {"loss": loss, "logits": logits, "memory_rows": new}

    @torch.no_grad()
    def after_step(self, batch: Batch, out: dict[str, torch.Tensor]) -> None:
        self.memory.write_rows(batch["index"], out["memory_rows"], capacity=self.data.batch_size)

    def rank_state(self) -> dict[str, torch.Tensor]:
        if not isinstance(self.memory, ShardedRows):
            return {}
        return {f"memory.{k}": v for k, v in self.memory.rank_state().items()}

    def load_rank_states(self, parts: list[dict[str, torch.Tensor]]) -> None:
        if not isinstance(self.memory, ShardedRows):
            return super().load_rank_states(parts)
        self.memory.load_rank_states([{k.removeprefix("memory."): v for k, v in part.items()}
                                      for part in parts])

    def epoch_stats(self) -> dict[str, float]:
        return {"alpha_t": self.alpha_t}
