"""Image transforms from the data config: timm's pipelines, plus the seeds' CIFAR-style pad-crop
and the AlexNet PCA lighting noise of PS-KD's and pycls's ImageNet recipes."""
from __future__ import annotations

from typing import Callable

import torch
from timm.data import create_transform
from torchvision import transforms as T

from skd.config import DataConfig

# The eigen-decomposition of ImageNet's RGB pixel covariance (pixels in [0, 1]) used by AlexNet's
# lighting noise, as PS-KD (utils/custom_transform.py) and pycls give it: columns are eigenvectors.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


class PCALighting:
    """AlexNet PCA lighting noise on a ``[3, H, W]`` tensor of [0, 1] RGB pixels (after ToTensor,
    before Normalize): every pixel gets ``Σ_j eigvec[:, j]·α_j·eigval_j`` added, with
    ``α ~ N(0, alphastd²)`` drawn once per image from torch's generator. No clamping, as PS-KD's
    ``Lighting`` and pycls's ``lighting``."""

    def __init__(self, alphastd: float) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(IMAGENET_EIGVAL)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.eigvec * (alpha * self.eigval)).sum(1)
        return img + rgb.to(img.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def create_train_transform(cfg: DataConfig) -> Callable:
    """``rrc``: timm's ImageNet training pipeline (RandomResizedCrop, flip, RandAugment, jitter,
    random erasing). ``pad_crop``: RandomCrop(img_size, padding) + flip (+ rotation), the CIFAR
    recipe of CS-KD, PS-KD, TF-KD and RepDistiller, which timm does not provide. Either with
    ``pca_lighting`` > 0 gets ``PCALighting`` right before Normalize."""
    if cfg.train_crop == "pad_crop":
        ops: list[Callable] = [T.RandomCrop(cfg.img_size, padding=cfg.crop_padding)]
        if cfg.hflip > 0:
            ops.append(T.RandomHorizontalFlip(cfg.hflip))
        if cfg.rotation > 0:
            ops.append(T.RandomRotation(cfg.rotation))
        pipeline = T.Compose([*ops, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    else:
        pipeline = create_transform(
            input_size=cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
            hflip=cfg.hflip, color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std),
            re_prob=cfg.re_prob, re_mode=cfg.re_mode,
        )
    if cfg.pca_lighting > 0:
        pipeline = _before_normalize(pipeline, PCALighting(cfg.pca_lighting))
    return pipeline


def _before_normalize(pipeline: T.Compose, op: Callable) -> T.Compose:
    """``pipeline`` with ``op`` inserted right before its Normalize (after ToTensor)."""
    ops = list(pipeline.transforms)
    i = next(i for i, t in enumerate(ops) if isinstance(t, T.Normalize))
    return T.Compose(ops[:i] + [op] + ops[i:])


def create_eval_transform(cfg: DataConfig) -> Callable:
    """Resize to img_size / crop_pct, centre-crop img_size, normalise (crop_pct=1: no crop).
    ``interpolation=random`` (a training augmentation) evaluates with bilinear, as in the DALI
    backend."""
    return create_transform(
        input_size=cfg.img_size, is_training=False,
        interpolation="bilinear" if cfg.interpolation == "random" else cfg.interpolation,
        mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.crop_pct,
    )
