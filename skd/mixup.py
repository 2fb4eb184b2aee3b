"""Mixup and CutMix on the device batch (timm's ``Mixup`` in its ``batch`` mode), and how a method
reads the soft targets of a mixed batch.

One λ per batch; sample i is mixed with sample B−1−i (its *partner*): Mixup blends the two images
with weights λ and 1 − λ, CutMix pastes a box of the partner into the image and sets λ to the
share of the image left (``correct_lam``). The draws (mix or not, Mixup or CutMix, λ, the box) are
timm's, made on the host from a NumPy generator seeded by (seed, epoch, rank, batch number), so
a resumed run mixes exactly as the uninterrupted one; nothing waits for the device. The images
are mixed in place on the device, and the batch gains:

- ``target`` ``[B, C]`` fp32: timm's ``mixup_target``, ``λ·smooth(onehot(y_i)) + (1 − λ)·
  smooth(onehot(y_j))`` with ``smooth(q) = (1 − ε)·q + ε/C``, ε = ``mixup.label_smoothing``;
- ``mix_lam`` (λ), ``mix_smoothing`` (ε): 0-dim fp32 tensors on the device;
- ``mix_partner`` ``[B]`` int64: the row j each row is mixed with.

Methods build their losses from these (``mixed_target_args``, ``batch_cross_entropy``,
``mixed_onehot``); which methods accept mixed batches is ``Method.supports_mixup``.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target

from skd import losses
from skd.batch import Batch

if TYPE_CHECKING:  # skd.config imports the methods, which import this module
    from skd.config import MixupConfig

__all__ = ["BatchMixer", "create_mixer", "mixed_target_args", "batch_cross_entropy", "mixed_onehot"]

# Appended to (seed, epoch, rank, batch) so the mixing draws are independent of the loader's
# augmentation and shuffling streams, which are seeded from the same numbers.
_MIX_STREAM = 0x6D6978  # "mix"

Box = tuple[int, int, int, int]


@contextlib.contextmanager
def _numpy_seeded(*parts: int) -> Iterator[None]:
    """timm's Mixup draws from NumPy's global generator: seed it from ``parts`` for the block and
    give the caller its own state back afterwards."""
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence([int(p) % (1 << 64) for p in parts]).generate_state(8))
    try:
        yield
    finally:
        np.random.set_state(saved)


class BatchMixer:
    """Mixup/CutMix of device batches, one λ per batch (timm ``Mixup(mode="batch")``)."""

    def __init__(self, cfg: MixupConfig, num_classes: int, seed: int, rank: int) -> None:
        self.num_classes, self.seed, self.rank = num_classes, seed, rank
        self.smoothing = cfg.label_smoothing
        self.timm_mixup = Mixup(
            mixup_alpha=cfg.alpha, cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
            prob=cfg.prob, switch_prob=cfg.switch_prob, mode="batch", correct_lam=cfg.correct_lam,
            label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    def draw(self, epoch: int, batch: int, image_shape: torch.Size) -> tuple[float, Box | None]:
        """λ and the CutMix box ``(top, bottom, left, right)`` (None: Mixup, or no mixing when
        λ = 1) of batch number ``batch`` of ``epoch``, in the order timm's batch mode draws them."""
        with _numpy_seeded(self.seed, epoch, self.rank, batch, _MIX_STREAM):
            lam, use_cutmix = self.timm_mixup._params_per_batch()
            if lam == 1.0 or not use_cutmix:
                return float(lam), None
            box, lam = cutmix_bbox_and_lam(image_shape, lam, ratio_minmax=self.timm_mixup.cutmix_minmax,
                                           correct_lam=self.timm_mixup.correct_lam)
        return float(lam), tuple(int(b) for b in box)

    def __call__(self, batch: Batch, epoch: int,
                 batch_number: int) -> Batch:
        """Mix ``batch["image"]`` in place and return the batch with the target entries added."""
        images, labels = batch["image"], batch["label"]
        lam, box = self.draw(epoch, batch_number, images.shape)
        if box is not None:
            top, bottom, left, right = box
            # Slice first, then flip the batch dimension: only the box is copied.
            images[:, :, top:bottom, left:right] = images[:, :, top:bottom, left:right].flip(0)
        elif lam != 1.0:
            partner_images = images.flip(0).mul_(1.0 - lam)
            images.mul_(lam).add_(partner_images)
        device = labels.device
        return {
            **batch,
            "target": mixup_target(labels, self.num_classes, lam, self.smoothing),
            "mix_lam": torch.full((), lam, dtype=torch.float32, device=device),
            "mix_smoothing": torch.full((), self.smoothing, dtype=torch.float32, device=device),
            "mix_partner": torch.arange(labels.shape[0] - 1, -1, -1, device=device),
        }


def create_mixer(cfg: MixupConfig, num_classes: int, seed: int, rank: int) -> BatchMixer | None:
    """The mixer of a run, or None when neither Mixup nor CutMix is on."""
    return BatchMixer(cfg, num_classes, seed, rank) if cfg.enabled else None


def mixed_target_args(batch: Batch) -> dict[str, torch.Tensor]:
    """``lam``, ``partner`` and ``smoothing`` of a mixed batch: the keyword arguments with which
    ``skd_kernels.pskd_loss`` and ``mixup_cross_entropy`` build its target in the kernel
    (without reading ``target``); empty for a batch that was not mixed."""
    if "mix_lam" not in batch:
        return {}
    return {"lam": batch["mix_lam"], "partner": batch["mix_partner"],
            "smoothing": batch["mix_smoothing"]}


def batch_cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The head loss of the methods that accept mixed batches: cross-entropy against the label,
    or against the soft target of a mixed batch (the DeiT/Swin recipe: label smoothing inside the
    mixed target), through the fused kernel."""
    mixing = mixed_target_args(batch)
    if not mixing:
        return losses.cross_entropy(logits, batch["label"])
    return losses.mixup_cross_entropy(logits, batch["label"], **mixing)


def mixed_onehot(batch: Batch, num_classes: int) -> torch.Tensor:
    """``λ·onehot(y_i) + (1 − λ)·onehot(y_j)`` ``[B, C]`` fp32, the mixed labels *without* label
    smoothing: what mmcls's batch augments hand to the distillation losses of cls_KD, which
    smooth only inside the head loss."""
    onehot = F.one_hot(batch["label"], num_classes).float()
    lam = batch["mix_lam"]
    return lam * onehot + (1 - lam) * onehot[batch["mix_partner"]]
