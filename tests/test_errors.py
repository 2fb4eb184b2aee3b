"""What every command does with bad input and with bugs: bad input is one line naming the file,
key or value and exit status 2; anything else keeps its traceback (exit status 1); no file is ever
unpickled into objects, and no message advises doing so."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import skd.config_docs
import skd.convert
import skd.data.dali_loader
import skd.data.shard_cmd
import skd.evaluate
import skd.report
import skd.train
import skd.weights
from skd.bench.loader import build_parser as loader_parser
from skd.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from skd.cli import main as skd_main
from skd.config import ModelConfig, build_config, config_to_dict, load_config, save_config
from skd.config_docs import config_keys, format_defaults_note
from skd.convert import build_parser as convert_parser
from skd.data.shard_cmd import build_parser as shard_parser
from skd.environment import check_environment
from skd.errors import CheckpointError, ConfigError
from skd.evaluate import evaluate_target
from skd.models.factory import create_model
from skd.resume import select_checkpoint
from skd.teacher import load_teacher
from test_data_loader import write_shards

EVAL = ["data.num_workers=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory as training leaves it (config.yaml, model.safetensors, a checkpoint) for a
    resnet8_cifar with random weights on 40 small digit images."""
    root = tmp_path_factory.mktemp("errors")
    shards = write_shards(root / "shards", [20, 20])
    cfg = load_config(None, ["model.name=resnet8_cifar", "method.name=ce", f"data.train={shards}",
                             f"data.val={shards}", "data.img_size=16", "data.train_crop=pad_crop",
                             "data.crop_pct=1.0", "data.num_workers=0", "data.batch_size=20"])
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    weights = create_model(cfg.model, 10).state_dict()
    save_file(weights, str(run / "model.safetensors"))
    torch.save({"format": CHECKPOINT_FORMAT, "config": config_to_dict(cfg),
                "method": {f"model.{k}": v for k, v in weights.items()}}, run / "checkpoints" / "step-000000002.pt")
    return run


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err[-3000:]
    assert "weights_only" not in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------- every command: 2 or a traceback
def test_every_command_reports_bad_input_in_one_line_with_exit_status_2(run, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    configs = tmp_path / "configs"
    (configs / "cifar").mkdir(parents=True)
    (configs / "cifar" / "a.yaml").write_text("epochs: 1\n")
    cases = {
        "train": (["train", "data.batch_size=0"], "config key 'data.batch_size' = 0: must be >= 1"),
        "eval": (["eval", str(missing)], f"{missing} does not exist"),
        "config": (["config", "--config", str(configs)],
                   f"config file {configs} is a directory; give a YAML file such as {configs}/cifar/a.yaml"),
        "report": (["report", str(missing)], f"{missing} is not a run directory"),
        "shard": (["shard", str(missing), str(tmp_path / "out"), "--no-progress"], f"{missing}: not a directory"),
        "convert": (["convert", "mmcls", str(missing), str(tmp_path / "out.safetensors"), "--model", "resnet18"],
                    f"mmcls checkpoint {missing} does not exist"),
    }
    for command, (argv, expected) in cases.items():
        assert skd_main(argv) == 2, command
        assert expected in _one_error_line(capsys, f"skd {command}"), command


def _bug(*args, **kwargs):
    raise ValueError("an injected bug")


@pytest.mark.parametrize("command", ["train", "eval", "config", "report", "shard", "convert"])
def test_a_bug_is_not_bad_input_it_propagates_with_its_traceback(command, run, tmp_path, monkeypatch):
    """A ValueError from inside skd is a bug: no command turns it into the one-line exit 2 of bad
    input (`skd train` did, for anything raised while building)."""
    cfg = load_config(run / "config.yaml")
    places = {
        "train": (skd.train, "create_data_loader", ["train", f"data.train={cfg.data.train}", f"data.val={cfg.data.val}",
                                                    "log_with=[]", f"output_dir={tmp_path / 'new'}"]),
        "eval": (skd.evaluate, "create_data_loader", ["eval", str(run), *EVAL]),
        "config": (skd.config_docs, "config_to_dict", ["config"]),
        "report": (skd.report, "load_run", ["report", str(run)]),
        "shard": (skd.data.shard_cmd, "list_input", ["shard", str(tmp_path), str(tmp_path / "out")]),
        "convert": (skd.weights, "load_state_dict_file",
                    ["convert", "mmcls", str(run / "model.safetensors"), str(tmp_path / "o.safetensors"),
                     "--model", "resnet18"]),
    }
    module, name, argv = places[command]
    monkeypatch.setattr(module, name, _bug)
    with pytest.raises(ValueError, match="an injected bug"):
        skd_main(argv)


def test_a_bug_ends_the_process_with_its_traceback_and_exit_status_1():
    """What the interpreter makes of a command body's bug that run_command lets through."""
    code = ("import sys\n"
            "from skd.errors import run_command\n"
            "def body(): raise RuntimeError('an injected bug')\n"
            "sys.exit(run_command('skd x', body))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and done.stderr.strip().endswith("RuntimeError: an injected bug")


def test_skd_debug_shows_the_traceback_of_bad_input_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SKD_DEBUG", "1")
    assert skd_main(["config", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1] == f"skd config: error: config file {tmp_path / 'missing.yaml'} does not exist"


# ------------------------------------------------------------------------- never unsafe advice
class _RunsCodeWhenUnpickled:
    """Unpickling this calls open(marker, "w"): the marker file appears if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickle_that_would_run_code_is_refused_everywhere_and_never_run(run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": _RunsCodeWhenUnpickled(marker)}, evil)
    refusal = f"{evil} is not a file skd can load safely: it holds Python objects"
    loads = {
        "checkpoint": lambda: load_checkpoint(evil),
        "teacher": lambda: load_teacher("resnet8_cifar", evil, num_classes=10),
        "model.checkpoint": lambda: create_model(ModelConfig(name="resnet8_cifar", checkpoint=str(evil)), 10),
        "resume": lambda: select_checkpoint(tmp_path / "resumed", str(evil)),
    }
    for what, load in loads.items():
        with pytest.raises((CheckpointError, ConfigError)) as caught:
            load()
        assert refusal in str(caught.value) and "weights_only" not in str(caught.value), what
    assert skd_main(["eval", str(evil)]) == 2
    assert refusal in _one_error_line(capsys, "skd eval")
    assert skd_main(["convert", "mmcls", str(evil), str(tmp_path / "out.safetensors"), "--model", "resnet18"]) == 2
    assert refusal in _one_error_line(capsys, "skd convert")
    # A plain pickle (not torch's format) is refused the same way, without being unpickled.
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"weights": _RunsCodeWhenUnpickled(marker)}, f)
    with pytest.raises(CheckpointError, match="is not a file skd can load safely: it is a pickle of Python objects"):
        load_teacher("resnet8_cifar", tmp_path / "plain.pkl", num_classes=10)
    assert not marker.exists()


# --------------------------------------------------------------------------------- skd eval
def test_eval_of_bad_input_is_one_line_naming_the_file(run, tmp_path, capsys):
    checkpoint = run / "checkpoints" / "step-000000002.pt"
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(checkpoint.read_bytes()[:4000])
    bare = tmp_path / "bare.pt"
    torch.save(timm.create_model("resnet8_cifar", num_classes=10).state_dict(), bare)
    shards = tmp_path / "truncated"
    shards.mkdir()
    for file in Path(load_config(run / "config.yaml").data.val).iterdir():
        (shards / file.name).write_bytes(file.read_bytes())
    tar = shards / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    cases = [
        ([str(checkpoint), f"data.val={shards}"], f"{tar}: the file is truncated"),
        ([str(damaged)], f"checkpoint {damaged} does not load: it is damaged (e.g. truncated) or not a torch file"),
        ([str(bare)], f"checkpoint {bare} is not an skd checkpoint (OrderedDict without skd's format tag"),
        ([str(run / "model.safetensors"), "model.name=resnet20_cifar"],
         f"{run / 'model.safetensors'} does not fit model 'resnet20_cifar' with 10 classes"),
        ([str(no_config)], f"{no_config / 'config.yaml'} is missing"),
        ([str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'} does not exist"),
        ([str(tmp_path)], f"{tmp_path} is not a run directory"),
    ]
    for argv, expected in cases:
        assert skd_main(["eval", *argv, *EVAL]) == 2, argv
        assert expected in _one_error_line(capsys, "skd eval"), argv
    assert skd_main(["eval", str(run / "model.safetensors"), "model.name=resnet20_cifar"]) == 2
    assert "missing layer1.1.conv1.weight" in capsys.readouterr().err  # resnet20 has 3 blocks per stage, resnet8 1


def test_a_dali_trained_run_is_evaluated_with_the_torch_backend_where_dali_is_absent(run, tmp_path, monkeypatch,
                                                                                     capsys):
    dali_run = tmp_path / "dali_run"
    dali_run.mkdir()
    (dali_run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    save_config(load_config(run / "config.yaml", ["data.backend=dali"]), dali_run / "config.yaml")
    real = skd.data.dali_loader.importlib.util.find_spec
    monkeypatch.setattr(skd.data.dali_loader.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("nvidia") else real(name, *a))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # an import of it fails
    monkeypatch.setattr(skd.data.dali_loader, "create_dali_loader", _bug)
    assert evaluate_target(dali_run, EVAL) == evaluate_target(run, EVAL)
    # Asked for explicitly, DALI must be there.
    assert skd_main(["eval", str(dali_run), "data.backend=dali", *EVAL]) == 2
    assert "config key 'data.backend' = 'dali': NVIDIA DALI is not installed" in _one_error_line(capsys, "skd eval")


# ------------------------------------------------------------------ what a config checks, and when
def test_a_config_loads_anywhere_and_the_run_checks_the_machine(monkeypatch):
    real = skd.data.dali_loader.importlib.util.find_spec
    monkeypatch.setattr(skd.data.dali_loader.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("nvidia") else real(name, *a))
    dali = load_config(None, ["data.backend=dali", "data.color_jitter=0.4", "model.name=resnet8_cifr",
                              "optim.opt=sgdd", "method.name=kd", "method.teacher=resnet8x4_cifr"])
    assert build_config(config_to_dict(dali)) == dali  # it loads, and round-trips
    checks = [("model.name' = 'resnet8_cifr': not a timm model (did you mean resnet8_cifar", {}),
              ("method.teacher' = 'resnet8x4_cifr': not a timm model (did you mean resnet8x4_cifar",
               {"model": {"name": "resnet8_cifar"}}),
              ("optim.opt' = 'sgdd': not a timm optimizer (did you mean sgd", {"method": {"teacher": "resnet8x4_cifar"}}),
              ("data.backend' = 'dali': NVIDIA DALI is not installed", {"optim": {"opt": "sgd"}})]
    raw = config_to_dict(dali)
    for expected, fix in checks:
        for section, values in fix.items():
            raw[section].update(values)
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
            check_environment(build_config(raw))
    # Evaluation needs the model, not the optimizer, the teacher or the training augmentation.
    monkeypatch.setattr(skd.data.dali_loader.importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    raw.update(optim={"opt": "sgdd"}, method={"name": "kd", "teacher": "nope"})
    check_environment(build_config(raw), evaluation=True)
    with pytest.raises(ConfigError, match="'data.color_jitter' = 0.4: not available with data.backend=dali"):
        check_environment(build_config({**raw, "optim": {"opt": "sgd"}, "method": {"name": "ce"}}))


# ----------------------------------------------------------------------- model.checkpoint
def test_model_checkpoint_names_the_file_and_what_does_not_fit(run, tmp_path, capsys):
    source = timm.create_model("resnet8_cifar", num_classes=10)
    # An skd checkpoint's student, a wrapped state_dict and an export all load, strictly.
    for file in (run / "checkpoints" / "step-000000002.pt", run / "model.safetensors"):
        model = create_model(ModelConfig(name="resnet8_cifar", checkpoint=str(file)), 10)
        for k, v in model.state_dict().items():
            assert torch.equal(v, load_checkpoint(run / "checkpoints" / "step-000000002.pt")["method"][f"model.{k}"]), k
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    model = create_model(ModelConfig(name="resnet8_cifar", checkpoint=str(wrapped)), 10)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(CheckpointError, match=f"model.checkpoint {junk} is not a valid safetensors file"):
        create_model(ModelConfig(name="resnet8_cifar", checkpoint=str(junk)), 10)
    with pytest.raises(CheckpointError, match=rf"model.checkpoint {wrapped} does not fit model 'resnet8_cifar' with "
                                              rf"100 classes: shape of fc.weight \[10, 64\] \(model: \[100, 64\]\)"):
        create_model(ModelConfig(name="resnet8_cifar", checkpoint=str(wrapped)), 100)
    # Through `skd train`: the message names the file (it used to be empty).
    data = load_config(run / "config.yaml").data
    missing = tmp_path / "missing.safetensors"
    assert skd_main(["train", "model.name=resnet8_cifar", "method.name=ce", "log_with=[]", f"data.train={data.train}",
                     f"data.val={data.val}", f"model.checkpoint={missing}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert _one_error_line(capsys, "skd train").endswith(f"model.checkpoint {missing} does not exist")


# ------------------------------------------------------------------------------- help texts
def test_help_lists_every_key_once_and_says_what_the_demo_sets():
    keys = [k.key for k in config_keys() if not k.methods]
    assert len(keys) == len(set(keys)) and "method.name" in keys
    note = " ".join(format_defaults_note().split())
    assert "the dataclasses' own" in note and "epochs=12" in note and "model.name=resnet8_cifar" in note
    for parser in (loader_parser(), shard_parser(), convert_parser()):
        undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "framework"]
        assert not undocumented, (parser.prog, undocumented)
