"""Image transforms from the data config: timm's pipelines, plus the seeds' CIFAR-style pad-crop."""
from __future__ import annotations

from typing import Callable

from timm.data import create_transform
from torchvision import transforms as T

from skd.config import DataConfig


def create_train_transform(cfg: DataConfig) -> Callable:
    """``rrc``: timm's ImageNet training pipeline (RandomResizedCrop, flip, RandAugment, jitter,
    random erasing). ``pad_crop``: RandomCrop(img_size, padding) + flip (+ rotation), the CIFAR
    recipe of CS-KD, PS-KD, TF-KD and RepDistiller, which timm does not provide."""
    if cfg.train_crop == "pad_crop":
        ops: list[Callable] = [T.RandomCrop(cfg.img_size, padding=cfg.crop_padding)]
        if cfg.hflip > 0:
            ops.append(T.RandomHorizontalFlip(cfg.hflip))
        if cfg.rotation > 0:
            ops.append(T.RandomRotation(cfg.rotation))
        return T.Compose([*ops, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    if cfg.rotation > 0:
        raise ValueError("data.rotation is only supported with data.train_crop=pad_crop")
    return create_transform(
        input_size=cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
        hflip=cfg.hflip, color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std), re_prob=cfg.re_prob,
    )


def create_eval_transform(cfg: DataConfig) -> Callable:
    """Resize to img_size / crop_pct, centre-crop img_size, normalise (crop_pct=1: no crop)."""
    return create_transform(
        input_size=cfg.img_size, is_training=False, interpolation=cfg.interpolation,
        mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.crop_pct,
    )
