"""Logits plus an intermediate feature in one forward pass, for any timm CNN or ViT.

Built on timm's ``forward_intermediates`` (the final features plus the maps at chosen indices)
and ``forward_head`` (pooling and classifier), which timm's CNNs, ViTs and skd's CIFAR nets all
implement; ``forward_head(final)`` equals ``model(x)``.

Index conventions are timm's: for CNNs index 0 is the stem and −1 the last stage; for ViTs index
k is the output of block k.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skd.errors import ConfigError

__all__ = ["is_token_model", "mid_feature_index", "forward_with_pooled_feature",
           "pooled_feature_channels", "forward_with_last_map", "last_map_channels", "location_logits",
           "FeatureTap", "Features", "num_feature_maps", "forward_with_maps", "default_input_size",
           "probe_features"]


def is_token_model(model: nn.Module) -> bool:
    """A ViT-style model (transformer blocks over tokens, optional prefix tokens)."""
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def mid_feature_index(model: nn.Module) -> int:
    """USKD's intermediate feature (docs/methods.md §6.1): the second-to-last stage of a CNN (ResNet
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
        raise ConfigError(f"model.name: expected an NCHW feature map (a CNN) or a ViT's tokens, got a "
                          f"feature of shape {tuple(feature_map.shape)}")
    return feature_map.mean(dim=(2, 3))


@torch.no_grad()
def pooled_feature_channels(model: nn.Module, index: int,
                            input_size: tuple[int, ...] | None = None) -> int:
    """Channels of ``forward_with_pooled_feature``'s feature, by a dry run in eval mode on a
    zero image (no running statistics change, no random numbers drawn)."""
    with _dry_run(model, input_size) as x:
        if is_token_model(model) and _has_cls_token(model):
            inter = model.forward_intermediates(x, indices=[index], return_prefix_tokens=True,
                                                stop_early=True, intermediates_only=True)
            return int(inter[0][1].shape[-1])
        inter = model.forward_intermediates(x, indices=[index], stop_early=True,
                                            intermediates_only=True)
        return int(_gap(inter[0]).shape[-1])


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Within: ``model`` in eval mode; its training flag comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _dry_run(model: nn.Module, input_size: tuple[int, ...] | None) -> Iterator[torch.Tensor]:
    """Within: ``model`` in eval mode and a zero image of ``input_size`` (default: the model's)
    on its device and dtype; the training flag comes back afterwards."""
    with _eval_mode(model):
        param = next(model.parameters())
        yield torch.zeros(1, *(input_size or default_input_size(model)), device=param.device, dtype=param.dtype)


def fixed_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """``(C, H, W)`` a model only accepts (a ViT's patch embed without dynamic image size), else
    None (a CNN takes any resolution)."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    in_chans = getattr(getattr(patch_embed, "proj", None), "in_channels", 3)
    return (in_chans, *tuple(img_size))


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` the model is built for: its fixed input size, else timm's
    ``pretrained_cfg["input_size"]`` (32 px for skd's CIFAR nets), else 224 px."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return fixed_input_size(model) or tuple(cfg.get("input_size", (3, 224, 224)))


def forward_with_last_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, last-stage map [B, C, H, W])`` from one forward: ``forward_features`` then
    ``forward_head`` (ICKD's feature: the output of the last conv stage, docs/methods.md §7)."""
    feature_map = model.forward_features(x)
    if feature_map.dim() != 4:
        raise ConfigError(f"{type(model).__name__}.forward_features gives shape "
                          f"{tuple(feature_map.shape)}, not an NCHW feature map; ICKD needs a CNN "
                          f"(model.name, method.teacher)")
    return model.forward_head(feature_map), feature_map


def last_map_channels(model: nn.Module) -> int:
    """Channels of ``forward_with_last_map``'s map: timm's ``num_features``."""
    channels = getattr(model, "num_features", None)
    if not isinstance(channels, int) or channels <= 0:
        raise ConfigError(f"{type(model).__name__} has no num_features; ICKD needs a timm CNN "
                          f"(model.name, method.teacher)")
    return channels


@torch.no_grad()
def location_logits(model: nn.Module, final: torch.Tensor, upsample: str = "none") -> torch.Tensor:
    """The classifier applied at every location of ``final`` (``model.forward_features``' output):
    ``[B, L, K]``, one row of logits per location of the map (``L = H·W``) or per patch token.

    Each location goes through ``model.forward_head`` alone, as a 1×1 map (NCHW, or NHWC for
    models whose ``output_fmt`` says so, e.g. Swin) or as a sequence of that one token (repeated
    over the prefix-token slots, so token, average and max pooling all return it), so any head
    norm is applied as the model applies it. ``upsample`` (``bilinear`` or ``bicubic``) first
    enlarges a spatial map ×2, as Zipf's LS does for its CIFAR ResNets (``F.upsample``,
    ``align_corners=False``). Computed without gradients and in eval mode (no head dropout)."""
    with _eval_mode(model):
        if final.dim() == 3:  # tokens [B, N, D]: the patch tokens after the prefix (CLS, registers)
            if upsample != "none":
                raise ValueError(f"upsample={upsample!r} needs a spatial feature map; "
                                 f"{type(model).__name__} gives tokens")
            prefix = getattr(model, "num_prefix_tokens", 0)
            tokens = final[:, prefix:]
            B, L, D = tokens.shape
            cells = tokens.reshape(B * L, 1, D).expand(B * L, prefix + 1, D)
        elif final.dim() == 4:
            channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
            nchw = final.permute(0, 3, 1, 2) if channels_last else final
            if upsample != "none":
                nchw = F.interpolate(nchw, scale_factor=2.0, mode=upsample, align_corners=False)
            B, D, H, W = nchw.shape
            L = H * W
            cells = nchw.permute(0, 2, 3, 1).reshape(B * L, D)
            cells = cells[:, None, None, :] if channels_last else cells[:, :, None, None]
        else:
            raise ValueError(f"{type(model).__name__}.forward_features gives shape {tuple(final.shape)}, "
                             f"neither a feature map nor tokens")
        return model.forward_head(cells).reshape(B, L, -1)


# ---- several maps at once, by stage index or by submodule (the feature-distillation methods) ----

FeatureTap = int | str
"""Where a feature map is taken: a ``forward_intermediates`` index (timm's convention above), or
the dotted name of a submodule whose output is taken (a forward hook), for maps that are no
stage output, e.g. the raw ``block3`` sum of a CIFAR WRN (RepDistiller's ``f3``)."""


class Features(NamedTuple):
    """One forward pass of a model: logits ``[B, K]``, the maps at the requested taps (in the
    requested order), and the pre-logits embedding ``[B, D]`` (``forward_head(pre_logits=True)``,
    the pooled vector the classifier reads) when asked for, else None."""

    logits: torch.Tensor
    maps: list[torch.Tensor]
    embedding: torch.Tensor | None


def num_feature_maps(model: nn.Module) -> int:
    """How many maps ``forward_intermediates`` indexes (stem and stages): ``len(feature_info)``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(model).__name__} has no feature_info; feature distillation "
                          f"needs a timm model with forward_intermediates (model.name, method.teacher)")
    return len(info)


def _resolve_taps(model: nn.Module, taps: Sequence[FeatureTap]) -> list[FeatureTap]:
    """Indices made absolute (so −1 and the last index are the same map); names checked."""
    n = num_feature_maps(model)
    resolved: list[FeatureTap] = []
    for tap in taps:
        if isinstance(tap, str):
            try:
                model.get_submodule(tap)
            except AttributeError:
                raise ConfigError(f"feature tap {tap!r} (method.features) is not a submodule of "
                                  f"{type(model).__name__}") from None
            resolved.append(tap)
        elif -n <= tap < n:
            resolved.append(tap % n)
        else:
            raise ConfigError(f"feature index {tap} (method.features) is out of range for "
                              f"{type(model).__name__}, which has {n} feature maps (indices {-n}..{n - 1})")
    return resolved


def forward_with_maps(model: nn.Module, x: torch.Tensor, taps: Sequence[FeatureTap],
                      with_embedding: bool = False) -> Features:
    """Logits, the maps at ``taps`` and optionally the pre-logits embedding, from one forward.

    Integer taps come from ``forward_intermediates``; named taps are the output of that
    submodule (of its last call) during the same pass. Nothing is detached."""
    taps = _resolve_taps(model, taps)
    indices = sorted({t for t in taps if isinstance(t, int)})
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"feature tap {name!r} returns {type(output).__name__}, not a tensor")
            captured[name] = output
        return hook

    handles = [model.get_submodule(name).register_forward_hook(capture(name))
               for name in {t for t in taps if isinstance(t, str)}]
    try:
        if indices:  # timm rejects an empty index list
            final, inter = model.forward_intermediates(x, indices=indices)
        else:
            final, inter = model.forward_features(x), []
    finally:
        for handle in handles:
            handle.remove()
    by_index = dict(zip(indices, inter))
    maps = [captured[t] if isinstance(t, str) else by_index[t] for t in taps]
    embedding = model.forward_head(final, pre_logits=True) if with_embedding else None
    return Features(model.forward_head(final), maps, embedding)


@torch.no_grad()
def probe_features(model: nn.Module, taps: Sequence[FeatureTap], with_embedding: bool = False,
                   input_size: tuple[int, ...] | None = None) -> Features:
    """``forward_with_maps`` on one zero image in eval mode (no running statistics change, no
    random numbers drawn), to size the modules that connect student and teacher maps."""
    with _dry_run(model, input_size) as x:
        return forward_with_maps(model, x, taps, with_embedding)
