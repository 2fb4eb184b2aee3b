"""Every paper preset under configs/ loads strictly and names its source, expected number and
table cell; every cell of every table in configs/tables/ has exactly one preset or a stated reason."""
from __future__ import annotations

import functools
import json
import numbers
import re
from pathlib import Path

import pytest
import timm
import torch

import skd.models  # noqa: F401  registers the CIFAR nets with timm
from skd.config import load_config, load_yaml
from skd.environment import check_environment
from skd.features import mid_feature_index, pooled_feature_channels
from skd.methods import list_methods
from skd.presets import COMPARE_CHOICES, list_presets
from skd.tables import list_tables, load_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "demo.yaml" and p.parent.name != "tables")
METRICS = {"top1", "top5", "nll", "ece", "aurc", "eaurc"}
DIGITS = CONFIGS / "digits"
"""The demo table's presets train on the built-in digits; every other preset leaves the data to the user."""


@functools.lru_cache(maxsize=None)
def _meta_model(name: str, kwargs_json: str) -> torch.nn.Module:
    """The preset's timm model with its kwargs, on the meta device (no memory, no init cost);
    one build per distinct (name, kwargs)."""
    with torch.device("meta"):
        return timm.create_model(name, **json.loads(kwargs_json))


def _build(name: str, kwargs: dict) -> torch.nn.Module:
    return _meta_model(name, json.dumps(kwargs, sort_keys=True))


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_preset_loads_and_names_its_reference(path):
    cfg = load_config(path)  # strict: an unknown key or a wrong type raises
    check_environment(cfg)  # model, teacher and optimizer names known to timm
    data = "digits" if path.parent == DIGITS else ""
    assert cfg.data.train == data and cfg.data.val == data, "the user passes the shard directories"
    assert timm.is_model(cfg.model.name), cfg.model.name
    _build(cfg.model.name, cfg.model.kwargs)  # the model kwargs are ones timm accepts
    if hasattr(cfg.method, "teacher_checkpoint") and getattr(cfg.method, "mode", "self") == "self":
        assert timm.is_model(cfg.method.teacher), cfg.method.teacher
        assert cfg.method.teacher_checkpoint == "", "the user supplies the teacher weights"
        _build(cfg.method.teacher, cfg.method.teacher_kwargs)

    ref = cfg.reference
    assert isinstance(ref.get("source"), str) and ref["source"], "reference.source"
    assert isinstance(ref.get("table"), str) and ref["table"], "reference.table"
    assert ref.get("metric") in METRICS, "reference.metric must be a metrics.json key"
    assert isinstance(ref.get("expected"), numbers.Real), "reference.expected"
    if ref["metric"] in ("top1", "top5"):
        assert 0 < ref["expected"] < 100
    # The structured fields that place the preset in its table (skd.tables, skd report --paper).
    assert all(isinstance(ref.get(k), str) and ref[k] for k in ("table_id", "row", "column", "dataset"))
    assert ref.get("compare") in COMPARE_CHOICES
    assert ref.get("expected_std") is None or ref["expected_std"] > 0
    assert (ref["compare"] == "ema") == cfg.ema.enabled, "EMA weights are what an EMA recipe reports"
    # The raw YAML holds every key explicitly (nothing silently inherited from the demo).
    raw = load_yaml(path)
    assert {"epochs", "data", "model", "method", "optim", "sched", "reference"} <= set(raw)


def test_presets_cover_every_seed_method():
    used = {load_yaml(p)["method"]["name"] for p in PRESETS}
    assert used >= {"ce", "ls", "cskd", "tfkd", "pskd", "kd", "nkd", "uskd", "ickd"}
    assert used <= set(list_methods())


REPORTED = [p for p in PRESETS if "top-1 err" in load_yaml(p)["reference"].get("reported", "")]


@pytest.mark.parametrize("path", REPORTED, ids=[str(p.relative_to(CONFIGS)) for p in REPORTED])
def test_expected_accuracies_match_the_reported_errors(path):
    """The papers report errors; expected (and expected_other.top5) are 100 minus them."""
    ref = load_yaml(path)["reference"]
    errors = dict(re.findall(r"(top-[15]) err ([\d.]+)", ref["reported"]))
    assert ref["expected"] == pytest.approx(100 - float(errors["top-1"]), abs=1e-9)
    if "top-5" in errors:
        assert ref["expected_other"]["top5"] == pytest.approx(100 - float(errors["top-5"]), abs=1e-9)


@pytest.mark.parametrize("table", list_tables(), ids=lambda t: t.table_id)
def test_every_table_cell_has_exactly_one_preset_or_a_reason(table):
    assert table.coverage_problems() == []
    cells = table.cells()
    assert [(c.row, c.column) for c in cells] == [(r, c) for r in table.rows for c in table.columns]
    for cell in cells:
        assert (cell.preset is None) == bool(cell.reason)


def test_every_preset_names_an_existing_table_row_and_column():
    tables = {t.table_id: t for t in list_tables()}
    assert len(list_presets()) == len(PRESETS)
    for preset in list_presets():
        table = tables.get(preset.table_id)
        assert table is not None, f"{preset.name}: no table {preset.table_id!r}"
        assert preset.row in table.rows and preset.column in table.columns, preset.name


def test_the_seed_tables_and_their_sizes():
    """The tables skd reproduces, with their cell counts (docs/presets.md quotes them)."""
    sizes = {t.table_id: (len(t.rows) * len(t.columns), sum(c.preset is not None for c in t.cells()))
             for t in list_tables()}
    assert sizes == {"pskd-cifar100": (25, 25), "pskd-imagenet": (10, 5), "cskd-resnet18": (10, 10),
                     "ickd-cifar100": (105, 104), "nkd-imagenet": (8, 8), "uskd-imagenet": (18, 18),
                     "byot-cifar100": (8, 2), "zipfls-cifar100": (4, 4), "zipfls-tinyimagenet": (18, 8),
                     "bake-imagenet": (9, 9), "bake-small-scale": (10, 6), "demo": (3, 3)}


def test_pskd_cifar_cells_hold_their_model_and_method():
    """lgcnsai/PS-KD-Pytorch README, CIFAR-100: 5 models x 5 methods."""
    models = {"PreAct ResNet-18": "preact_resnet18_cifar", "PreAct ResNet-101": "resnet101_cifar",
              "DenseNet-121": "densenet121_cifar", "ResNeXt-29": "resnext29_8x64d_cifar",
              "PyramidNet-200": "pyramidnet200_cifar"}
    methods = {"Baseline": "ce", "LS": "ls", "CS-KD": "cskd", "TF-KD": "tfkd", "PS-KD": "pskd"}
    for cell in load_table("pskd-cifar100").cells():
        raw = load_yaml(cell.preset.path)
        assert (raw["model"]["name"], raw["method"]["name"]) == (models[cell.row], methods[cell.column])
        assert cell.preset.compare == "best" and cell.expected == raw["reference"]["expected"]


# cls_KD configs/distillers/imagenet/*_sd_img.py: the USKDLoss ``channel`` (its weak head's input).
# ShuffleNetV2's config says 484, which no stage of the net has: its fea_s[-2] is the 464-channel stage4.
USKD_CHANNELS = {"resnet18": 256, "resnet50": 1024, "resnet101": 1024, "mobilenetv1_100": 512,
                 "mobilenetv2_100": 320, "regnetx_016": 408, "deit_tiny_patch16_224": 192,
                 "swin_tiny_patch4_window7_224": 384, "shufflenet_v2_x1_0": 464}
USKD_IMAGENET = [p for p in PRESETS
                 if p.parent.name == "imagenet" and load_yaml(p)["method"]["name"] == "uskd"]


@pytest.mark.parametrize("path", USKD_IMAGENET, ids=[p.name for p in USKD_IMAGENET])
def test_uskd_weak_head_reads_the_official_feature(path):
    cfg = load_config(path)
    model = _build(cfg.model.name, cfg.model.kwargs)
    index = mid_feature_index(model) if cfg.method.feature_index is None else cfg.method.feature_index
    assert pooled_feature_channels(model, index) == USKD_CHANNELS[cfg.model.name]


MIXUP_PRESETS = [p for p in PRESETS if load_yaml(p).get("mixup")]


def test_mixup_presets_are_the_cls_kd_vit_rows():
    names = {p.name for p in MIXUP_PRESETS}
    assert names == {"deit_tiny_uskd.yaml", "swin_tiny_uskd.yaml", "deit_tiny_nkd_from_deit3_small.yaml",
                     "deit_base_nkd_from_deit3_large.yaml", "deit_tiny_ce.yaml", "swin_tiny_ce.yaml",
                     "deit_base_ce.yaml"}


@pytest.mark.parametrize("path", MIXUP_PRESETS, ids=[p.name for p in MIXUP_PRESETS])
def test_vit_presets_build_the_official_optimizer(path):
    """mmcls's AdamW of the DeiT/Swin recipe: eps 1e-8, betas (0.9, 0.999), weight decay 0.05 on
    every parameter except norms, biases (all 1-d parameters) and the model's no_weight_decay()
    names (cls_token, pos_embed; Swin's relative_position_bias_table)."""
    from timm.optim import create_optimizer_v2

    from skd.optim import optimizer_kwargs, param_groups

    cfg = load_config(path)
    assert cfg.mixup.enabled and cfg.mixup.label_smoothing == 0.1
    model = _build(cfg.model.name, cfg.model.kwargs)
    optimizer = create_optimizer_v2(param_groups(model, [], cfg.optim), **optimizer_kwargs(cfg.optim))
    assert type(optimizer).__name__ == "AdamW"
    assert optimizer.defaults["eps"] == 1e-8 and tuple(optimizer.defaults["betas"]) == (0.9, 0.999)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    skip = model.no_weight_decay()
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if p.ndim <= 1 or name in skip else 0.05), name


def test_pca_lighting_where_the_official_pipeline_has_it():
    """PS-KD's ImageNet loader (every row of its table) and pycls's pipeline (the RegNet rows of the
    USKD table and BAKE's ImageNet rows)."""
    lit = {p.relative_to(CONFIGS).as_posix() for p in PRESETS if load_config(p).data.pca_lighting}
    pycls = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("imagenet/bake/*.yaml")}
    imagenet_resnet152 = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("imagenet/resnet152_*.yaml")}
    assert lit == imagenet_resnet152 | pycls | {"imagenet/regnetx_016_uskd.yaml", "imagenet/regnetx_016_ce.yaml"}
    assert all(load_config(CONFIGS / name).data.pca_lighting == 0.1 for name in lit)


def test_docs_list_every_preset():
    """Each preset is in docs/presets.md's tables, by name or (the feature-distillation rows) by its
    method's `<method>_*.yaml` row."""
    doc = (CONFIGS.parent / "docs" / "presets.md").read_text()
    named = set(re.findall(r"\| `([a-z0-9_/]+\.yaml)` \|", doc))
    patterns = re.findall(r"\| `([a-z0-9_/]+)_\*\.yaml` \(\d pairs\)", doc)
    for preset in PRESETS:
        rel = preset.relative_to(CONFIGS).as_posix()
        assert rel in named or any(rel.startswith(p + "_") for p in patterns), rel


def test_zipf_ls_and_bake_presets_keep_the_official_settings():
    """Zipf's LS: the dense votes everywhere, upsampled ×2 for the ResNet-18 only (the official
    CIFAR DenseNet ignores --upsample); BAKE: one intra-class image per anchor, so a step sees
    twice data.batch_size images (512 on ImageNet), over the global batch."""
    for path in PRESETS:
        cfg = load_config(path)
        if cfg.method.name == "zipf_ls":
            assert cfg.method.dense
            assert cfg.method.dense_upsample == ("bilinear" if "resnet18" in cfg.model.name else "none")
        if cfg.method.name == "bake":
            assert cfg.method.intra_imgs == 1 and cfg.method.global_batch
            if path.parent.parent.name == "imagenet":
                assert 2 * cfg.data.batch_size == 512
