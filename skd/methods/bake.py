"""BAKE, batch knowledge ensembling (Ge et al., 2021), ``yxgeee/BAKE`` (docs/methods.md §14).

``loss = CE(z, y) + λ·T²·KL(Q ‖ softmax(z/T))``, where the soft targets Q of a batch are its own
tempered predictions propagated between samples by the similarity of their pooled features
(``skd.losses.bake_soft_targets``), computed without gradients.

Over the **global** batch, as the official ImageNet code (``TRAIN.GLOBAL_KE``): every rank
all-gathers the features and logits of every rank's batch (padded to the per-rank capacity, so
short batches work), propagates over all of them and keeps its own rows; gradients
flow only through this rank's logits. The targets are the same whatever the number of processes
the global batch is split over.

With ``intra_imgs: 1`` (every official ImageNet config) each anchor comes with one other image of
its class (the loader's partner, never the anchor itself) and both are trained on, CE included,
in one forward pass: ``data.batch_size`` counts the anchors, so a step sees twice as many images.
Mixup/CutMix: refused (the official ImageNet code's CutMix is off in every config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skd import losses
from skd.batch import Batch
from skd.collectives import all_gather_padded, world
from skd.config_checks import bounded, one_of
from skd.features import forward_with_maps
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method


@register_method("bake")
class BAKE(Method):

    @dataclass
    class Config(MethodConfig):
        name: str = "bake"
        lam: float = bounded(1.0, ge=0)
        """λ, weight of the distillation term (official ``TRAIN.LAMBDA`` / ``--lamda``, 1 in every
        official run)."""
        temperature: float = bounded(4.0, gt=0)
        """T of the predictions that are propagated and of the KL (``TRAIN.TEMP`` / ``--temp``)."""
        omega: float = bounded(0.5, ge=0, lt=1)
        """ω, the propagation weight (``TRAIN.OMEGA`` / ``--omega``: 0.5; 0.9 on TinyImageNet,
        Stanford Dogs and MIT67)."""
        intra_imgs: int = one_of(1, (0, 1))
        """Other images of the anchor's class per anchor (``TRAIN.INTRA_IMGS`` / ``-m``): 1 in
        every ImageNet config; 0 trains on plain batches. The official small-scale runs with 3 are
        not supported (the loader draws one partner)."""
        global_batch: bool = True
        """Ensemble over the batches of all processes (``TRAIN.GLOBAL_KE``); false: over each
        process's own batch."""

    def __init__(self, model: torch.nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        self.image_keys = ("image", "partner") if cfg.intra_imgs else ("image",)
        # Rows a rank can contribute to the global batch: anchors and their partners.
        self.capacity = data.batch_size * (1 + cfg.intra_imgs)

    @classmethod
    def train_loader_options(cls, cfg: Config) -> dict[str, Any]:
        return {"with_partner": True, "exclude_self_pair": True} if cfg.intra_imgs else {}

    @classmethod
    def mixup_refusal(cls, cfg: MethodConfig) -> str | None:
        return "skd does not implement BAKE's optional CutMix (off in every official config)"

    def soft_targets(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The targets of this rank's rows, ensembled over the global batch (or the local one)."""
        rank, world_size = world()
        if not (self.cfg.global_batch and world_size > 1):
            return losses.bake_soft_targets(features, logits, self.cfg.temperature, self.cfg.omega)
        # One gather of features and logits side by side, in fp32 (fp64 stays fp64).
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows = torch.cat([features.to(dtype), logits.to(dtype)], dim=1).detach()
        gathered, valid = all_gather_padded(rows, self.capacity)
        dim = features.shape[1]
        targets = losses.bake_soft_targets(gathered[:, :dim], gathered[:, dim:], self.cfg.temperature,
                                           self.cfg.omega, valid)
        start = rank * self.capacity
        return targets[start:start + logits.shape[0]]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, images, labels = self.cfg, batch["image"], batch["label"]
        if cfg.intra_imgs:
            images, labels = torch.cat([images, batch["partner"]]), torch.cat([labels, labels])
        out = forward_with_maps(self.model, images, [], with_embedding=True)
        targets = self.soft_targets(out.embedding, out.logits)
        ce = losses.cross_entropy(out.logits, labels)
        kd = cfg.lam * losses.bake_loss(out.logits, targets, cfg.temperature)
        return {"loss": ce + kd, "logits": out.logits[:batch["label"].shape[0]],
                "parts": {"ce": ce, "kd": kd}}
