"""``skd convert mmcls`` and ``method.teacher_format: mmcls``: mmcls / mmpretrain checkpoints load
into timm models with equal logits.

Each case builds a state dict in mmcls layout from a timm model's own weights with an inverse
mapping written here, anchored to real mmcls key names (with their shapes) read from the mmcls /
mmpretrain / cls_KD sources, converts it back, and compares weights and logits.
"""
from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

from skd.cli import main as skd_main
from skd.config import ConfigError, load_config
from skd.convert import ConversionError, mmcls_to_timm
from skd.methods import get_method_config_class
from skd.methods.teacher import create_teacher
from skd.teacher import load_teacher

NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------- timm → mmcls (the test's side)
def _resnet_to_mmcls(key: str) -> str:
    if key.startswith("fc."):
        return "head." + key
    stem = {"conv1.0": "stem.0.conv", "conv1.1": "stem.0.bn", "conv1.3": "stem.1.conv",
            "conv1.4": "stem.1.bn", "conv1.6": "stem.2.conv"}
    module, _, tensor = key.rpartition(".")
    if module in stem:
        return f"backbone.{stem[module]}.{tensor}"
    return "backbone." + key


def _resnet_v1d_to_mmcls(key: str) -> str:
    if key.startswith("bn1."):  # the stem's third BN is timm's bn1
        return "backbone.stem.2.bn." + key[4:]
    if key.startswith("layer1.0.downsample."):  # stride 1: mmcls has no pool, timm an Identity
        _, index, tensor = key.rsplit(".", 2)
        return f"backbone.layer1.0.downsample.{int(index) - 1}.{tensor}"
    return _resnet_to_mmcls(key)


def _mobilenet_v2_to_mmcls(key: str) -> str:
    fixed = {"conv_stem": "conv1.conv", "bn1": "conv1.bn", "conv_head": "conv2.conv", "bn2": "conv2.bn"}
    module, _, tensor = key.rpartition(".")
    if module == "classifier":
        return f"head.fc.{tensor}"
    if module in fixed:
        return f"backbone.{fixed[module]}.{tensor}"
    _, stage, index, part = module.split(".")
    first_stage = stage == "0"  # expand_ratio 1: [dw, pw-linear]; else [pw, dw, pw-linear]
    order = {"conv_dw": ("0", "conv"), "bn1": ("0", "bn"), "conv_pw": ("1", "conv"), "bn2": ("1", "bn")} \
        if first_stage else {"conv_pw": ("0", "conv"), "bn1": ("0", "bn"), "conv_dw": ("1", "conv"),
                             "bn2": ("1", "bn"), "conv_pwl": ("2", "conv"), "bn3": ("2", "bn")}
    sub, kind = order[part]
    return f"backbone.layer{int(stage) + 1}.{index}.conv.{sub}.{kind}.{tensor}"


def _mobilenet_v1_to_mmcls(key: str, blocks: list[str]) -> str:
    module, _, tensor = key.rpartition(".")
    if module == "classifier":
        return f"head.fc.{tensor}"
    if module == "conv_stem":
        return f"backbone.model.0.0.{tensor}"
    if module == "bn1":
        return f"backbone.model.0.1.{tensor}"
    block, part = module.rsplit(".", 1)
    n = blocks.index(block)  # 13 blocks: model.1..11, then s4.0..1
    where = f"model.{n + 1}" if n < 11 else f"s4.{n - 11}"
    return f"backbone.{where}.{dict(conv_dw=0, bn1=1, conv_pw=3, bn2=4)[part]}.{tensor}"


def _vit_to_mmcls(key: str) -> str:
    if key in ("cls_token", "dist_token", "pos_embed"):
        return "backbone." + key
    if key.startswith(("head.", "head_dist.")):
        return "head.layers." + key
    if key.startswith("norm."):
        return "backbone.ln1." + key[5:]
    if key.startswith("patch_embed.proj."):
        return "backbone.patch_embed.projection." + key[17:]
    _, n, rest = key.split(".", 2)
    rest = {"norm1.weight": "ln1.weight", "norm1.bias": "ln1.bias", "norm2.weight": "ln2.weight",
            "norm2.bias": "ln2.bias", "ls1.gamma": "attn.gamma1.weight", "ls2.gamma": "ffn.gamma2.weight",
            "mlp.fc1.weight": "ffn.layers.0.0.weight", "mlp.fc1.bias": "ffn.layers.0.0.bias",
            "mlp.fc2.weight": "ffn.layers.1.weight", "mlp.fc2.bias": "ffn.layers.1.bias"}.get(rest, rest)
    return f"backbone.layers.{n}.{rest}"


# Real mmcls key names and shapes (ResNet/ResNetV1d, MobileNetV2, ViT/DeiT/DeiT3 from
# open-mmlab/mmpretrain; MobileNetV1 from yzd-v/cls_KD mmcls/models/backbones/mobilenet_v1.py).
C = NUM_CLASSES
CASES = {
    "resnet18": (dict(), _resnet_to_mmcls, 122, {
        "backbone.conv1.weight": (64, 3, 7, 7), "backbone.bn1.running_mean": (64,),
        "backbone.layer1.0.conv1.weight": (64, 64, 3, 3), "backbone.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "backbone.layer2.0.downsample.1.running_var": (128,), "backbone.layer4.1.bn2.num_batches_tracked": (),
        "head.fc.weight": (C, 512), "head.fc.bias": (C,)}),
    # ResNetV1d (deep stem, avg-pool shortcuts, bottlenecks), narrowed: 1 block a stage, width/8
    "resnet50d": (dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)), _resnet_v1d_to_mmcls, 116, {
        "backbone.stem.0.conv.weight": (32, 3, 3, 3), "backbone.stem.0.bn.weight": (32,),
        "backbone.stem.2.conv.weight": (64, 32, 3, 3), "backbone.stem.2.bn.running_var": (64,),
        "backbone.layer1.0.conv3.weight": (32, 8, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (32, 64, 1, 1), "backbone.layer1.0.downsample.1.bias": (32,),
        "backbone.layer2.0.downsample.1.weight": (64, 32, 1, 1), "backbone.layer2.0.downsample.2.bias": (64,),
        "head.fc.weight": (C, 256)}),
    "mobilenetv2_050": (dict(), _mobilenet_v2_to_mmcls, 314, {
        "backbone.conv1.conv.weight": (16, 3, 3, 3), "backbone.conv1.bn.weight": (16,),
        "backbone.layer1.0.conv.0.conv.weight": (16, 1, 3, 3), "backbone.layer1.0.conv.1.conv.weight": (8, 16, 1, 1),
        "backbone.layer2.0.conv.0.conv.weight": (48, 8, 1, 1), "backbone.layer2.0.conv.1.conv.weight": (48, 1, 3, 3),
        "backbone.layer7.0.conv.2.bn.running_mean": (160,), "backbone.conv2.conv.weight": (1280, 160, 1, 1),
        "backbone.conv2.bn.num_batches_tracked": (), "head.fc.weight": (C, 1280)}),
    "mobilenetv1_100": (dict(act_layer="relu"), _mobilenet_v1_to_mmcls, 164, {
        "backbone.model.0.0.weight": (32, 3, 3, 3), "backbone.model.0.1.running_var": (32,),
        "backbone.model.1.0.weight": (32, 1, 3, 3), "backbone.model.1.3.weight": (64, 32, 1, 1),
        "backbone.model.11.4.weight": (512,), "backbone.s4.0.0.weight": (512, 1, 3, 3),
        "backbone.s4.1.3.weight": (1024, 1024, 1, 1), "head.fc.weight": (C, 1024)}),
    "deit_tiny_patch16_224": (dict(img_size=32, depth=2), _vit_to_mmcls, 32, {
        "backbone.cls_token": (1, 1, 192), "backbone.pos_embed": (1, 5, 192),
        "backbone.patch_embed.projection.weight": (192, 3, 16, 16), "backbone.layers.0.ln1.weight": (192,),
        "backbone.layers.0.attn.qkv.weight": (576, 192), "backbone.layers.1.attn.proj.bias": (192,),
        "backbone.layers.1.ffn.layers.0.0.weight": (768, 192), "backbone.layers.1.ffn.layers.1.weight": (192, 768),
        "backbone.ln1.bias": (192,), "head.layers.head.weight": (C, 192)}),
    "deit3_small_patch16_224": (dict(img_size=32, depth=2), _vit_to_mmcls, 36, {
        "backbone.pos_embed": (1, 4, 384),  # DeiT III: no position for the class token
        "backbone.layers.0.attn.gamma1.weight": (384,), "backbone.layers.1.ffn.gamma2.weight": (384,),
        "head.layers.head.weight": (C, 384)}),
    "deit_tiny_distilled_patch16_224": (dict(img_size=32, depth=2), _vit_to_mmcls, 35, {
        "backbone.dist_token": (1, 1, 192), "backbone.pos_embed": (1, 6, 192),
        "head.layers.head.weight": (C, 192), "head.layers.head_dist.bias": (C,)}),
}


def _randomize_buffers(model: nn.Module) -> None:
    """Random BN statistics, so a BN mapped onto the wrong one changes the logits."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)


def _timm_model(name: str, kwargs: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    _randomize_buffers(model)
    return model


def _mmcls_state(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    kwargs, to_mmcls, count, known = CASES[name]
    state = model.state_dict()
    if to_mmcls is _mobilenet_v1_to_mmcls:
        blocks = sorted({m.group(0) for k in state if (m := re.match(r"blocks\.\d+\.\d+", k))},
                        key=lambda b: tuple(int(x) for x in b.split(".")[1:]))
        mmcls = {_mobilenet_v1_to_mmcls(k, blocks): v.clone() for k, v in state.items()}
    else:
        mmcls = {to_mmcls(k): v.clone() for k, v in state.items()}
    assert len(mmcls) == count == len(state)
    for key, shape in known.items():  # the test's own mapping meets the real mmcls names
        assert tuple(mmcls[key].shape) == shape, key
    return mmcls


def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CASES))
def test_mmcls_round_trip_gives_equal_logits(name):
    kwargs = CASES[name][0]
    reference = _timm_model(name, kwargs, seed=0)
    mmcls = _mmcls_state(name, reference)
    fresh = _timm_model(name, kwargs, seed=1)
    converted = mmcls_to_timm(mmcls, fresh, source="ckpt.pth")
    assert list(converted) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(converted[key], value), key
    fresh.load_state_dict(converted, strict=True)
    x = _images(32 if "img_size" in kwargs else 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), reference(x))


def _cls_kd_mobilenet_v1(num_classes: int) -> nn.Module:
    """cls_KD's MobileNetV1 backbone (conv_bn stem, 11 conv_dw in ``model``, 2 in ``s4``, ReLU)
    with mmcls's GlobalAveragePooling neck and LinearClsHead, under its parameter names."""
    def conv_bn(i, o, s):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    def conv_dw(i, o, s):
        return nn.Sequential(nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.ReLU(),
                             nn.Conv2d(i, o, 1, 1, 0, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
        [(512, 512, 1)] * 5
    backbone = nn.Module()
    backbone.model = nn.Sequential(conv_bn(3, 32, 2), *(conv_dw(*w) for w in widths))
    backbone.s4 = nn.Sequential(conv_dw(512, 1024, 2), conv_dw(1024, 1024, 1))
    net = nn.Module()
    net.backbone, net.head = backbone, nn.Module()
    net.head.fc = nn.Linear(1024, num_classes)
    net.forward = lambda x: net.head.fc(backbone.s4(backbone.model(x)).mean((2, 3)))
    return net


def test_cls_kd_mobilenet_v1_equals_timm_with_relu():
    """The official network itself (not only the names): its logits equal timm's
    ``mobilenetv1_100(act_layer="relu")`` after conversion; timm's default ReLU6 differs."""
    official = _cls_kd_mobilenet_v1(NUM_CLASSES).eval()
    torch.manual_seed(0)
    for p in official.parameters():
        p.data.normal_(0, 0.5)
    _randomize_buffers(official)
    x = _images(64) * 3
    timm_relu = _timm_model("mobilenetv1_100", dict(act_layer="relu"), seed=1)
    timm_relu.load_state_dict(mmcls_to_timm(official.state_dict(), timm_relu, source="mv1.pth"))
    timm_relu6 = _timm_model("mobilenetv1_100", {}, seed=1)
    timm_relu6.load_state_dict(timm_relu.state_dict())
    with torch.no_grad():
        expected = official(x)
        torch.testing.assert_close(timm_relu(x), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(timm_relu6(x), expected, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def resnet18_mmcls(tmp_path_factory):
    """An mmcls checkpoint file of resnet18 (``meta`` + ``state_dict``) and its timm reference."""
    reference = _timm_model("resnet18", {}, seed=0)
    path = tmp_path_factory.mktemp("mmcls") / "resnet18_8xb32_in1k.pth"
    meta = {"epoch": 100, "mmcls_version": "0.15.0", "CLASSES": [f"class {i}" for i in range(NUM_CLASSES)]}
    torch.save({"meta": meta, "state_dict": _mmcls_state("resnet18", reference)}, path)
    return path, reference


def test_convert_command_and_teacher_format_load_the_same_weights(resnet18_mmcls, tmp_path, capsys):
    path, reference = resnet18_mmcls
    out = tmp_path / "resnet18.safetensors"
    assert skd_main(["convert", "mmcls", str(path), str(out), "--model", "resnet18"]) == 0
    assert f"-> timm resnet18 ({NUM_CLASSES} classes)" in capsys.readouterr().out
    x = _images(64)
    converted = load_teacher("resnet18", out, NUM_CLASSES)
    cfg = get_method_config_class("kd")(teacher="resnet18", teacher_checkpoint=str(path),
                                        teacher_format="mmcls")
    direct = create_teacher(cfg, student=reference, num_classes=NUM_CLASSES)
    with torch.no_grad():
        assert torch.equal(converted(x), reference(x))
        assert torch.equal(direct(x), reference(x))
    assert not direct.training and not any(p.requires_grad for p in direct.parameters())


def test_teacher_format_is_checked_by_the_config():
    cfg = load_config(None, ["method.name=kd", "method.teacher_format=mmcls"])
    assert cfg.method.teacher_format == "mmcls"
    with pytest.raises(ConfigError, match="method.teacher_format"):
        load_config(None, ["method.name=nkd", "method.teacher_format=torchvision"])


def test_convert_command_errors(resnet18_mmcls, tmp_path, capsys):
    path, _ = resnet18_mmcls
    assert skd_main(["convert", "mmcls", str(path), str(tmp_path / "out.pth"), "--model", "resnet18"]) == 2
    assert "must end with .safetensors" in capsys.readouterr().err
    out = str(tmp_path / "o.safetensors")
    assert skd_main(["convert", "mmcls", str(path), out, "--model", "mobilenetv2_050"]) == 2
    err = capsys.readouterr().err
    assert "mmcls ResNet checkpoint does not convert onto timm model 'mobilenetv2_050'" in err
    assert str(path) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    ("unknown", "mmcls key 'backbone.layer1.0.se.fc.weight' has no timm name in the ResNet mapping"),
    ("unexpected", "mmcls key 'backbone.layer5.0.conv1.weight' maps to 'layer5.0.conv1.weight', which timm "
                   "model 'resnet18' does not have"),
    ("missing", "timm model 'resnet18' needs 'layer3.1.bn2.running_var', which no key of the checkpoint provides"),
    ("shape", "mmcls key 'head.fc.weight' has shape [1000, 512], timm model 'resnet18' expects [7, 512]"),
    ("not_mmcls", "not an mmcls checkpoint of a supported backbone"),
])
def test_conversion_errors_name_the_key_and_file(change, message):
    model = _timm_model("resnet18", {}, seed=0)
    state = _mmcls_state("resnet18", model)
    if change == "unknown":
        state["backbone.layer1.0.se.fc.weight"] = torch.zeros(4, 64)
    elif change == "unexpected":
        state["backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    elif change == "missing":
        del state["backbone.layer3.1.bn2.running_var"]
    elif change == "shape":
        state["head.fc.weight"] = torch.zeros(1000, 512)
    else:
        state = model.state_dict()  # timm names
    with pytest.raises(ConversionError) as e:
        mmcls_to_timm(state, model, source="/ckpts/teacher.pth")
    assert str(e.value).startswith("/ckpts/teacher.pth: ") and message in str(e.value)
    assert "\n" not in str(e.value)
