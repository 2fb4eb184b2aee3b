"""Every paper preset under configs/ loads strictly and names its source and expected number."""
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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "demo.yaml" and p.parent.name != "tables")
TABLES = sorted((CONFIGS / "tables").glob("*.yaml"))
"""A paper's table: its rows and columns, and why each cell without a preset has none."""
METRICS = {"top1", "top5", "nll", "ece", "aurc", "eaurc"}


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
    assert cfg.data.train == "" and cfg.data.val == "", "the user passes the shard directories"
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
    # The raw YAML holds every key explicitly (nothing silently inherited from the demo).
    raw = load_yaml(path)
    assert {"epochs", "data", "model", "method", "optim", "sched", "reference"} <= set(raw)


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_every_table_cell_is_one_preset_or_missing_with_a_reason(path):
    table = load_yaml(path)
    assert {"title", "source", "metric", "display", "rows", "columns", "missing"} <= set(table)
    assert table["metric"] in METRICS and table["display"] in ("accuracy", "error")
    cells: dict[tuple[str, str], str] = {}
    for preset in PRESETS:
        ref = load_yaml(preset)["reference"]
        if ref.get("table_id") != path.stem:
            continue
        assert ref["metric"] == table["metric"] and ref.get("compare") in ("best", "last"), preset.name
        cell = (ref["row"], ref["column"])
        assert cell not in cells, f"{preset.name} and {cells.get(cell)} are the same cell"
        cells[cell] = preset.name
    assert all(m.get("reason") for m in table["missing"])
    missing = {(m["row"], m["column"]) for m in table["missing"]}
    assert not missing & set(cells)
    assert missing | set(cells) == {(row, column) for row in table["rows"] for column in table["columns"]}


def test_every_table_id_names_a_table():
    named = {load_yaml(p)["reference"].get("table_id") for p in PRESETS} - {None}
    assert named <= {p.stem for p in TABLES}


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


def test_every_cell_of_the_pskd_cifar_table_has_a_preset():
    """lgcnsai/PS-KD-Pytorch README, CIFAR-100: 5 models x 5 methods."""
    models = {"PreAct ResNet-18": "preact_resnet18_cifar", "PreAct ResNet-101": "resnet101_cifar",
              "DenseNet-121": "densenet121_cifar", "ResNeXt-29": "resnext29_8x64d_cifar",
              "PyramidNet-200": "pyramidnet200_cifar"}
    methods = {"Baseline": "ce", "LS": "ls", "CS-KD": "cskd", "TF-KD": "tfkd", "PS-KD": "pskd"}
    cells = {}
    for path in CONFIGS.glob("cifar100/*.yaml"):
        raw = load_yaml(path)
        if raw["reference"]["source"].startswith("lgcnsai/PS-KD-Pytorch"):
            cells[raw["reference"]["table"]] = (raw["model"]["name"], raw["method"]["name"])
    expected = {f"CIFAR-100, {label}, {column} column": (model, method)
                for label, model in models.items() for column, method in methods.items()}
    assert cells == expected


# cls_KD configs/distillers/imagenet/*_sd_img.py: the USKDLoss ``channel`` (its weak head's input).
USKD_CHANNELS = {"resnet18": 256, "resnet50": 1024, "resnet101": 1024, "mobilenetv1_100": 512,
                 "mobilenetv2_100": 320, "regnetx_016": 408, "deit_tiny_patch16_224": 192,
                 "swin_tiny_patch4_window7_224": 384}
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
                     "deit_base_nkd_from_deit3_large.yaml"}


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
    """PS-KD's ImageNet loader (every row of its table) and pycls's pipeline (the RegNet USKD row
    and BAKE's ImageNet rows)."""
    lit = {p.relative_to(CONFIGS).as_posix() for p in PRESETS if load_config(p).data.pca_lighting}
    pycls = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("imagenet/bake/*.yaml")}
    imagenet_resnet152 = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("imagenet/resnet152_*.yaml")}
    assert lit == imagenet_resnet152 | pycls | {"imagenet/regnetx_016_uskd.yaml"}
    assert all(load_config(CONFIGS / name).data.pca_lighting == 0.1 for name in lit)


PRESETS_PAGE = CONFIGS.parent / "docs" / "presets.md"


@pytest.mark.skipif(not PRESETS_PAGE.is_file(), reason="docs/presets.md is not in this checkout")
def test_presets_page_lists_every_preset():
    """Each preset is in the table of docs/presets.md, by name or (the feature-distillation rows) by
    its method's `<method>_*.yaml` row."""
    page = PRESETS_PAGE.read_text()
    table = page[page.index("| preset | method | student ← teacher"):]
    named = set(re.findall(r"\| `([a-z0-9_/]+\.yaml)` \|", table))
    named |= set(re.findall(r"`configs/([a-z0-9_/]+\.yaml)`", (CONFIGS.parent / "docs" / "methods.md").read_text()))
    patterns = re.findall(r"\| `([a-z0-9_/]+)_\*\.yaml` \(7 pairs\)", table)
    for preset in PRESETS:
        rel = preset.relative_to(CONFIGS).as_posix()
        assert rel in named or any(rel.startswith(p + "_") for p in patterns), rel


# Presets that fill a cell of a paper's table say which: reference.table_id (a configs/tables file),
# row, column, expected (± expected_std), and whether the paper's number is the best or the last epoch.
CELL_PRESETS = [p for p in PRESETS if "table_id" in load_yaml(p)["reference"]]


@pytest.mark.parametrize("path", TABLES, ids=[p.name for p in TABLES])
def test_every_cell_of_a_table_has_a_preset_or_a_reason(path):
    table = load_yaml(path)
    assert {"title", "source", "metric", "display", "rows", "columns", "missing"} <= set(table)
    assert table["display"] in ("accuracy", "error") and table["metric"] in METRICS
    cells = {}
    for preset in CELL_PRESETS:
        ref = load_yaml(preset)["reference"]
        if ref["table_id"] == path.stem:
            cell = (ref["row"], ref["column"])
            assert cell not in cells, f"{preset.name} and {cells.get(cell)} fill one cell"
            assert ref["metric"] == table["metric"] and ref["compare"] in ("best", "last"), preset.name
            assert isinstance(ref.get("expected_std", 0.0), numbers.Real), preset.name
            cells[cell] = preset.name
    missing = {(m["row"], m["column"]): m["reason"] for m in table["missing"]}
    assert all(reason for reason in missing.values())
    grid = {(row, column) for row in table["rows"] for column in table["columns"]}
    assert set(cells) | set(missing) == grid and not set(cells) & set(missing)


def test_cell_presets_name_an_existing_table():
    assert {load_yaml(p)["reference"]["table_id"] for p in CELL_PRESETS} <= {p.stem for p in TABLES}


def test_zipfls_and_bake_presets_keep_the_official_settings():
    """Zipf's LS: the dense votes everywhere, upsampled ×2 for the ResNet-18 only (the official
    CIFAR DenseNet ignores --upsample); BAKE: one intra-class image per anchor, so a step sees
    twice data.batch_size images (512 on ImageNet), over the global batch."""
    for path in CELL_PRESETS:
        cfg = load_config(path)
        if cfg.method.name == "zipfls":
            assert cfg.method.dense
            assert cfg.method.dense_upsample == ("bilinear" if "resnet18" in cfg.model.name else "none")
        if cfg.method.name == "bake":
            assert cfg.method.intra_imgs == 1 and cfg.method.global_batch
            if path.parent.parent.name == "imagenet":
                assert 2 * cfg.data.batch_size == 512
