"""The CIFAR nets registered with timm: official parameter counts, shapes, the timm interface,
the PreAct shortcut quirk, and checkpoint round trips."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import skd.models
from skd.models.preact_resnet import PreActBlock

# Parameter counts at 100 classes of the official constructors, counted layer by layer from
# RepDistiller models/{resnet,wrn,vgg}.py (model_dict: vgg8 = vgg8_bn, vgg13 = vgg13_bn) and
# cs-kd models/resnet.py::CIFAR_ResNet18. They round to the published tables (CRD / DKD papers:
# resnet8x4 1.23M, resnet32x4 7.43M, resnet20 0.28M, resnet32 0.47M, resnet56 0.86M,
# resnet110 1.74M, wrn-16-2 0.70M, wrn-40-1 0.57M, wrn-40-2 2.26M, vgg8 3.96M, vgg13 9.46M;
# PreAct ResNet-18 11.22M).
PARAMS = {
    "preact_resnet18_cifar": 11_217_444,
    "resnet8_cifar": 83_892,  # counted by hand: stem 464, stages 4,672 + 14,528 + 57,728, fc 6,500
    "resnet8x4_cifar": 1_233_540,
    "resnet32x4_cifar": 7_433_860,
    "resnet20_cifar": 278_324,
    "resnet32_cifar": 472_756,
    "resnet56_cifar": 861_620,
    "resnet110_cifar": 1_736_564,
    "wrn_16_2_cifar": 703_284,
    "wrn_40_1_cifar": 569_780,
    "wrn_40_2_cifar": 2_255_156,
    "vgg8_cifar": 3_965_028,
    "vgg13_cifar": 9_462_180,
}

# (channels, spatial size) of each feature index at 32 px: stem first, last = the pooled map.
FEATURES = {
    "preact_resnet18_cifar": [(64, 32), (64, 32), (128, 16), (256, 8), (512, 4)],
    "resnet8_cifar": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet8x4_cifar": [(32, 32), (64, 32), (128, 16), (256, 8)],
    "resnet32x4_cifar": [(32, 32), (64, 32), (128, 16), (256, 8)],
    "resnet20_cifar": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet32_cifar": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet56_cifar": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet110_cifar": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_16_2_cifar": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "wrn_40_1_cifar": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_40_2_cifar": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "vgg8_cifar": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
    "vgg13_cifar": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
}

SMALL = ["resnet20_cifar", "wrn_16_2_cifar", "vgg8_cifar", "preact_resnet18_cifar"]
"""One net per family, for the checks that run a forward pass more than once."""


def _x(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_every_model_is_registered():
    assert set(skd.models.CIFAR_MODELS) == set(PARAMS)
    assert set(timm.list_models("*_cifar")) >= set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_official_parameter_count_and_shapes(name):
    model = timm.create_model(name, num_classes=100).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    x = _x(1)
    with torch.no_grad():
        logits = model(x)
        final, inter = model.forward_intermediates(x)
    assert logits.shape == (1, 100)
    assert [(t.shape[1], t.shape[-1]) for t in inter] == FEATURES[name]
    assert [(i["num_chs"], 32 // i["reduction"]) for i in model.feature_info] == FEATURES[name]
    torch.testing.assert_close(final, inter[-1], rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(final), logits)
    assert model.num_features == FEATURES[name][-1][0]


@pytest.mark.parametrize("name", SMALL)
def test_timm_interface(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = _x(size=16)  # any size works: the pools are global
    with torch.no_grad():
        logits = model(x)
        penultimate, last = model.forward_intermediates(x, indices=[-2, -1],
                                                        intermediates_only=True)
        early = model.forward_intermediates(x, indices=[-2], stop_early=True,
                                            intermediates_only=True)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(early[0], penultimate)
    assert pooled.shape == (2, model.num_features)
    classifier = model.get_classifier()
    assert classifier.out_features == 10 and model.num_classes == 10
    torch.testing.assert_close(classifier(pooled), logits)

    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)

    features = timm.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    with torch.no_grad():
        maps = features(x)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [m.shape for m in maps] == [penultimate.shape, last.shape]


def test_vgg_pools_before_block4_only_at_64_px():
    # RepDistiller vgg.py: `if h == 64: x = self.pool3(x)`
    model = timm.create_model("vgg8_cifar").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(_x(1, 64), intermediates_only=True)
    sizes = [t.shape[-1] for t in maps]
    assert sizes == [64, 32, 16, 8, 4]


def test_preact_block_shortcut_takes_the_preactivated_input():
    """CS-KD / PS-KD PreActBlock: shortcut(relu(bn1(x))); kuangliu's PreActResNet uses x."""
    torch.manual_seed(0)
    identity, projection = PreActBlock(8, 8), PreActBlock(8, 16, stride=2)
    x = torch.randn(2, 8, 6, 6) - 0.5
    for block in (identity, projection):
        torch.nn.init.zeros_(block.conv2.weight)  # the residual branch is 0: out = shortcut
        block.bn1.running_mean.fill_(0.3)
        block.eval()
    with torch.no_grad():
        pre = F.relu(identity.bn1(x))
        torch.testing.assert_close(identity(x), pre)
        assert not torch.allclose(identity(x), x)  # what kuangliu's block would return
        conv = projection.shortcut[0]
        torch.testing.assert_close(projection(x), conv(F.relu(projection.bn1(x))))
        assert not torch.allclose(projection(x), conv(x))
    assert len(projection.shortcut) == 1  # conv1x1 without BN


def test_preact_resnet18_has_no_final_norm():
    model = timm.create_model("preact_resnet18_cifar")
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns[-1] == "layer4.1.bn2" and model.get_classifier() is model.linear


@pytest.mark.parametrize("name", ["resnet8x4_cifar", "vgg8_cifar"])
def test_safetensors_round_trip_through_pretrained_cfg_overlay(name, tmp_path):
    src = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for p in src.parameters():  # move away from the (deterministic-looking) init
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "weights.safetensors"
    save_file(src.state_dict(), str(path))
    dst = timm.create_model(name, num_classes=10, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_official_checkpoint_layouts_load(tmp_path):
    """RepDistiller saves {"model": state_dict}; CS-KD / PS-KD {"net": DDP state_dict}."""
    src = timm.create_model("wrn_16_2_cifar").eval()
    repd, pskd = tmp_path / "ckpt_epoch_240.pth", tmp_path / "checkpoint_best.pth"
    torch.save({"epoch": 240, "model": src.state_dict()}, repd)
    torch.save({"epoch": 299, "net": {f"module.{k}": v for k, v in src.state_dict().items()}},
               pskd)
    x = _x()
    for path in (repd, pskd):
        dst = timm.create_model("wrn_16_2_cifar", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path))).eval()
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "test_vit"])
def test_timm_recipe_for_methods(name):
    """The calls the method layer uses: one forward for an intermediate map and the logits."""
    model = timm.create_model(name, num_classes=10, **({"img_size": 32} if "vit" in name else {}))
    model.eval()
    x = _x()
    with torch.no_grad():
        logits = model(x)
        final, (penultimate, last) = model.forward_intermediates(x, indices=[-2, -1])
        torch.testing.assert_close(model.forward_head(final), logits)
        assert penultimate.dim() == last.dim() == 4  # NCHW maps for CNNs and ViTs alike
        if "vit" in name:  # USKD's mid CLS token: block int(0.5·L) − 1, prefix tokens returned
            mid = len(model.blocks) // 2 - 1
            _, [(patches, prefix)] = model.forward_intermediates(
                x, indices=[mid], return_prefix_tokens=True)
            assert prefix.shape == (2, model.num_prefix_tokens, model.embed_dim)
        else:
            assert penultimate.shape[1] == 256 and torch.equal(final, last)
