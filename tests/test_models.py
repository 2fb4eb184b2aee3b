"""The CIFAR nets registered with timm: official parameter counts, shapes and parameter layouts,
eval logits equal to the official nets', the timm interface, the PreAct shortcut quirk, ShakeDrop, a training step, and checkpoint round
trips."""
import copy
import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import skd.models
from skd.models._cifar import _checkpoint_filter
from skd.models.preact_resnet import PreActBlock
from skd.models.pyramidnet import PyramidNet, ShakeDrop

# Parameter counts at 100 classes of the official constructors, counted layer by layer from
# RepDistiller models/{resnet,wrn,vgg}.py (model_dict: vgg8 = vgg8_bn, vgg13 = vgg13_bn) and
# cs-kd models/resnet.py::CIFAR_ResNet18. They round to the published tables (CRD / DKD papers:
# resnet8x4 1.23M, resnet32x4 7.43M, resnet20 0.28M, resnet32 0.47M, resnet56 0.86M,
# resnet110 1.74M, wrn-16-2 0.70M, wrn-40-1 0.57M, wrn-40-2 2.26M, vgg8 3.96M, vgg13 9.46M;
# PreAct ResNet-18 11.22M). The PS-KD nets' counts come from running the official constructors
# (see OFFICIAL_LAYOUT below).
PARAMS = {
    "preact_resnet18_cifar": 11_217_444,
    "resnet101_cifar": 42_697_380,
    "densenet121_cifar": 7_048_548,
    "resnext29_8x64d_cifar": 34_518_948,
    "pyramidnet200_cifar": 26_844_952,
    "pyramidnet200_shakedrop_cifar": 26_844_952,  # ShakeDrop has no parameters
    "resnet18_cifar": 11_220_132,  # BYOT's nets: torchvision's ResNet-18/50 at 100 classes, less the
    "resnet50_cifar": 23_705_252,  # 7x7 stem conv (9,408) plus a 3x3 one (1,728)
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
    "resnet101_cifar": [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)],
    "densenet121_cifar": [(64, 32), (256, 32), (512, 16), (1024, 8), (1024, 4)],
    "resnext29_8x64d_cifar": [(64, 32), (256, 32), (512, 16), (1024, 8)],
    "pyramidnet200_cifar": [(16, 32), (384, 32), (704, 16), (1024, 8)],
    "pyramidnet200_shakedrop_cifar": [(16, 32), (384, 32), (704, 16), (1024, 8)],
    "resnet18_cifar": [(64, 32), (64, 32), (128, 16), (256, 8), (512, 4)],
    "resnet50_cifar": [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)],
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

SMALL = ["resnet20_cifar", "wrn_16_2_cifar", "vgg8_cifar", "preact_resnet18_cifar",
         "densenet121_cifar"]
"""One net per family, for the checks that run a forward pass more than once."""

# The official parameter layout of PS-KD's CIFAR nets: (number of state-dict entries, sha256 of
# the sorted lines "name:shape" of model.state_dict(), shape dims joined by "x", so a 0-dim buffer
# gives "name:"). Made once by running the official constructors of lgcnsai/PS-KD-Pytorch
# (commit 9aa0828, models/) at 100 classes: CIFAR_ResNet18_preActBasic, CIFAR_ResNet101_Bottle,
# CIFAR_DenseNet121(bias=True), CifarResNeXt(cardinality=8, depth=29, nlabels=100,
# base_width=64, widen_factor=4), PyramidNet('cifar100', depth=200, alpha=240, bottleneck=True)
# and PyramidNet_ShakeDrop with the same arguments (its ShakeDrop modules have no state).
_PYRAMIDNET_LAYOUT = (1531, "68e148429a0101cb55802bea732c894aac04c68290fd90e2daff8bfabc185134")
OFFICIAL_LAYOUT = {
    "preact_resnet18_cifar":
        (107, "e3140eb77f36dbb292b03d70268f1876966355c5abdf74272955d04f97b9399e"),
    "resnet101_cifar": (626, "9c5a69055c08040c6f1269c8c23b0eb39b4f197a4ff777829ea4f0535451afe0"),
    "densenet121_cifar":
        (722, "571956fb3d9725740b8a550eedba7bba33b5927ab74937648ba9ef57ff345398"),
    "resnext29_8x64d_cifar":
        (188, "a1ada1259694cb36767c08b79e45c5df560ff61db342121ccb21c04321c70b1e"),
    "pyramidnet200_cifar": _PYRAMIDNET_LAYOUT,
    "pyramidnet200_shakedrop_cifar": _PYRAMIDNET_LAYOUT,
}
PSKD_NETS = ["resnet101_cifar", "densenet121_cifar", "resnext29_8x64d_cifar",
             "pyramidnet200_cifar", "pyramidnet200_shakedrop_cifar"]
"""The nets PS-KD's table adds to the PreAct ResNet-18."""


@pytest.fixture(scope="module")
def net():
    """``net(name)``: the model at 100 classes in eval mode, built once per module (the big
    PS-KD nets take a while to initialise). Tests that change it work on a copy."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = timm.create_model(name, num_classes=100).eval()
        return cache[name]

    yield get
    cache.clear()


def _x(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_every_model_is_registered():
    assert set(skd.models.CIFAR_MODELS) == set(PARAMS)
    assert set(timm.list_models("*_cifar")) >= set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_official_parameter_count_and_shapes(name, net):
    model = net(name)
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


def _layout(model):
    lines = sorted(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in model.state_dict().items())
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(OFFICIAL_LAYOUT))
def test_official_parameter_layout_loads_strictly(name, net):
    """Names and shapes equal the official nets', so a PS-KD checkpoint ({"net": DDP state
    dict}) in that layout loads with strict=True and sets every tensor."""
    model = net(name)
    assert _layout(model) == OFFICIAL_LAYOUT[name]
    gen = torch.Generator().manual_seed(0)
    official = {f"module.{k}": (torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point()
                                else v + 7)
                for k, v in model.state_dict().items()}
    dst = copy.deepcopy(model)
    dst.load_state_dict(_checkpoint_filter({"epoch": 299, "net": official}, dst), strict=True)
    loaded = dst.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("module.")], v) for k, v in official.items())


def _filled(model):
    """A float64 eval-mode copy whose every tensor is set from its position in the sorted state
    dict alone (no initialiser, no RNG), so the official net filled the same way holds the same
    numbers: running variances 1 ± 0.5, norm scales 0.5 ± 0.25, biases and means ±0.1, weights
    a sine wave of variance 1/fan_in."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(model.state_dict().items())):
            if not t.is_floating_point():
                continue
            wave = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + i).view(t.shape)
            if name.endswith("running_var"):
                t.copy_(1 + 0.5 * wave)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(0.5 + 0.25 * wave)
            elif t.dim() == 1:
                t.copy_(0.1 * wave)
            else:
                t.copy_(wave * (2.0 / t[0].numel()) ** 0.5)
    return model


# logits[:, :4] of the official nets, filled by _filled, on the image of the test below: the
# forward passes must agree, not only the names. PS-KD's nets: the constructors and commit of
# OFFICIAL_LAYOUT; RepDistiller's: models/__init__.py::model_dict of HobbitLong/RepDistiller
# (commit b84f547) at 100 classes (vgg8/vgg13 = vgg8_bn/vgg13_bn).
OFFICIAL_LOGITS = {
    "preact_resnet18_cifar": [-12.101695514098, -16.120565230822, -19.032471580669,
                              -20.664006492982, -12.056020715161, -16.051121334337,
                              -18.943870982321, -20.562133957859],
    "resnet101_cifar": [-35568.71356667339, 22955.813671434313, 59057.14341954252,
                        37471.490716586784, -33494.6851508986, 21569.74687960528,
                        55564.89037229808, 35284.281443997636],
    "densenet121_cifar": [10.066408460962, 2.309371770187, -6.033244213968, -12.793075447113,
                          10.061649722586, 2.30886560878, -6.029365556346, -12.7858253264],
    "resnext29_8x64d_cifar": [-2947.493753922664, -4492.314987659026, -4863.441824777942,
                              -3963.9259087326, -2948.331832291654, -4493.729025687737,
                              -4865.06238438448, -3965.329595057364],
    "pyramidnet200_cifar": [-3.602303392096, -6.408930815276, -7.525202138941, -6.671942553299,
                            -3.60220444806, -6.408800755466, -7.52507494338, -6.671851453686],
    "pyramidnet200_shakedrop_cifar": [-1.418033941236, -3.263292150873, -4.240038292704,
                                      -4.105550547951, -1.417946862473, -3.263197058737,
                                      -4.239960031404, -4.105509564395],
    "resnet8_cifar": [0.0517693158192, -0.381127037461, -0.566520111093, -0.379209122294,
                      0.0515468938734, -0.381393885563, -0.566662683424, -0.37913728433],
    "resnet8x4_cifar": [-0.65534586284, 0.798985177803, -0.787077817105, 1.07776357645,
                        -0.649515899065, 0.794210600305, -0.783438238448, 1.07531968393],
    "resnet32x4_cifar": [-25103.0872789, 19504.4157135, -13580.3801616, 7430.21749291,
                         -24951.4492271, 19357.5320618, -13440.7000868, 7300.07005723],
    "resnet20_cifar": [7.14311292876, 3.11383022493, -2.87746846657, -7.03507672761,
                       7.16374929396, 3.12472569685, -2.88320202799, -7.05381455289],
    "resnet32_cifar": [-191.414172789, 39.8666248251, 245.950213085, 296.558112761,
                       -192.089774142, 39.8838876287, 246.649426465, 297.497232561],
    "resnet56_cifar": [-47111.6532136, 157610.269927, 262690.658399, 201697.479541,
                       -47574.7690255, 158728.688488, 264683.544787, 203304.926827],
    "resnet110_cifar": [-1430025200980.0, -1631553501950.0, -801610277643.0, 535112635329.0,
                        -1443429179150.0, -1651557007710.0, -815567052943.0, 536026092929.0],
    "wrn_16_2_cifar": [-3.96431105843, -3.3960041912, 4.40591694147, 2.93627692359,
                       -3.93846131526, -3.37296184317, 4.37709176609, 2.91695673769],
    "wrn_40_1_cifar": [-522.784771345, -645.090079069, -359.584235729, 153.239958319,
                       -523.111938059, -645.674954316, -360.057060159, 153.178105297],
    "wrn_40_2_cifar": [-106483.067958, -74006.3935506, 116039.35066, 59022.3979605,
                       -105763.149404, -73473.8471724, 115250.664997, 58591.6936651],
    "vgg8_cifar": [1.13605258161, 0.539262247647, -0.0566042294777, -0.60980293237,
                   1.13798471975, 0.536527652449, -0.0638239288781, -0.621028210599],
    "vgg13_cifar": [1.48971780306, 0.502971143728, -0.557567975256, -1.61159402671,
                    1.49193491832, 0.500176017851, -0.565189692741, -1.62353610878],
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_LOGITS))
def test_eval_logits_equal_the_official_nets(name, net):
    image = torch.sin(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.37).view(2, 3, 32, 32)
    with torch.no_grad():
        logits = _filled(net(name))(image)
    expected = torch.tensor(OFFICIAL_LOGITS[name], dtype=torch.float64).view(2, 4)
    torch.testing.assert_close(logits[:, :4], expected, rtol=1e-9, atol=0)


def test_byot_resnet18_is_torchvisions_blocks_on_a_cifar_stem(net):
    """BYOT's ResNet-18 is timm's (torchvision's blocks) with the official conv3x3 stride-1 stem and
    no max-pool: the same tensors, in the same order, give the same eval logits. (Its ResNet-50
    has PS-KD's bottleneck, whose logits are checked through resnet101_cifar.)"""
    ours = _filled(net("resnet18_cifar"))
    reference = timm.create_model("resnet18", num_classes=100)
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    reference.maxpool = torch.nn.Identity()
    reference = reference.double().eval()
    pairs = list(zip(reference.state_dict().items(), ours.state_dict().values(), strict=True))
    assert all(ref.shape == t.shape for (_, ref), t in pairs)
    reference.load_state_dict({k: t for (k, _), t in pairs})
    image = torch.sin(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.37).view(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(image), reference(image), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PSKD_NETS)
def test_one_training_step(name, net):
    model = copy.deepcopy(net(name)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    head = model.get_classifier().weight.detach().clone()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv = first_conv.weight.detach().clone()
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    loss = F.cross_entropy(model(_x(2)), torch.tensor([3, 97]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert not torch.equal(model.get_classifier().weight, head)
    assert not torch.equal(first_conv.weight, conv)  # the gradient reached the stem
    assert first_bn.num_batches_tracked.item() == 1


def test_shakedrop_forward_and_backward_factors():
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    closed = ShakeDrop(p_drop=1.0).train()  # gate always closed: y = α·x, dy/dx = β
    xg = x.clone().requires_grad_()
    y = closed(xg)
    y.backward(torch.ones_like(y))
    alpha, beta = y.detach() / x, xg.grad
    for factor, low, high in ((alpha, -1, 1), (beta, 0, 1)):
        per_sample = factor.flatten(1)
        torch.testing.assert_close(per_sample, per_sample[:, :1].expand_as(per_sample))
        assert ((per_sample >= low) & (per_sample <= high)).all()
    assert not torch.allclose(alpha, beta)  # the backward uses its own draw

    opened = ShakeDrop(p_drop=0.0).train()
    xg = x.clone().requires_grad_()
    y = opened(xg)
    y.backward(torch.ones_like(y))
    assert torch.equal(y, x) and torch.equal(xg.grad, torch.ones_like(x))
    torch.testing.assert_close(ShakeDrop(p_drop=0.3).eval()(x), 0.7 * x)


def test_shakedrop_gate_is_shared_by_the_batch():
    """One Bernoulli gate per batch (the official code): either every sample passes unchanged
    or every sample is scaled."""
    torch.manual_seed(0)
    shake = ShakeDrop(p_drop=0.5).train()
    x = torch.randn(8, 4, 3, 3)
    outcomes = set()
    for _ in range(30):
        unchanged = (shake(x) == x).flatten(1).all(1)
        assert unchanged.all() or not unchanged.any()
        outcomes.add(bool(unchanged.all()))
    assert outcomes == {True, False}


def test_pyramidnet_widths_and_shakedrop_probabilities(net):
    """Block k of 3n has round(16 + k·α/3n) planes; ShakeDrop's p_drop rises linearly to 0.5."""
    small = PyramidNet(depth=20, alpha=48, shakedrop=True)  # n = 2: 6 blocks, +8 planes each
    blocks = [b for stage in (small.layer1, small.layer2, small.layer3) for b in stage]
    assert [b.conv1.out_channels for b in blocks] == [24, 32, 40, 48, 56, 64]
    assert [b.bn1.num_features for b in blocks] == [16, 96, 128, 160, 192, 224]
    torch.testing.assert_close([b.shake_drop.p_drop for b in blocks],
                               [0.5 * k / 6 for k in range(1, 7)])
    sd = net("pyramidnet200_shakedrop_cifar")
    p_drops = [b.shake_drop.p_drop for stage in (sd.layer1, sd.layer2, sd.layer3) for b in stage]
    assert len(p_drops) == 66 and p_drops[-1] == 0.5
    assert all(b.shake_drop is None for b in net("pyramidnet200_cifar").layer3)


def test_shufflenet_v2_is_torchvisions_net_in_timm():
    """timm builds skd's ShuffleNetV2 (the USKD table's row) with torchvision's parameter count and
    names; torchvision's weights load strictly and give the same logits; the weak-head feature
    (index −2) is the 464-channel stage4, mmcls's ``fea_s[-2]``."""
    import torchvision

    model = timm.create_model("shufflenet_v2_x1_0").eval()
    reference = torchvision.models.shufflenet_v2_x1_0().eval()
    assert "shufflenet_v2_x1_0" in skd.models.IMAGENET_MODELS
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters()) == 2_278_604
    model.load_state_dict(reference.state_dict(), strict=True)
    x = _x(1, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        final, inter = model.forward_intermediates(x, indices=[-2])
    assert inter[0].shape[1] == 464 and final.shape[1] == 1024
    assert [i["num_chs"] for i in model.feature_info] == [24, 116, 232, 464, 1024]
