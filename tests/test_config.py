"""Strict configuration: presets, overrides, unknown keys, wrong types."""
import subprocess
import sys
from pathlib import Path

import pytest

from skd.config import ConfigError, load_config, parse_overrides
from skd.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_nested_and_typed():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x", "e=null", "f=0.5"]) == {
        "a": {"b": 1, "c": [1, 2]}, "d": "x", "e": None, "f": 0.5}
    cfg = load_config(None, ["data.batch_size=32", "optim.lr=1", "method.name=ls", "method.smoothing=0.2"])
    assert cfg.data.batch_size == 32 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert cfg.method.name == "ls" and cfg.method.smoothing == 0.2


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.bach_size' \(did you mean 'data.batch_size'\?\)"):
        load_config(None, ["data.bach_size=3"])
    # method keys are checked against the chosen method's own config
    with pytest.raises(ConfigError, match=r"'method.alpha_t'.*did you mean 'method.alpha_T'"):
        load_config(None, ["method.alpha_t=0.5"])
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(None, ["method.name=nope"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        load_config(None, ["epochs=ten"])
    with pytest.raises(ConfigError, match="'precision'"):
        load_config(None, ["precision=fp8"])


def test_preset_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown config key 'optim.weight_decy'.*'optim.weight_decay'"):
        load_config(bad)
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optim.learning_rate' \(valid keys: optim.opt, optim.lr, "):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exits_nonzero_naming_the_key(capsys):
    assert train_main(["data.bach_size=3"]) == 2
    assert "data.bach_size" in capsys.readouterr().err


def test_demo_preset_file_equals_the_embedded_demo():
    assert load_config(ROOT / "configs" / "demo.yaml") == load_config(None)


def test_console_script_reports_unknown_key():
    out = subprocess.run([sys.executable, "-m", "skd", "train", "model.nmae=x"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown config key 'model.nmae' (did you mean 'model.name'?)" in out.stderr


def test_console_script_reports_bad_method_value_and_missing_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "skd", "train", "method.memory_dtype=fp8"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "method.memory_dtype must be one of" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "skd", "train", f"data.train={tmp_path / 'nowhere'}",
                          f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert out.returncode == 2 and "nowhere" in out.stderr and "Traceback" not in out.stderr
