"""Zipf's label smoothing (Liang et al., ECCV 2022), ``megvii-research/zipfls`` (docs/methods.md §13).

``loss = CE(z, y) + λ·KL(zipf ‖ softmax(z_¬t))`` (``skd.losses.zipf_ls_loss``): the non-target
classes, ranked by the model's own prediction of the sample, get soft labels ``1/rank^power``
(renormalised over the non-targets), with no second forward pass, partner or memory.

With ``dense`` (every command of the official code) the ranking comes from dense predictions:
the classifier applied at every location of the last feature map (``skd.features.location_logits``:
timm's ``forward_head`` per location or per patch token, so any timm CNN or ViT works), each
location voting for its argmax class, the classes ranked by their votes (ties share their lowest
rank, so every class without a vote shares one rank). ``dense_upsample`` enlarges the map ×2
first, as the official CIFAR and TinyImageNet ResNet runs do. Without ``dense`` the classes are
ranked by the logits. Mixup/CutMix: refused (the official code has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skd import losses
from skd.batch import Batch
from skd.config_checks import bounded, one_of
from skd.errors import ConfigError
from skd.features import is_token_model, location_logits
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import register_method


@register_method("zipf_ls")
class ZipfLS(Method):

    @dataclass
    class Config(MethodConfig):
        name: str = "zipf_ls"
        lam: float = bounded(1.0, ge=0)
        """λ, weight of the Zipf term (official ``--loss_lambda``: 1.0 by default and on
        TinyImageNet, 0.1 in the CIFAR-100 and ImageNet commands)."""
        dense: bool = True
        """Rank the classes by the per-location votes of the last feature map (official ``--dense``,
        set in every official command); false: by the logits."""
        dense_upsample: str = one_of("none", ("none", "bilinear", "bicubic"))
        """Enlarge the last feature map ×2 before the per-location votes (official ``--upsample``:
        ``bilinear`` in the CIFAR-100 and TinyImageNet ResNet-18 commands, none on ImageNet; the
        official DenseNet ignores it)."""
        power: float = bounded(1.0, gt=0)
        """Exponent of the Zipf weights ``1/rank^power`` (official ``--power``)."""

    def __init__(self, model: nn.Module, cfg: Config, data: DataSpec) -> None:
        super().__init__(model, cfg, data)
        if cfg.dense and cfg.dense_upsample != "none" and is_token_model(model):  # no map to enlarge
            raise ConfigError(f"config key 'method.dense_upsample' = {cfg.dense_upsample!r}: "
                              f"{type(model).__name__} gives patch tokens, not a feature map; use none")

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, labels = self.cfg, batch["label"]
        final = self.model.forward_features(batch["image"])
        logits = self.model.forward_head(final)
        votes = (losses.dense_votes(location_logits(self.model, final, cfg.dense_upsample))
                 if cfg.dense else None)
        ce = losses.cross_entropy(logits, labels)
        zipf = cfg.lam * losses.zipf_ls_loss(logits, labels, votes, cfg.power)
        return {"loss": ce + zipf, "logits": logits, "parts": {"ce": ce, "zipf": zipf}}
