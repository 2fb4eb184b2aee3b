"""Every paper preset under configs/ loads strictly and names its source and expected number."""
from __future__ import annotations

import numbers
from pathlib import Path

import pytest
import timm

import skd.models  # noqa: F401  registers the CIFAR nets with timm
from skd.config import load_config, load_yaml
from skd.methods import list_methods

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "demo.yaml")
METRICS = {"top1", "top5", "nll", "ece", "aurc", "eaurc"}


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_preset_loads_and_names_its_reference(path):
    cfg = load_config(path)  # strict: an unknown key or a wrong type raises
    assert cfg.data.train == "" and cfg.data.val == "", "the user passes the shard directories"
    assert timm.is_model(cfg.model.name), cfg.model.name
    if hasattr(cfg.method, "teacher_checkpoint") and getattr(cfg.method, "mode", "self") == "self":
        assert timm.is_model(cfg.method.teacher), cfg.method.teacher
        assert cfg.method.teacher_checkpoint == "", "the user supplies the teacher weights"

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


def test_presets_cover_every_seed_method():
    used = {load_yaml(p)["method"]["name"] for p in PRESETS}
    assert used >= {"ce", "ls", "cskd", "tfkd", "pskd", "kd", "nkd", "uskd", "ickd"}
    assert used <= set(list_methods())
