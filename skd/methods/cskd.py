"""CS-KD, Class-wise Self-KD (Yun et al., CVPR 2020), parity with ``alinlab/cs-kd`` (docs/methods.md §2).

Each batch carries a same-class partner image per anchor (``batch["partner"]``, drawn by the
loader as the official ``PairBatchSampler`` does). The loss is
``CE(z(x), y) + λ·T²·KL(softmax(z(x')/T) ‖ softmax(z(x)/T))`` with the partner detached.

Parity: two separate forward passes in train mode, the anchors with gradients, then the
partners under no_grad. BatchNorm normalises each half with its own statistics and updates its
running statistics twice per step. ``single_forward`` is the common re-implementation instead:
one forward of the 2B images (one BN update with the statistics of both halves).

Mixup/CutMix: refused (the official code has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded
from skd.methods.base import Method, MethodConfig
from skd.methods.registry import register_method


@register_method("cskd")
class CSKD(Method):
    image_keys = ("image", "partner")

    @dataclass
    class Config(MethodConfig):
        name: str = "cskd"
        temperature: float = bounded(4.0, gt=0)
        """T of the class-wise KL (official ``--temp``)."""
        lam: float = bounded(1.0, ge=0)
        """λ, weight of the class-wise KL (official ``--lamda``; the README uses 3 for CUB-200)."""
        single_forward: bool = False
        """Opt-in: one concatenated forward of anchors and partners instead of two passes (the
        partner half still gets no CE and no gradient through its logits, but BN sees both)."""
        exclude_self_pair: bool = False
        """Opt-in: never pair an anchor with itself (the official sampler does, with probability
        1/n_c, which makes that pair's KL a self-consistency term)."""

    @classmethod
    def train_loader_options(cls, cfg: Config) -> dict[str, Any]:
        return {"with_partner": True, "exclude_self_pair": cfg.exclude_self_pair}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images, partners, labels = batch["image"], batch["partner"], batch["label"]
        if self.cfg.single_forward:
            both = self.model(torch.cat([images, partners]))
            logits, partner_logits = both[:images.shape[0]], both[images.shape[0]:].detach()
        else:
            logits = self.model(images)
            with torch.no_grad():  # still train mode: BN uses and records the partner statistics
                partner_logits = self.model(partners)
        loss = losses.cskd_loss(logits, partner_logits, labels, self.cfg.temperature, self.cfg.lam)
        with torch.no_grad():  # the fused loss gives one scalar; split it for logging
            ce = losses.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits, "parts": {"ce": ce, "kl": loss.detach() - ce}}
