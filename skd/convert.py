"""Checkpoints of other frameworks → timm parameter names, and the ``skd convert`` command.

mmcls (OpenMMLab's mmclassification, now mmpretrain) checkpoints hold ``{"meta": ...,
"state_dict": ...}`` with the backbone under ``backbone.`` and the classifier under ``head.``;
NKD's official teachers and the DeiT III weights used by cls_KD are such files. These mmcls
backbones map onto a timm model parameter for parameter (same layers in the same order, same
shapes), so the converted weights compute the same logits:

- ``ResNet`` (V1b) → ``resnet18`` … ``resnet152``; ``ResNetV1c`` / ``ResNetV1d`` (deep stem,
  ``stem.{0,1,2}.conv|bn``) → ``resnet50c`` / ``resnet50d`` …: ``backbone.*`` keeps its names
  except the deep stem (→ ``conv1.{0,1,3,4,6}``, ``bn1``).
- cls_KD's ``MobileNetV1`` (``model.0`` stem, ``model.1..11`` and ``s4.0..1`` blocks) →
  ``mobilenetv1_100`` built with ``act_layer="relu"``: cls_KD uses ReLU where timm defaults to
  ReLU6 (``method.teacher_kwargs: {act_layer: relu}``).
- ``MobileNetV2`` (``conv1``, ``layer1..7``, ``conv2``) → ``mobilenetv2_100``, ``mobilenetv2_050`` …
- ``VisionTransformer`` (ViT, DeiT), ``DeiT3``, ``DistilledVisionTransformer``
  (``layers.N.ln1|attn|ln2|ffn``, final ``ln1``) → ``vit_*``, ``deit_*``, ``deit3_*``,
  ``deit_*_distilled_*``.

The classifier ``head.fc`` (``LinearClsHead``) or ``head.layers.head`` (ViT heads; DeiT's
``head_dist`` too) becomes the timm model's classifier. Conversion is strict: a key without a
rule, a timm parameter without a source, or a shape that differs is an error naming the key and
the file.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from skd.errors import CheckpointError, ConfigError, run_command

__all__ = ["CHECKPOINT_FORMATS", "ConversionError", "mmcls_to_timm", "mmcls_num_classes", "main"]

CHECKPOINT_FORMATS = ("timm", "mmcls")
"""Layouts a teacher checkpoint may have: timm names (skd's own files, the seeds' CIFAR nets) or
mmcls names, converted while loading."""


class ConversionError(CheckpointError):
    """A checkpoint does not convert onto the timm model; the message names the key and file."""


Renamer = Callable[[str], str | None]
"""An mmcls key → its timm name, or None when no rule covers it."""

_CLASSIFIER_KEYS = ("head.fc.weight", "head.layers.head.weight")
_TENSOR = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _rules(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(p), r) for p, r in pairs]


def _apply(rules: list[tuple[re.Pattern, str]], key: str) -> str | None:
    for pattern, replacement in rules:
        m = pattern.fullmatch(key)
        if m:
            return m.expand(replacement)
    return None


# ------------------------------------------------------------------------------ ResNet family
_RESNET = _rules(
    # ResNetV1c/V1d deep stem: three ConvModules; timm's conv1 Sequential is conv,bn,act ×2 + conv.
    (rf"backbone\.stem\.0\.conv\.{_TENSOR}", r"conv1.0.\1"),
    (rf"backbone\.stem\.0\.bn\.{_TENSOR}", r"conv1.1.\1"),
    (rf"backbone\.stem\.1\.conv\.{_TENSOR}", r"conv1.3.\1"),
    (rf"backbone\.stem\.1\.bn\.{_TENSOR}", r"conv1.4.\1"),
    (rf"backbone\.stem\.2\.conv\.{_TENSOR}", r"conv1.6.\1"),
    (rf"backbone\.stem\.2\.bn\.{_TENSOR}", r"bn1.\1"),
    (rf"backbone\.(conv1|bn1)\.{_TENSOR}", r"\1.\2"),
    (rf"backbone\.(layer\d+\.\d+\.(?:conv|bn)\d)\.{_TENSOR}", r"\1.\2"),
    (r"head\.fc\.(weight|bias)", r"fc.\1"),
)
_RESNET_DOWNSAMPLE = re.compile(rf"backbone\.(layer\d+\.\d+)\.downsample\.(\d)\.{_TENSOR}")


def _resnet(state: Mapping[str, torch.Tensor], target: list[str]) -> Renamer:
    target_keys = set(target)

    def rename(key: str) -> str | None:
        m = _RESNET_DOWNSAMPLE.fullmatch(key)
        if m is None:
            return _apply(_RESNET, key)
        # A shortcut is [conv, bn], or [pool, conv, bn] with avg_down; timm's avg-down models put
        # an Identity in front even where there is no pool (stride 1), mmcls does not.
        block, index, tensor = m.groups()
        source_pool = f"backbone.{block}.downsample.2.weight" in state
        target_pool = f"{block}.downsample.2.weight" in target_keys
        return f"{block}.downsample.{int(index) - source_pool + target_pool}.{tensor}"
    return rename


# --------------------------------------------------------------------------- MobileNet family
_MOBILENET_V2 = _rules(
    (rf"backbone\.conv1\.conv\.{_TENSOR}", r"conv_stem.\1"),
    (rf"backbone\.conv1\.bn\.{_TENSOR}", r"bn1.\1"),
    (rf"backbone\.conv2\.conv\.{_TENSOR}", r"conv_head.\1"),
    (rf"backbone\.conv2\.bn\.{_TENSOR}", r"bn2.\1"),
    (r"head\.fc\.(weight|bias)", r"classifier.\1"),
)
_MOBILENET_V2_BLOCK = re.compile(rf"backbone\.layer(\d+)\.(\d+)\.conv\.(\d)\.(conv|bn)\.{_TENSOR}")
# An InvertedResidual's ConvModules → timm's names: with expansion (3 modules) pw, dw, pw-linear
# (timm InvertedResidual); without (expand_ratio 1, 2 modules) dw, pw (DepthwiseSeparableConv).
_V2_EXPANDED = {("0", "conv"): "conv_pw", ("0", "bn"): "bn1", ("1", "conv"): "conv_dw",
                ("1", "bn"): "bn2", ("2", "conv"): "conv_pwl", ("2", "bn"): "bn3"}
_V2_DEPTHWISE = {("0", "conv"): "conv_dw", ("0", "bn"): "bn1", ("1", "conv"): "conv_pw",
                 ("1", "bn"): "bn2"}


def _mobilenet_v2(state: Mapping[str, torch.Tensor], target: list[str]) -> Renamer:
    def rename(key: str) -> str | None:
        m = _MOBILENET_V2_BLOCK.fullmatch(key)
        if m is None:
            return _apply(_MOBILENET_V2, key)
        layer, index, module, kind, tensor = m.groups()
        expanded = f"backbone.layer{layer}.{index}.conv.2.conv.weight" in state
        name = (_V2_EXPANDED if expanded else _V2_DEPTHWISE).get((module, kind))
        return None if name is None else f"blocks.{int(layer) - 1}.{index}.{name}.{tensor}"
    return rename


_MOBILENET_V1 = _rules(
    (r"backbone\.model\.0\.0\.weight", r"conv_stem.weight"),
    (rf"backbone\.model\.0\.1\.{_TENSOR}", r"bn1.\1"),
    (r"head\.fc\.(weight|bias)", r"classifier.\1"),
)
_MOBILENET_V1_BLOCK = re.compile(rf"backbone\.(model|s4)\.(\d+)\.(\d)\.{_TENSOR}")
# cls_KD's conv_dw Sequential: 0 conv3x3 dw, 1 BN, 2 ReLU, 3 conv1x1, 4 BN, 5 ReLU.
_V1_MODULES = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}


def _mobilenet_v1(state: Mapping[str, torch.Tensor], target: list[str]) -> Renamer:
    # cls_KD numbers its depthwise-separable blocks model.1..11 then s4.0..1; timm groups the same
    # sequence into stages blocks.S.I: match them by position.
    in_model = sum(1 for k in state if re.fullmatch(r"backbone\.model\.\d+\.0\.weight", k)) - 1
    found = {m.group(0): (int(m.group(1)), int(m.group(2)))
             for m in (re.match(r"blocks\.(\d+)\.(\d+)", k) for k in target) if m}
    blocks = sorted(found, key=found.__getitem__)

    def rename(key: str) -> str | None:
        m = _MOBILENET_V1_BLOCK.fullmatch(key)
        if m is None or (m.group(1) == "model" and m.group(2) == "0"):
            return _apply(_MOBILENET_V1, key)
        part, index, module, tensor = m.groups()
        position = int(index) - 1 if part == "model" else in_model + int(index)
        if module not in _V1_MODULES or not 0 <= position < len(blocks):
            return None
        return f"{blocks[position]}.{_V1_MODULES[module]}.{tensor}"
    return rename


# ----------------------------------------------------------------------- Vision transformers
_VIT = _rules(
    (r"backbone\.(cls_token|dist_token|pos_embed)", r"\1"),
    (r"backbone\.patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"backbone\.layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"backbone\.layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"backbone\.layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"backbone\.layers\.(\d+)\.attn\.gamma1\.weight", r"blocks.\1.ls1.gamma"),  # DeiT III
    (r"backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"backbone\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"backbone\.layers\.(\d+)\.ffn\.gamma2\.weight", r"blocks.\1.ls2.gamma"),  # DeiT III
    (r"backbone\.ln1\.(weight|bias)", r"norm.\1"),  # the final norm (final_norm=True)
    (r"head\.layers\.(head|head_dist)\.(weight|bias)", r"\1.\2"),
)


def _vit(state: Mapping[str, torch.Tensor], target: list[str]) -> Renamer:
    return lambda key: _apply(_VIT, key)


# ------------------------------------------------------------------------------- the mapping
@dataclass(frozen=True)
class _Family:
    name: str
    signature: str
    """A key only checkpoints of this mmcls backbone hold (regex, full match)."""
    timm_class: str
    """The timm model class (module.Class) the family converts onto."""
    renamer: Callable[[Mapping[str, torch.Tensor], list[str]], Renamer]
    """``(mmcls state, timm keys) → rename``."""


_FAMILIES = (
    _Family("ViT/DeiT/DeiT III", r"backbone\.layers\.0\.ln1\.weight",
            "timm.models.vision_transformer.VisionTransformer", _vit),
    _Family("MobileNetV1 (cls_KD)", r"backbone\.model\.0\.0\.weight",
            "timm.models.efficientnet.EfficientNet", _mobilenet_v1),
    _Family("MobileNetV2", r"backbone\.layer1\.0\.conv\.0\.conv\.weight",
            "timm.models.efficientnet.EfficientNet", _mobilenet_v2),
    _Family("ResNet", r"backbone\.layer1\.0\.conv1\.weight",
            "timm.models.resnet.ResNet", _resnet),
)


def _family(state: Mapping[str, torch.Tensor], source: str) -> _Family:
    for family in _FAMILIES:
        if any(re.fullmatch(family.signature, k) for k in state):
            return family
    sample = ", ".join(repr(k) for k in list(state)[:3])
    raise ConversionError(f"{source}: not an mmcls checkpoint of a supported backbone (ResNet, "
                          f"ResNetV1c/V1d, MobileNetV1, MobileNetV2, ViT/DeiT/DeiT III); "
                          f"first keys: {sample}")


def _is_instance(model: nn.Module, qualified: str) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == qualified for c in type(model).__mro__)


def mmcls_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module, *,
                  source: str = "state_dict") -> dict[str, torch.Tensor]:
    """``state`` (an mmcls ``state_dict``: ``backbone.*``, ``head.*``) renamed to the parameter
    names of the timm ``model``, in the model's order, ready for ``load_state_dict(strict=True)``.

    Raises ``ConversionError`` naming ``source`` (the file) and the key when a key has no timm
    name, a timm parameter has no source, or a shape differs. ``model`` is only read.
    """
    family = _family(state, source)
    model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    if not _is_instance(model, family.timm_class):
        raise ConversionError(f"{source}: an mmcls {family.name} checkpoint does not convert onto timm "
                              f"model {model_name!r} ({type(model).__name__}); choose a "
                              f"{family.timm_class.rsplit('.', 1)[1]} model")
    expected = model.state_dict()
    target = list(expected)
    rename = family.renamer(state, target)
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = rename(key)
        if name is None:
            raise ConversionError(f"{source}: mmcls key {key!r} has no timm name in the {family.name} "
                                  f"mapping (unknown key)")
        if name not in expected:
            raise ConversionError(f"{source}: mmcls key {key!r} maps to {name!r}, which timm model "
                                  f"{model_name!r} does not have (unknown key)")
        if name in renamed:
            raise ConversionError(f"{source}: mmcls keys {renamed[name][0]!r} and {key!r} both map to "
                                  f"{name!r}")
        renamed[name] = (key, tensor)
    missing = [k for k in target if k not in renamed]
    if missing:
        raise ConversionError(f"{source}: timm model {model_name!r} needs {missing[0]!r}, which no key of "
                              f"the checkpoint provides ({len(missing)} missing)")
    for name in target:
        key, tensor = renamed[name]
        if tensor.shape != expected[name].shape:
            raise ConversionError(f"{source}: mmcls key {key!r} has shape {list(tensor.shape)}, timm model "
                                  f"{model_name!r} expects {list(expected[name].shape)} for {name!r}")
    return {name: renamed[name][1] for name in target}


def mmcls_num_classes(state: Mapping[str, torch.Tensor], source: str = "state_dict") -> int:
    """The number of classes of an mmcls checkpoint's classifier."""
    for key in _CLASSIFIER_KEYS:
        if key in state:
            return int(state[key].shape[0])
    raise ConversionError(f"{source}: no classifier weight ({' or '.join(_CLASSIFIER_KEYS)}) in the "
                          "checkpoint")


# ------------------------------------------------------------------------------ the command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skd convert", description="Convert a checkpoint of another "
                                "framework to a timm-named safetensors file.")
    sub = p.add_subparsers(dest="framework", required=True, metavar="FRAMEWORK")
    mm = sub.add_parser("mmcls", help="mmcls / mmpretrain checkpoint (backbone.*, head.*)",
                        description="mmcls / mmpretrain checkpoint → timm safetensors "
                        "(ResNet, ResNetV1c/V1d, cls_KD MobileNetV1, MobileNetV2, ViT/DeiT/DeiT III).")
    mm.add_argument("in_file", metavar="IN_FILE", help="mmcls checkpoint (.pth; read with weights_only)")
    mm.add_argument("out_file", metavar="OUT.safetensors", help="where the timm weights are written")
    mm.add_argument("--model", required=True, metavar="TIMM_NAME",
                    help="the timm model the weights are for, e.g. resnet50, deit3_small_patch16_224")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        import timm
        from safetensors.torch import save_file

        from skd.weights import load_state_dict_file
        out = Path(args.out_file)
        if out.suffix != ".safetensors":
            raise ConfigError(f"output {out} must end with .safetensors")
        if not timm.is_model(args.model):
            raise ConfigError(f"--model {args.model!r} is not a timm model (see timm.list_models())")
        state = load_state_dict_file(args.in_file, "mmcls checkpoint")
        num_classes = mmcls_num_classes(state, args.in_file)
        model = timm.create_model(args.model, pretrained=False, num_classes=num_classes)
        converted = mmcls_to_timm(state, model, source=args.in_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in converted.items()}, str(out),
                  metadata={"format": "pt", "architecture": args.model, "converted_from": "mmcls"})
        print(f"{args.in_file}: {len(converted)} tensors -> timm {args.model} ({num_classes} classes): {out}")
        return 0

    return run_command("skd convert", run)


if __name__ == "__main__":
    sys.exit(main())
