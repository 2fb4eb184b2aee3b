"""The methods: every registered method trains end to end on the digits shards, plus the
behaviours each one promises (CS-KD's two BN updates, USKD's weak head, ICKD's embed, frozen
teachers, the teacher loader)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2

from skd import losses
from skd.checkpoint import latest_checkpoint, load_checkpoint
from skd.config import load_config
from skd.environment import check_environment
from skd.features import forward_with_pooled_feature
from skd.methods import DataSpec, create_method, get_method_class, get_method_config_class, list_methods
from skd.teacher import load_state_dict_file, load_teacher
from skd.train import train

MODEL = "test_resnet"  # timm's tiny ResNet: BatchNorm, forward_intermediates, ~15 ms a step on CPU
FAST = [f"model.name={MODEL}", "log_with=[]", "data.batch_size=128", "data.num_workers=0",
        "data.img_size=16", "epochs=1", "log_every=5", "sched.warmup_epochs=0"]
DATA = DataSpec(num_classes=10, num_samples=100, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A tiny teacher: one epoch of plain cross-entropy on the digits (its model.safetensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("teacher") / "run"
    try:
        train(load_config(None, FAST + ["method.name=ce", f"output_dir={run}"]))
    finally:
        torch.set_num_threads(threads)
    return run / "model.safetensors"


def _uses_teacher(name: str) -> bool:
    return "teacher_checkpoint" in {f.name for f in dataclasses.fields(get_method_config_class(name))}


CASES = [pytest.param(name, [], id=name) for name in list_methods()]
CASES.append(pytest.param("tfkd", ["method.mode=self"], id="tfkd-self"))
CASES.append(pytest.param("cskd", ["method.exclude_self_pair=true"], id="cskd-exclude-self"))


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", CASES)
def test_method_trains_end_to_end(tmp_path, teacher_file, name, extra):
    run = tmp_path / "run"
    overrides = FAST + [f"method.name={name}", f"output_dir={run}", *extra]
    if _uses_teacher(name):  # the student's architecture is the default teacher (tfkd self)
        overrides.append(f"method.teacher_checkpoint={teacher_file}")
    metrics = train(load_config(None, overrides))

    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))  # metrics.json holds exactly what train() returned
    assert set(saved) >= {"top1", "top5", "nll", "ece", "aurc", "eaurc"}
    (epoch,) = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    train_values = {k: v for k, v in epoch.items() if k.startswith("train_") and k != "train_img_per_s"}
    assert "train_loss" in train_values
    assert all(math.isfinite(v) for v in train_values.values()), train_values

    # The export is the bare student (no teacher, weak head or embed) and loads into timm.
    exported = load_file(run / "model.safetensors")
    student = timm.create_model(MODEL, num_classes=10)
    assert set(exported) == set(student.state_dict())
    student.load_state_dict(exported)
    # Checkpoints hold the trainable modules but never the frozen teacher.
    method_state = load_checkpoint(latest_checkpoint(run))["method"]
    assert not any(k.startswith("teacher.") for k in method_state)
    if name == "uskd":
        assert {"weak_head.weight", "weak_head.bias"} <= set(method_state)
    if name == "ickd":
        assert "embed.0.weight" in method_state
    if name == "byot":
        assert {"heads.0.fc.weight", "heads.2.expand.0.weight"} <= set(method_state)


# ---------------------------------------------------------------------------------------- CS-KD

def _bn_counts(model: torch.nn.Module) -> set[int]:
    return {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("single_forward", [False, True])
def test_cskd_batchnorm_sees_each_half_separately(single_forward):
    model = timm.create_model("resnet20_cifar", num_classes=10)
    reference = timm.create_model("resnet20_cifar", num_classes=10)
    reference.load_state_dict(model.state_dict())
    cfg = get_method_config_class("cskd")(name="cskd", single_forward=single_forward)
    method = create_method(cfg, model, DATA).train()
    images, partners = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16, requires_grad=True)
    labels = torch.randint(0, 10, (8,))

    out = method({"image": images, "partner": partners, "label": labels})
    out["loss"].backward()

    # Parity: two train-mode passes update the running statistics twice per step.
    assert _bn_counts(model) == ({1} if single_forward else {2})
    reference.train()
    with torch.no_grad():
        if single_forward:
            reference(torch.cat([images, partners]))
        else:
            reference(images)
            reference(partners)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    # Separate passes: nothing flows back to the partner; one pass couples them through BN.
    assert (partners.grad is None) != single_forward
    assert set(out["parts"]) == {"ce", "kl"}
    torch.testing.assert_close(out["parts"]["ce"] + out["parts"]["kl"], out["loss"].detach())


# ----------------------------------------------------------------------------------------- USKD

def test_uskd_weak_head_on_cnn_mid_stage_is_trained_and_reaches_backbone():
    model = timm.create_model(MODEL, num_classes=10)
    method = create_method(get_method_config_class("uskd")(name="uskd"), model, DATA).train()
    x = torch.randn(4, 3, 32, 32)
    _, (mid,) = model.forward_intermediates(x, indices=[-2])
    assert method.feature_index == -2
    assert method.weak_head.in_features == mid.shape[1]
    assert method.weak_head.out_features == 10

    out = method({"image": x, "label": torch.randint(0, 10, (4,))})
    out["loss"].backward()
    assert method.weak_head.weight.grad.abs().sum() > 0
    # The weak head is in the optimizer (it is a submodule of the method) ...
    optimizer = create_optimizer_v2(method, opt="sgd", lr=0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in method.weak_head.parameters()} <= in_optimizer
    # ... and its input is not detached: the weak head alone back-propagates into the stem.
    _, feature = forward_with_pooled_feature(model, x, method.feature_index)
    stem = next(model.parameters())
    (grad,) = torch.autograd.grad(method.weak_head(feature).square().sum(), stem)
    assert grad.abs().sum() > 0


def test_uskd_weak_head_on_vit_takes_mid_cls_token():
    model = timm.create_model("test_vit", num_classes=10)
    method = create_method(get_method_config_class("uskd")(name="uskd"), model, DATA).train()
    depth = len(model.blocks)
    assert method.feature_index == int(0.5 * depth) - 1
    assert method.weak_head.in_features == model.embed_dim
    seen = {}
    model.blocks[method.feature_index].register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    logits, feature = forward_with_pooled_feature(model, x, method.feature_index)
    torch.testing.assert_close(feature, seen["x"][:, 0])
    torch.testing.assert_close(logits, model(x))


def test_uskd_rank_modes_are_configurable():
    with pytest.raises(ValueError, match="rank"):
        load_config(None, ["method.name=uskd", "method.rank=bogus"])
    assert load_config(None, ["method.name=uskd", "method.rank=logprob"]).method.rank == "logprob"


# ------------------------------------------------------------------------------------------ DLB

def _tiny_net(num_classes: int = 10) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))


def test_dlb_steps_match_the_official_loop():
    """Four SGD steps of skd's DLB (fp32) against ``Meta-knowledge-Lab/DLB`` ``dlb.py::
    train_one_epoch`` written out in float64: the loss of every step and the final weights. The
    dataset gives two views of each image; batch j's second views are repeated at step j + 1."""
    T, alpha, B = 3.0, 1.0, 5
    g = torch.Generator().manual_seed(0)
    views = torch.randn(4, B, 2, 3, 8, 8, generator=g)  # [step, sample, view, ...]
    labels = torch.randint(0, 10, (4, B), generator=g)
    model = _tiny_net()
    reference = _tiny_net().double()
    reference.load_state_dict(model.state_dict())
    method = create_method(get_method_config_class("dlb")(temperature=T, alpha=alpha), model, DATA).train()

    def sgd(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    optimizer, ref_optimizer = sgd(method.parameters()), sgd(reference.parameters())
    pre_data, pre_out = None, None
    for j in range(4):
        # The official step, in float64.
        imgs, label = views[j].double(), labels[j]
        out = reference(imgs[:, 0])
        if pre_data is not None:
            pre_images, pre_label = pre_data
            out_pre = reference(pre_images[:, 1])
            ce_loss = F.cross_entropy(torch.cat((out_pre, out)), torch.cat((pre_label, label)))
            dml_loss = F.kl_div(F.log_softmax(out_pre / T, dim=1), F.softmax(pre_out.detach() / T, dim=1),
                                reduction="batchmean") * T * T
            ref_loss = ce_loss + alpha * dml_loss
        else:
            ref_loss = F.cross_entropy(out, label)
        pre_data, pre_out = (imgs, label), out
        ref_optimizer.zero_grad()
        ref_loss.backward()
        ref_optimizer.step()
        # skd: the loader's batch j holds the new samples' first view and batch j − 1's second.
        ids = torch.arange(B * j, B * (j + 1))
        batch = {"image": views[j, :, 0], "label": labels[j], "index": ids,
                 "repeat": views[j - 1, :, 1] if j else torch.zeros(0, 3, 8, 8),
                 "repeat_label": labels[j - 1] if j else torch.zeros(0, dtype=torch.int64),
                 "repeat_index": ids - B if j else torch.zeros(0, dtype=torch.int64)}
        out = method(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_step(batch, out)
        torch.testing.assert_close(out["loss"].double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    assert method.epoch_stats() == {"dlb_targets_found": 1.0}


def test_dlb_targets_round_trip_through_rank_parts():
    """The same processes take their own part back; another number of processes takes every
    part, and each repeated sample finds its row by id."""
    def stepped(ids):
        method = create_method(get_method_config_class("dlb")(), _tiny_net(), DATA).train()
        x = torch.randn(len(ids), 3, 8, 8)
        batch = {"image": x, "label": torch.zeros(len(ids), dtype=torch.int64), "index": torch.tensor(ids),
                 "repeat": torch.zeros(0, 3, 8, 8), "repeat_label": torch.zeros(0, dtype=torch.int64),
                 "repeat_index": torch.zeros(0, dtype=torch.int64)}
        method.after_step(batch, method(batch))
        return method

    rank0, rank1 = stepped([4, 9, 2]), stepped([7, 1])
    assert rank0.rank_state()["previous_logits"].shape == (3, 10)
    alone = create_method(get_method_config_class("dlb")(), _tiny_net(), DATA)
    alone.load_rank_states([rank0.rank_state()])  # one process then and now
    assert torch.equal(alone.previous_index, rank0.previous_index)
    alone.load_rank_states([rank0.rank_state(), rank1.rank_state()])  # two then, one now
    target, found = alone._targets(torch.tensor([1, 4, 5]), torch.zeros(3, 10))
    assert found.tolist() == [True, True, False]
    assert torch.equal(target[0], rank1.previous_logits[1]) and torch.equal(target[1], rank0.previous_logits[0])


def test_dlb_resumed_with_another_per_process_batch_finds_its_targets_in_any_part(monkeypatch):
    """Two processes then and now, but another per-process batch: the loader re-plans the epoch,
    so rank 0's next batch repeats samples that rank 1 read last. Its own part comes first, the
    others after it; the epoch's dlb_targets_found counts come back with the own part."""
    import skd.methods.dlb as dlb_module

    def stepped(ids, repeated):
        method = create_method(get_method_config_class("dlb")(), _tiny_net(), DATA).train()
        method.start_epoch(3, 10)
        x = torch.randn(len(ids), 3, 8, 8)
        batch = {"image": x, "label": torch.zeros(len(ids), dtype=torch.int64), "index": torch.tensor(ids),
                 "repeat": torch.randn(len(repeated), 3, 8, 8),
                 "repeat_label": torch.zeros(len(repeated), dtype=torch.int64), "repeat_index": torch.tensor(repeated)}
        method.previous_index, method.previous_logits = torch.tensor(repeated), torch.randn(len(repeated), 10)
        method.after_step(batch, method(batch))
        return method

    rank0, rank1 = stepped([4, 9, 2], [4, 9]), stepped([7, 1], [30])
    monkeypatch.setattr(dlb_module, "world", lambda: (0, 2))  # this process is rank 0 of two
    resumed = create_method(get_method_config_class("dlb")(), _tiny_net(), DATA)
    resumed.load_rank_states([rank0.rank_state(), rank1.rank_state()])
    resumed.start_epoch(3, 10)  # the same epoch: the counts stay
    assert resumed.epoch_stats() == rank0.epoch_stats() == {"dlb_targets_found": 1.0}
    target, found = resumed._targets(torch.tensor([7, 2]), torch.zeros(2, 10))
    assert found.tolist() == [True, True]
    assert torch.equal(target[0], rank1.previous_logits[0]) and torch.equal(target[1], rank0.previous_logits[2])
    resumed.start_epoch(4, 10)  # a new epoch starts its counts afresh
    assert resumed.epoch_stats() == {}


# ----------------------------------------------------------------------------------------- BYOT

def _scala_net(channel_in: int, channel_out: int, size: int) -> torch.nn.Sequential:
    """``ArchipLab-LinfengZhang/pytorch-scalable-neural-networks`` ``sresnet.py::ScalaNet``."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(channel_in, 128, kernel_size=1, stride=1), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.Conv2d(128, 128, kernel_size=size, stride=size), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.Conv2d(128, channel_out, kernel_size=1, stride=1), nn.BatchNorm2d(channel_out),
                         nn.ReLU(), nn.AvgPool2d(4, 4))


@pytest.mark.parametrize("train_mode", [True, False])
def test_byot_head_is_the_official_scalanet_and_fc(train_mode):
    from skd.methods.byot import BottleneckHead
    head = BottleneckHead(64, 128, 512, 8, 100).train(train_mode)
    official = _scala_net(64, 512, 8).train(train_mode)
    body = [v for k, v in head.state_dict().items() if not k.startswith("fc.")]
    official.load_state_dict(dict(zip(official.state_dict(), body)))
    x = torch.randn(3, 64, 32, 32)  # layer1 of the official CIFAR ResNet-18
    feature, logits = head(x)
    expected = official(x).view(3, -1)
    torch.testing.assert_close(feature, expected)
    torch.testing.assert_close(logits, head.fc(expected))


def test_byot_heads_read_the_sections_of_a_cnn_and_train_outside_the_export():
    model = timm.create_model(MODEL, num_classes=10)
    method = create_method(get_method_config_class("byot")(), model, DATA).train()
    assert method.taps == [1, 2, 3]  # timm ResNet: layer1, layer2, layer3 (index 0 is the stem)
    assert [h.stride for h in method.heads] == [8, 4, 2]  # each section's resolution over layer4's
    assert [h.reduce[0].in_channels for h in method.heads] == [info["num_chs"] for info in model.feature_info[1:4]]
    assert all(h.fc.in_features == model.num_features for h in method.heads)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = method({"image": x, "label": y})
    out["loss"].backward()
    assert set(out["parts"]) == {"ce", "heads", "hint"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.heads.parameters() if p.ndim > 1)
    torch.testing.assert_close(out["parts"]["ce"], losses.cross_entropy(out["logits"], y))
    assert not any(k.startswith("heads.") for k in model.state_dict())  # the export is the model alone


def test_byot_heads_read_quarter_blocks_of_a_vit():
    model = timm.create_model("test_vit", num_classes=10)
    method = create_method(get_method_config_class("byot")(), model, DATA).train()
    assert method.taps == [0, 2, 3]  # 6 blocks: L/4 − 1, L/2 − 1, 3L/4 − 1
    assert [h.stride for h in method.heads] == [1, 1, 1]
    assert all(h.reduce[0].in_channels == h.fc.in_features == model.embed_dim for h in method.heads)
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    out = method({"image": x, "label": torch.tensor([1, 2])})
    out["loss"].backward()
    assert method.heads[0].fc.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- ICKD

@pytest.fixture
def cifar_teacher(tmp_path):
    """A resnet8x4 teacher (256 last-stage channels) saved to safetensors."""
    teacher = timm.create_model("resnet8x4_cifar", num_classes=10)
    path = tmp_path / "resnet8x4.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("kernel, norm", [(1, "cifar"), (3, "imagenet")])
def test_ickd_embed_maps_student_to_teacher_channels(cifar_teacher, kernel, norm):
    student = timm.create_model("resnet20_cifar", num_classes=10)  # 64 last-stage channels
    cfg = get_method_config_class("ickd")(name="ickd", teacher="resnet8x4_cifar",
                                          teacher_checkpoint=str(cifar_teacher),
                                          embed_kernel=kernel, norm=norm)
    method = create_method(cfg, student, DATA).train()
    conv, bn = method.embed
    assert conv.weight.shape == (256, 64, kernel, kernel) and conv.bias is None
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 256

    x = torch.randn(4, 3, 32, 32)
    embedded = method.embed(student.forward_features(x))
    assert embedded.shape == method.teacher.forward_features(x).shape == (4, 256, 8, 8)
    out = method({"image": x, "label": torch.randint(0, 10, (4,))})
    out["loss"].backward()
    assert set(out["parts"]) == {"ce", "kl", "ickd"}
    assert conv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(sum(out["parts"].values()), out["loss"])


def test_ickd_without_kl_has_no_kl_part(cifar_teacher):
    cfg = get_method_config_class("ickd")(name="ickd", teacher="resnet8x4_cifar",
                                          teacher_checkpoint=str(cifar_teacher), kd_weight=0.0)
    method = create_method(cfg, timm.create_model("resnet20_cifar", num_classes=10), DATA)
    out = method({"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([1, 2])})
    assert set(out["parts"]) == {"ce", "ickd"}


# ------------------------------------------------------------------------------------- teachers

TEACHER_METHODS = [("kd", {}), ("nkd", {}), ("ickd", {}), ("tfkd", {"mode": "self"})]


@pytest.mark.parametrize("name, extra", TEACHER_METHODS, ids=[m for m, _ in TEACHER_METHODS])
def test_teacher_is_frozen_and_outside_optimizer_and_checkpoint(cifar_teacher, name, extra):
    cfg = get_method_config_class(name)(name=name, teacher="resnet8x4_cifar",
                                        teacher_checkpoint=str(cifar_teacher), **extra)
    method = create_method(cfg, timm.create_model("resnet20_cifar", num_classes=10), DATA)
    method.train()
    teacher = method.teacher
    assert teacher in method.frozen_modules()
    # Outside the module tree: no DDP wrapper, optimizer or checkpoint sees it.
    assert not any(m is teacher for m in method.modules())
    assert method.model.training and not teacher.training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}

    out = method({"image": torch.randn(4, 3, 32, 32), "label": torch.randint(0, 10, (4,))})
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # eval mode: BN statistics untouched
        assert torch.equal(v, stats[k]), k
    assert all(torch.isfinite(v) for v in out["parts"].values())

    optimizer = create_optimizer_v2(method, opt="sgd", lr=0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher.") for k in method.trainable_state_dict())


@pytest.mark.parametrize("name, extra", TEACHER_METHODS, ids=[m for m, _ in TEACHER_METHODS])
def test_missing_teacher_checkpoint_is_a_clear_error(name, extra):
    cfg = get_method_config_class(name)(name=name, **extra)
    with pytest.raises(ValueError, match="method.teacher_checkpoint"):
        create_method(cfg, timm.create_model("resnet20_cifar", num_classes=10), DATA)


def test_tfkd_reg_needs_no_teacher():
    method = create_method(get_method_config_class("tfkd")(name="tfkd"),
                           timm.create_model("resnet20_cifar", num_classes=10), DATA)
    assert method.teacher is None and method.frozen_modules() == []
    assert method.multiplier == 100.0  # the ResNet-18 params.json value of TF-KD_reg
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    out = method({"image": x, "label": y})
    expected = losses.tfkd_reg_loss(out["logits"], y, 20.0, 0.1, 100.0)
    torch.testing.assert_close(out["loss"], expected)


def test_load_teacher_accepts_every_checkpoint_layout(tmp_path):
    source = timm.create_model("resnet20_cifar", num_classes=10)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    layouts = {
        "plain.pt": sd,
        "wrapped_state_dict.pt": {"state_dict": sd, "epoch": 3},
        "repdistiller.pth": {"model": sd, "epoch": 240},
        "cskd_ddp.pth": {"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 70.0},
        "skd_run.pt": {"format": "skd-checkpoint-1", "epoch": 1,
                       "method": {**{f"model.{k}": v for k, v in sd.items()},
                                  "weak_head.weight": torch.zeros(10, 4)}},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "export.safetensors"))
    for name in [*layouts, "export.safetensors"]:
        teacher = load_teacher("resnet20_cifar", tmp_path / name, num_classes=10)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)


def test_load_teacher_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_teacher("resnet20_cifar", missing, num_classes=10)
    wrong = tmp_path / "resnet8x4.pt"
    torch.save(timm.create_model("resnet8x4_cifar", num_classes=10).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet8x4.pt"):
        load_teacher("resnet20_cifar", wrong, num_classes=10)
    pickled = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)  # not loadable with weights_only
    with pytest.raises(ValueError, match="pickled.pt"):
        load_state_dict_file(pickled)
    # The teacher's name is checked when a run starts, with timm's close names.
    cfg = load_config(None, ["method.name=kd", "method.teacher=resnet8x4_cifr", f"method.teacher_checkpoint={wrong}"])
    with pytest.raises(ValueError, match=r"'method.teacher' = 'resnet8x4_cifr': not a timm model \(did you mean resnet8x4_cifar"):
        check_environment(cfg)


def test_every_method_config_has_defaults():
    for name in list_methods():
        cls = get_method_class(name)
        cfg = cls.Config()
        assert cfg.name == name
        for field in dataclasses.fields(cls.Config):
            assert field.name == "name" or field.default is not dataclasses.MISSING \
                or field.default_factory is not dataclasses.MISSING, (name, field.name)
    cskd = get_method_class("cskd")
    assert cskd.train_loader_options(cskd.Config()) == {"with_partner": True, "exclude_self_pair": False}
    assert cskd.train_loader_options(cskd.Config(exclude_self_pair=True))["exclude_self_pair"]
    dlb = get_method_class("dlb")
    assert dlb.train_loader_options(dlb.Config()) == {"repeat_previous": True}
    bake = get_method_class("bake")  # BAKE's intra-class image is never the anchor itself
    assert bake.train_loader_options(bake.Config()) == {"with_partner": True, "exclude_self_pair": True}
    assert bake.train_loader_options(bake.Config(intra_imgs=0)) == {}
    assert not any(get_method_class(n).train_loader_options(get_method_class(n).Config())
                   for n in list_methods() if n not in ("cskd", "dlb", "bake"))


# ------------------------------------------------------------------ a teacher's own normalisation

def _teacher_with(tmp_path, name, metadata=None):
    teacher = timm.create_model(name, num_classes=10)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path), metadata=metadata)
    return path


def _inputs_seen_by_teacher(method, images):
    seen = []  # the input of the teacher's first convolution: every method's entry point reaches it
    stem = next(m for m in method.teacher.modules() if isinstance(m, torch.nn.Conv2d))
    handle = stem.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        method({"image": images, "label": torch.zeros(len(images), dtype=torch.long)})
    finally:
        handle.remove()
    return seen[0]


STUDENT_DATA = DataSpec(num_classes=10, num_samples=100, batch_size=8, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225), img_size=32)


def test_a_teacher_with_other_statistics_gets_exactly_its_own_normalisation(tmp_path):
    """A teacher trained on inputs normalised with 0.5/0.5 (ViT/CLIP style) sees the student's
    ImageNet-normalised batch as (x·σs + μs − 0.5) / 0.5: the same pixels, its own scaling."""
    from skd.teacher import safetensors_metadata

    path = _teacher_with(tmp_path, "resnet8_cifar", safetensors_metadata("resnet8_cifar", (0.5,) * 3, (0.5,) * 3, 32))
    cfg = get_method_config_class("kd")(name="kd", teacher="resnet8_cifar", teacher_checkpoint=str(path))
    method = create_method(cfg, timm.create_model("resnet8_cifar", num_classes=10), STUDENT_DATA)
    pixels = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    mean, std = torch.tensor(STUDENT_DATA.mean).view(1, 3, 1, 1), torch.tensor(STUDENT_DATA.std).view(1, 3, 1, 1)
    images = ((pixels - mean) / std).float()
    torch.testing.assert_close(_inputs_seen_by_teacher(method, images), ((pixels - 0.5) / 0.5).float(),
                               rtol=0, atol=1e-6)
    assert "renormalised" in method.notes()[0] and str(path) in method.notes()[0]
    # method.teacher_mean/std take precedence over what the file records.
    cfg = get_method_config_class("kd")(name="kd", teacher="resnet8_cifar", teacher_checkpoint=str(path),
                                        teacher_mean=list(STUDENT_DATA.mean), teacher_std=list(STUDENT_DATA.std))
    method = create_method(cfg, timm.create_model("resnet8_cifar", num_classes=10), STUDENT_DATA)
    assert _inputs_seen_by_teacher(method, images) is images


def test_a_teacher_with_the_students_statistics_gets_the_batch_itself(tmp_path):
    """The seeds' teachers (trained with the student's normalisation): identity, the very
    tensor, so their results are unchanged; a file without skd's record falls back to timm's
    pretrained_cfg (skd's CIFAR nets: the CIFAR-100 statistics, RepDistiller's)."""
    from skd.models._cifar import CIFAR100_MEAN, CIFAR100_STD

    path = _teacher_with(tmp_path, "resnet8_cifar")
    data = DataSpec(10, 100, 8, mean=CIFAR100_MEAN, std=CIFAR100_STD, img_size=32)
    for name in ("kd", "nkd", "ickd"):
        cfg = get_method_config_class(name)(name=name, teacher="resnet8_cifar", teacher_checkpoint=str(path))
        method = create_method(cfg, timm.create_model("resnet8_cifar", num_classes=10), data)
        images = torch.randn(2, 3, 32, 32)
        assert _inputs_seen_by_teacher(method, images) is images, name
        assert "are the same" in method.notes()[0]


def test_a_teacher_at_another_resolution_gets_resized_inputs(tmp_path):
    from skd.teacher import safetensors_metadata

    path = _teacher_with(tmp_path, "resnet8_cifar", safetensors_metadata("resnet8_cifar", STUDENT_DATA.mean,
                                                                           STUDENT_DATA.std, 48))
    cfg = get_method_config_class("kd")(name="kd", teacher="resnet8_cifar", teacher_checkpoint=str(path))
    method = create_method(cfg, timm.create_model("resnet8_cifar", num_classes=10), STUDENT_DATA)
    images = torch.randn(2, 3, 32, 32)
    seen = _inputs_seen_by_teacher(method, images)
    expected = torch.nn.functional.interpolate(images, size=(48, 48), mode="bilinear", antialias=True)
    torch.testing.assert_close(seen, expected)
    assert "resized from 32 to 48 px" in method.notes()[0]



# ------------------------------------------------------------------------------ Zipf's LS, BAKE

def _sgd_steps(method_loss, reference_loss, steps=3):
    """Train two float64 copies of one resnet8_cifar for a few SGD steps, one with the method's
    loss and one with a reference loss written after the official code, on the same batches;
    return both models (weights and BatchNorm statistics carry over from step to step)."""
    model = timm.create_model("resnet8_cifar", num_classes=C_SMALL).double()
    reference = timm.create_model("resnet8_cifar", num_classes=C_SMALL).double()
    reference.load_state_dict(model.state_dict())
    method = method_loss(model)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (method, reference))
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        batch = {"image": torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64),
                 "partner": torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64),
                 "label": torch.randint(0, C_SMALL, (8,), generator=g)}
        for m, o, loss in ((method.train(), opt, lambda: method(batch)["loss"]),
                           (reference.train(), ref_opt, lambda: reference_loss(reference, batch))):
            o.zero_grad()
            loss().backward()
            o.step()
    return model, reference


C_SMALL = 7


@pytest.mark.parametrize("upsample", ["none", "bilinear"])
def test_zipf_ls_trains_as_the_official_loop(upsample):
    """pytorch_zipfls/train.py with ``--dense``: CE + λ·zipf_loss, the dense votes the argmax of
    the classifier at every location of the last map (×2 bilinear with ``--upsample``)."""
    from test_losses import _zipf_ref
    cfg = get_method_config_class("zipf_ls")(name="zipf_ls", lam=0.1, dense_upsample=upsample)

    def official(model, batch):
        featmap = model.forward_features(batch["image"])
        logits = model.forward_head(featmap)
        tmp = featmap if upsample == "none" else torch.nn.functional.interpolate(
            featmap, scale_factor=2.0, mode=upsample, align_corners=False)
        n, c, h, w = tmp.size()
        dense = model.get_classifier()(tmp.permute(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h * w, -1).argmax(2)
        ce = torch.nn.functional.cross_entropy(logits, batch["label"])
        return ce + 0.1 * _zipf_ref(logits, batch["label"], dense)

    model, reference = _sgd_steps(lambda m: create_method(cfg, m, DataSpec(C_SMALL, 100, 8)), official)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_bake_trains_as_the_official_loop():
    """imagenet/pycls/core/trainer.py with ``INTRA_IMGS: 1`` on one process: anchors and their
    intra-class images in one batch, CE + λ·KDLoss against the ensembled targets."""
    from test_losses import _bake_kd_ref, _knowledge_ensemble_ref
    cfg = get_method_config_class("bake")(name="bake", omega=0.9)

    def official(model, batch):
        x = torch.cat([batch["image"], batch["partner"]])
        y = torch.cat([batch["label"], batch["label"]])
        feas = model.forward_features(x).mean((2, 3))
        preds = model.get_classifier()(feas)
        with torch.no_grad():
            kd_targets = _knowledge_ensemble_ref(feas.detach(), preds.detach(), 4.0, 0.9)
        return torch.nn.functional.cross_entropy(preds, y) + 1.0 * _bake_kd_ref(preds, kd_targets, 4.0)

    model, reference = _sgd_steps(lambda m: create_method(cfg, m, DataSpec(C_SMALL, 100, 8)), official)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["zipf_ls", "bake"])
def test_zipf_ls_and_bake_train_a_vit(name):
    """On a ViT the dense votes come from the patch tokens and BAKE's features from the
    pre-logits token; both train (gradients reach the patch embedding)."""
    model = timm.create_model("test_vit", num_classes=10)
    cfg = get_method_config_class(name)(name=name)
    method = create_method(cfg, model, DATA).train()
    size = model.pretrained_cfg["input_size"][1:]
    batch = {"image": torch.randn(4, 3, *size), "partner": torch.randn(4, 3, *size),
             "label": torch.randint(0, 10, (4,)), "index": torch.arange(4)}
    out = method(batch)
    out["loss"].backward()
    assert out["logits"].shape == (4, 10) and torch.isfinite(out["loss"])
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    if name == "zipf_ls":
        from skd.features import location_logits
        votes = losses.dense_votes(location_logits(model, model.forward_features(batch["image"])))
        assert torch.equal(votes.sum(1), torch.full((4,), float(model.patch_embed.num_patches)))


def test_a_teacher_statistic_that_is_not_three_values_is_a_config_error():
    from skd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config key 'method.teacher_mean' = \[1.0, 2.0\]: must hold 3 values"):
        load_config(None, ["method.name=kd", "method.teacher_mean=[1, 2]"])
    with pytest.raises(ConfigError, match=r"'method.teacher_std' .* all positive"):
        load_config(None, ["method.name=kd", "method.teacher_std=[0.5, 0, 0.5]"])


def test_teacher_statistics_are_checked_for_every_teacher_method():
    """The rule sits on the field: a method whose config has checks of its own (SP) keeps it."""
    from skd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'method.teacher_std' .* all positive"):
        load_config(None, ["method.name=sp", "method.teacher_std=[0.5, 0, 0.5]"])
    with pytest.raises(ConfigError, match=r"'method.teacher_mean' = \[1.0\]: must hold 3 values"):
        load_config(None, ["method.name=sp", "method.teacher_mean=[1]"])
