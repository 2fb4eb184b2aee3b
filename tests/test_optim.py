"""Optimizer parameter groups come from the student as timm builds them, extra modules apart."""
import pytest
import torch
import timm
from timm.scheduler import create_scheduler_v2

from skd.config import OptimConfig, SchedConfig
from skd.methods import DataSpec, create_method, get_method_config_class
from skd.optim import create_optimizer, scheduler_kwargs


def _uskd_on_a_vit():
    student = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
    cfg = get_method_config_class("uskd")(name="uskd")
    return create_method(cfg, student, DataSpec(num_classes=10, num_samples=100, batch_size=8))


def _group_of(optimizer, param):
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group


def test_no_weight_decay_names_norms_and_extra_modules():
    method = _uskd_on_a_vit()
    student = method.model
    opt = create_optimizer(method, OptimConfig(opt="adamw", lr=1e-3, weight_decay=0.05, wd_exclude_norm_bias=True))
    # Every trainable parameter of the method is optimized exactly once.
    optimized = [p for g in opt.param_groups for p in g["params"]]
    assert len(optimized) == len({id(p) for p in optimized}) == len(list(method.parameters()))
    # timm's ViT no_weight_decay(): pos_embed and cls_token (the method wrapper has no such list).
    assert {"pos_embed", "cls_token"} <= set(student.no_weight_decay())
    assert _group_of(opt, student.pos_embed)["weight_decay"] == 0.0
    assert _group_of(opt, student.cls_token)["weight_decay"] == 0.0
    assert _group_of(opt, student.blocks[0].norm1.weight)["weight_decay"] == 0.0
    assert _group_of(opt, student.blocks[0].attn.qkv.weight)["weight_decay"] == 0.05
    # USKD's weak head: its own groups, decayed like the student (its bias is 1-d).
    head = _group_of(opt, method.weak_head.weight)
    assert head["weight_decay"] == 0.05 and all(p is not student.head.weight for p in head["params"])
    assert _group_of(opt, method.weak_head.bias)["weight_decay"] == 0.0
    # The seeds' default: decay on everything except the model's own no_weight_decay() names.
    plain = create_optimizer(method, OptimConfig(weight_decay=5e-4))
    assert _group_of(plain, student.blocks[0].norm1.weight)["weight_decay"] == 5e-4
    assert _group_of(plain, method.weak_head.bias)["weight_decay"] == 5e-4
    assert _group_of(plain, student.pos_embed)["weight_decay"] == 0.0


def test_layer_decay_uses_the_students_group_matcher():
    method = _uskd_on_a_vit()
    student = method.model
    opt = create_optimizer(method, OptimConfig(opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5))
    scale = {name: _group_of(opt, p).get("lr_scale", 1.0) for name, p in student.named_parameters()}
    depth = len(student.blocks)
    # Embeddings at the bottom, then one layer per block, the head on top (timm's group_matcher).
    assert scale["patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert scale[f"blocks.{depth - 1}.mlp.fc1.weight"] == 0.5
    assert scale["head.weight"] == 1.0
    assert _group_of(opt, method.weak_head.weight).get("lr_scale", 1.0) == 1.0
    # timm's schedulers apply lr_scale.
    sched, _ = create_scheduler_v2(opt, **scheduler_kwargs(SchedConfig(sched="cosine", warmup_epochs=0), 10, 5))
    sched.step(0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(student.blocks[0].attn.qkv.weight)] == pytest.approx(1e-3 * 0.5 ** depth)
    assert lr_of[id(method.weak_head.weight)] == pytest.approx(1e-3)


@pytest.mark.parametrize("step_on_epochs", [True, False])
def test_multistep_milestone_m_decays_from_epoch_m_on(step_on_epochs):
    """The trainer sets an epoch's lr with step(epoch) before it and step_update(k) after update k."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    updates = 4
    cfg = SchedConfig(sched="multistep", decay_milestones=[3, 5], decay_rate=0.1, step_on_epochs=step_on_epochs)
    sched, _ = create_scheduler_v2(opt, **scheduler_kwargs(cfg, num_epochs=7, updates_per_epoch=updates))
    lrs, k = [], 0
    for epoch in range(7):
        sched.step(epoch)
        for _ in range(updates):
            lrs.append((epoch, opt.param_groups[0]["lr"]))
            k += 1
            sched.step_update(k)
    expected = [(e, 0.1 if e < 3 else 0.01 if e < 5 else 0.001) for e in range(7) for _ in range(updates)]
    assert [(e, pytest.approx(lr)) for e, lr in expected] == lrs
