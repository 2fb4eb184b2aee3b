"""Logits plus an intermediate feature in one forward pass, for any timm CNN or ViT.

Built on timm's ``forward_intermediates`` (the final features plus the maps at chosen indices)
and ``forward_head`` (pooling and classifier), which timm's CNNs, ViTs and skd's CIFAR nets all
implement; ``forward_head(final)`` equals ``model(x)``.

Index conventions are timm's: for CNNs index 0 is the stem and −1 the last stage; for ViTs index
k is the output of block k.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_token_model", "mid_feature_index", "forward_with_pooled_feature",
           "pooled_feature_channels", "forward_with_last_map", "last_map_channels"]


def is_token_model(model: nn.Module) -> bool:
    """A ViT-style model (transformer blocks over tokens, optional prefix tokens)."""
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def mid_feature_index(model: nn.Module) -> int:
    """USKD's intermediate feature (METHODS §6.1): the second-to-last stage of a CNN (ResNet
    layer3), or block ``int(0.5·L) − 1`` of a ViT (the official patched DeiT's ``mid_token``)."""
    if is_token_model(model):
        return max(int(0.5 * len(model.blocks)) - 1, 0)
    return -2


def _has_cls_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def forward_with_pooled_feature(model: nn.Module, x: torch.Tensor,
                                index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, K], feature [B, C])`` from one forward. The feature is the global average
    pool of the map at ``index`` (CNN), or the CLS token after block ``index`` without the final
    norm (ViT; the mean of the patch tokens when the model has no CLS token). Not detached."""
    if is_token_model(model) and _has_cls_token(model):
        final, inter = model.forward_intermediates(x, indices=[index], return_prefix_tokens=True)
        _, prefix = inter[0]
        feature = prefix[:, 0]
    else:
        final, inter = model.forward_intermediates(x, indices=[index])
        feature = _gap(inter[0])
    return model.forward_head(final), feature


def _gap(feature_map: torch.Tensor) -> torch.Tensor:
    if feature_map.dim() != 4:
        raise ValueError(f"expected an NCHW feature map, got shape {tuple(feature_map.shape)}")
    return feature_map.mean(dim=(2, 3))


@torch.no_grad()
def pooled_feature_channels(model: nn.Module, index: int,
                            input_size: tuple[int, ...] | None = None) -> int:
    """Channels of ``forward_with_pooled_feature``'s feature, by a dry run in eval mode on a
    zero image (no running statistics change, no random numbers drawn)."""
    if input_size is None:
        input_size = _input_size(model)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        if is_token_model(model) and _has_cls_token(model):
            inter = model.forward_intermediates(x, indices=[index], return_prefix_tokens=True,
                                                stop_early=True, intermediates_only=True)
            return int(inter[0][1].shape[-1])
        inter = model.forward_intermediates(x, indices=[index], stop_early=True,
                                            intermediates_only=True)
        return int(_gap(inter[0]).shape[-1])
    finally:
        model.train(was_training)


def _input_size(model: nn.Module) -> tuple[int, ...]:
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        in_chans = getattr(getattr(patch_embed, "proj", None), "in_channels", 3)
        return (in_chans, *tuple(img_size))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def forward_with_last_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, last-stage map [B, C, H, W])`` from one forward: ``forward_features`` then
    ``forward_head`` (ICKD's feature: the output of the last conv stage, METHODS §7)."""
    feature_map = model.forward_features(x)
    if feature_map.dim() != 4:
        raise ValueError(f"{type(model).__name__}.forward_features gives shape "
                         f"{tuple(feature_map.shape)}, not an NCHW feature map; ICKD needs a CNN")
    return model.forward_head(feature_map), feature_map


def last_map_channels(model: nn.Module) -> int:
    """Channels of ``forward_with_last_map``'s map: timm's ``num_features``."""
    channels = getattr(model, "num_features", None)
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"{type(model).__name__} has no num_features; ICKD needs a timm CNN")
    return channels
