"""Strict configuration: presets, overrides, unknown keys, wrong types."""
import subprocess
import sys
from pathlib import Path

import pytest

from skd.cli import main as cli_main
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


def test_override_that_is_not_yaml_names_it():
    with pytest.raises(ConfigError, match=r"override 'data.train=\.\.\.': '\.\.\.' is not a YAML value"):
        load_config(None, ["data.train=..."])
    with pytest.raises(ConfigError, match=r"override 'data.mean=\[0.5': '\[0.5' is not a YAML value"):
        load_config(None, ["data.mean=[0.5"])
    assert load_config(None, ["output_dir='...'"]).output_dir == "..."


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


def test_cli_reports_bad_method_value_and_missing_data(tmp_path, capsys):
    # In this process (the console script itself is the test above): an exception would escape.
    assert cli_main(["train", "method.memory_dtype=fp8"]) == 2
    assert "method.memory_dtype' = 'fp8': must be one of" in capsys.readouterr().err
    assert cli_main(["train", f"data.train={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "nowhere" in capsys.readouterr().err


def _all_keys() -> set[str]:
    """Every config key, walked from the dataclasses themselves."""
    import dataclasses
    import typing

    from skd.config import TrainConfig
    from skd.methods import get_method_config_class, list_methods

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            elif f.name != "method":
                yield prefix + f.name

    keys = set(walk(TrainConfig, ""))
    for name in list_methods():
        keys |= set(walk(get_method_config_class(name), "method."))
    return keys


def test_train_help_lists_every_config_key_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    keys = _all_keys()
    assert len(keys) > 60
    missing = [k for k in keys if f"\n  {k}  (" not in text]
    assert not missing
    assert "  data.batch_size  (int = 128; >= 1)\n      Global batch per optimizer step" in text
    assert "fields of method.name=pskd:\n  method.alpha_T  (float = 0.8; >= 0 and <= 1)" in text


def test_skd_config_prints_yaml_that_resolves_to_the_same_config(tmp_path, capsys):
    from skd.cli import main as skd_main
    preset = ROOT / "configs" / "fine_grained" / "resnet18_cskd_cub200.yaml"
    args = ["--config", str(preset), "method.lam=2", "data.train=/x", "seed=3"]
    assert skd_main(["config", *args]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_config(resolved) == load_config(preset, args[2:])
    assert skd_main(["config", "data.bach_size=3"]) == 2
    assert "did you mean 'data.batch_size'" in capsys.readouterr().err


def test_resume_allow_changes_takes_the_keys_the_resume_check_compares():
    """``model.kwargs`` is one key to the resume check (an empty one included): it can be allowed
    to change, and lets the resume through; a key inside it is not a config key."""
    from skd.config import config_to_dict
    from skd.resume import check_resume_config

    old = load_config(None, ["model.kwargs={drop_rate: 0.1}"])
    new = load_config(None, ["resume_allow_changes=[model.kwargs]"])
    check_resume_config({"config": config_to_dict(old)}, new)  # allowed: no error
    with pytest.raises(ConfigError, match=r"resume: the config differs .* model.kwargs"):
        check_resume_config({"config": config_to_dict(old)}, load_config(None, []))
    with pytest.raises(ConfigError, match="'model.kwargs.drop_rate' is not a config key"):
        load_config(None, ["model.kwargs={drop_rate: 0.2}", "resume_allow_changes=[model.kwargs.drop_rate]"])
