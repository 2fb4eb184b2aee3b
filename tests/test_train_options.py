"""Run options a newcomer meets first: a quick try with ``max_steps``, loader workers capped to
the cores there are, a batch larger than the dataset, and ``precision=fp16`` without a GPU."""
from __future__ import annotations

import json
import os

import pytest

from skd.checkpoint import latest_checkpoint, load_checkpoint
from skd.config import load_config
from skd.train import main as train_main, train

pytestmark = pytest.mark.slow

FAST = ["model.name=resnet8_cifar", "log_with=[]", "data.batch_size=64", "data.num_workers=0",
        "log_every=5", "sched.warmup_epochs=0"]


def test_max_steps_stops_early_and_writes_everything_a_run_writes(tmp_path, capsys):
    run = tmp_path / "quick"
    metrics = train(load_config(None, FAST + ["epochs=3", "max_steps=5", f"output_dir={run}"]))
    out = capsys.readouterr().out
    assert (f"stopped after max_steps=5 optimizer steps (epoch 0 of 3); continue with the same command and "
            f"output_dir={run} resume=auto max_steps=0 resume_allow_changes=[max_steps]") in out
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # A partial epoch is no best epoch: it is trained to its end when the run continues.
    assert metrics["num_samples"] == 360 and "best" not in metrics
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 5)]
    state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 5 and (state["loader"]["epoch"], state["loader"]["batches"]) == (0, 5)
    for name in ("model.safetensors", "predictions.npz"):
        assert (run / name).is_file(), name
    assert not (run / "model_best.safetensors").exists() and not (run / "checkpoints" / "best.pt").exists()
    # The quick try continues into the full run.
    train(load_config(None, FAST + ["epochs=1", f"output_dir={run}", "resume=auto",
                                    "resume_allow_changes=[max_steps, epochs]"]))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 23)]
    assert json.loads((run / "metrics.json").read_text())["best"]["epoch"] == 0  # the whole epoch 0


def test_more_workers_than_cores_are_capped_with_a_note(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    run = tmp_path / "run"
    train(load_config(None, [a for a in FAST if not a.startswith("data.num_workers")] + [
        f"data.num_workers={cores + 3}", "max_steps=1", f"output_dir={run}"]))
    out = capsys.readouterr().out
    assert f"note: data.num_workers={cores + 3} lowered to {cores}" in out
    # The config keeps what was asked: the cap is this machine's, not the run's.
    assert f"num_workers: {cores + 3}" in (run / "config.yaml").read_text()


def test_a_batch_larger_than_the_training_set_is_warned_about(tmp_path, capsys):
    train(load_config(None, FAST[:2] + ["data.batch_size=2000", "data.num_workers=0", "max_steps=1",
                                        f"output_dir={tmp_path / 'run'}"]))
    assert ("warning: data.batch_size=2000 is larger than the 1437 training samples" in capsys.readouterr().out)


def test_fp16_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    assert train_main(FAST + ["precision=fp16", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "precision' = 'fp16': float16 mixed precision needs a CUDA GPU" in err
    assert not (tmp_path / "run").exists()
