"""Contrastive representation distillation (Tian et al., ICLR 2020), RepDistiller's own method
(``--distill crd``: ``crd/criterion.py``, ``crd/memory.py``).

``loss = γ·CE + α·KD + β·(L_NCE(student anchor) + L_NCE(teacher anchor))`` on the pre-logits
embeddings (RepDistiller's ``feat[-1]``), each mapped by a trainable ``Linear(·, feat_dim)`` and
L2-normalised (``Embed``; the teacher's embedding is trained too). RepDistiller's ``-a 0 -b 0.8``,
``--feat_dim 128 --nce_k 16384 --nce_t 0.07 --nce_m 0.5``.

Two per-sample memories ``[N, feat_dim]`` hold a momentum average of each sample's student and
teacher embeddings (``ContrastMemory``'s ``memory_v1`` / ``memory_v2``): fp32, initialised
uniformly in ±1/√(feat_dim/3), replicated on every rank and written after each step with the
rows of all ranks (``skd.memory.SoftTargetMemory``)::

    row_i ← normalise(nce_m · row_i + (1 − nce_m) · v_i)

The student anchor is scored against the teacher memory, the teacher anchor against the
student memory, at the sample's own row (the positive) and ``nce_k`` negatives. The score
normaliser Z = mean score × N of each side is fixed at the first step, as official (averaged
over ranks), and checkpointed.

Negatives differ from RepDistiller's CIFAR sampler (``--mode exact``: ``nce_k`` samples of the
*other classes*, drawn without replacement by the data loader): skd draws them on the device,
uniformly with replacement from all *other samples* (the positive itself excluded), because a
method does not see the labels of the whole training set. With 100 classes about 1 % of the
negatives then share the anchor's class. ``nce_k`` is capped at N − 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.collectives import world
from skd.config_checks import bounded
from skd.errors import DataError
from skd.features import Features
from skd.memory import SoftTargetMemory
from skd.methods.base import DataSpec
from skd.methods.feature_kd import FeatureKD, FeatureKDConfig
from skd.methods.registry import register_method


@register_method("crd")
class CRD(FeatureKD):
    with_embedding = True

    @dataclass
    class Config(FeatureKDConfig):
        name: str = "crd"
        feat_weight: float = bounded(0.8, ge=0)
        """β, weight of the contrastive loss (RepDistiller ``-b 0.8``)."""
        feat_dim: int = bounded(128, ge=1)
        """Width of the embeddings and the memories (``--feat_dim 128``)."""
        nce_k: int = bounded(16384, ge=1)
        """Negatives per positive (``--nce_k 16384``); at most N − 1 are used."""
        nce_t: float = bounded(0.07, gt=0)
        """Temperature of the scores (``--nce_t 0.07``)."""
        nce_m: float = bounded(0.5, ge=0, le=1)
        """Momentum of the memory update (``--nce_m 0.5``)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        if data.num_samples < 2:
            raise DataError(f"method 'crd' needs at least two training samples, got {data.num_samples}")
        self.embed_s = nn.Linear(self.student_dim, cfg.feat_dim)
        self.embed_t = nn.Linear(self.teacher_dim, cfg.feat_dim)
        self.num_negatives = min(cfg.nce_k, data.num_samples - 1)
        self.memory_s = SoftTargetMemory(data.num_samples, cfg.feat_dim, torch.float32)
        self.memory_t = SoftTargetMemory(data.num_samples, cfg.feat_dim, torch.float32)
        stdv = 1.0 / math.sqrt(cfg.feat_dim / 3)
        for memory in (self.memory_s, self.memory_t):
            memory.rows.uniform_(-stdv, stdv)  # seeded alike on every rank (the trainer's set_seed)
        # Z of the student-anchor and teacher-anchor scores; negative until the first step sets it.
        self.register_buffer("normalizer", torch.full((2,), -1.0))
        self._normalizer_known = False

    def contrast_index(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + K]``: each sample's own row, then K rows drawn uniformly from the others."""
        n = self.data.num_samples
        negatives = torch.randint(0, n - 1, (index.shape[0], self.num_negatives), device=index.device)
        negatives += (negatives >= index[:, None]).long()  # skip the positive
        return torch.cat([index[:, None], negatives], dim=1)

    def _normalizers(self, scores_s: torch.Tensor, scores_t: torch.Tensor) -> torch.Tensor:
        if not self._normalizer_known:  # once per process: a host sync on the first step
            if bool((self.normalizer < 0).any()):
                z = torch.stack([scores_s.mean(), scores_t.mean()]).detach() * self.data.num_samples
                world_size = world()[1]
                if world_size > 1:
                    dist.all_reduce(z)
                    z /= world_size
                self.normalizer.copy_(z)
            self._normalizer_known = True
        return self.normalizer

    def feature_loss(self, student: Features, teacher: Features, batch: Batch,
                     out: dict[str, torch.Tensor]) -> torch.Tensor:
        v_s = F.normalize(self.embed_s(student.embedding).float(), dim=1)
        v_t = F.normalize(self.embed_t(teacher.embedding).float(), dim=1)
        contrast = self.contrast_index(batch["index"])
        rows_s = self.memory_s.to_device(v_s.device)[contrast]
        rows_t = self.memory_t.to_device(v_t.device)[contrast]
        scores_s = losses.crd_scores(v_s, rows_t, self.cfg.nce_t)  # official out_v1
        scores_t = losses.crd_scores(v_t, rows_s, self.cfg.nce_t)  # official out_v2
        z = self._normalizers(scores_s, scores_t)
        out["crd_embed_s"], out["crd_embed_t"] = v_s.detach(), v_t.detach()
        n = self.data.num_samples
        return losses.crd_nce_loss(scores_s, z[0], n) + losses.crd_nce_loss(scores_t, z[1], n)

    @torch.no_grad()
    def after_step(self, batch: Batch, out: dict[str, torch.Tensor]) -> None:
        index, m = batch["index"], self.cfg.nce_m
        for memory, v in ((self.memory_s, out["crd_embed_s"]), (self.memory_t, out["crd_embed_t"])):
            rows = m * memory.to_device(v.device)[index] + (1 - m) * v
            memory.write(index, rows / rows.norm(dim=1, keepdim=True), capacity=self.data.batch_size)
