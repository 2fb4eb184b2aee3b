"""Faults and bad input: each stops with one clear line (exit 2 for bad input) before anything is
lost, and none gives a silently wrong result."""
from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import skd.checkpoint
from skd.checkpoint import CheckpointWriteError, list_checkpoints, load_checkpoint
from skd.config import load_config
from skd.evaluate import evaluate_target
from skd.train import StopRequested, Trainer, main as train_main
from test_data_loader import write_shards

pytestmark = pytest.mark.slow

FAST = ["model.name=resnet8_cifar", "log_with=[]", "data.batch_size=64", "data.num_workers=0",
        "log_every=5", "sched.warmup_epochs=0", "method.name=ce"]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _error_line(capsys) -> str:
    """The one error line (after any progress bar, which ends with a carriage return)."""
    err = capsys.readouterr().err.strip()
    last = err.replace("\r", "\n").splitlines()[-1].strip()
    assert last.startswith("skd train: error: ") and err.count("error:") == 1, err[-2000:]
    return last


def _not_writable(monkeypatch, folder: Path) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))


BAD_INPUT = {
    "batch_size": (["data.batch_size=0"], "config key 'data.batch_size' = 0: must be >= 1"),
    "lr": (["optim.lr=-0.1"], "config key 'optim.lr' = -0.1: must be >= 0"),
    "model": (["model.name=resnet8_cifarr"], "'model.name' = 'resnet8_cifarr': not a timm model (did you mean resnet8_cifar"),
    "workers": (["data.num_workers=-1"], "config key 'data.num_workers' = -1: must be >= 0"),
    "img_size": (["data.img_size=0"], "config key 'data.img_size' = 0: must be >= 1"),
    "alpha_T": (["method.name=pskd", "method.alpha_T=1.5"], "config key 'method.alpha_T' = 1.5: must be >= 0 and <= 1"),
    "smoothing": (["method.name=ls", "method.smoothing=-0.1"], "'method.smoothing' = -0.1: must be >= 0 and <= 1"),
    "probability": (["data.hflip=2"], "config key 'data.hflip' = 2.0: must be >= 0 and <= 1"),
    "empty_yaml": (["--config", "{tmp}/empty.yaml"], "config file {tmp}/empty.yaml is empty"),
    "below_a_file": (["output_dir={tmp}/a_file/run"], "output_dir {tmp}/a_file/run: {tmp}/a_file is a file"),
    "not_writable": (["output_dir={tmp}/locked/run"], "output_dir {tmp}/locked/run: {tmp}/locked is not writable"),
    "checkpoints_is_a_file": (["output_dir={tmp}/odd"], "output_dir {tmp}/odd: {tmp}/odd/checkpoints is a file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_before_any_file_is_written(case, tmp_path, capsys, monkeypatch):
    args, expected = BAD_INPUT[case]
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "locked").mkdir()
    _not_writable(monkeypatch, tmp_path / "locked")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "checkpoints").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={tmp_path}/run")
    before = _snapshot(tmp_path)
    assert train_main(FAST + args) == 2
    assert expected.format(tmp=tmp_path) in _error_line(capsys)
    assert _snapshot(tmp_path) == before and not (tmp_path / "run").exists()


class _FillingDisk(io.FileIO):
    """A file on a disk that is full after 1,000 bytes of this file (when ``full`` is set)."""

    full = False

    def write(self, data) -> int:
        if self.full and self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_disk_full_while_checkpointing_names_the_intact_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(skd.checkpoint, "open", lambda path, mode: _FillingDisk(path, mode), raising=False)
    trainer = Trainer(load_config(None, FAST + [f"output_dir={tmp_path}"]))
    trainer.save({"epoch": 0, "batches": 0})
    monkeypatch.setattr(_FillingDisk, "full", True)  # torch.save turns the OSError into a RuntimeError
    trainer.step = 5
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*step-000000005\.pt: the disk is "
                                                   r"full; the newest intact checkpoint is .*step-000000000\.pt"):
        trainer.save({"epoch": 0, "batches": 5})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last_good.pt", "step-000000000.pt"]
    # Through the command line: exit status 1 and one line.
    assert train_main(FAST + ["epochs=1", f"output_dir={tmp_path / 'cli'}"]) == 1
    assert "the disk is full; no earlier checkpoint exists" in _error_line(capsys)


def test_changing_model_name_drops_the_presets_model_kwargs():
    preset = Path(__file__).resolve().parents[1] / "configs" / "fine_grained" / "resnet18_cskd_cub200.yaml"
    assert load_config(preset).model.kwargs == {"zero_init_last": False}
    assert load_config(preset, ["model.name=resnet8_cifar"]).model.kwargs == {}
    assert load_config(preset, ["model.kwargs={}"]).model.kwargs == {}
    assert load_config(preset, ["model.kwargs=null"]).model.kwargs == {}
    kept = load_config(preset, ["model.name=resnet34", "model.kwargs.zero_init_last=false"])
    assert kept.model.kwargs == {"zero_init_last": False}


# ----------------------------------------------------------------------------- reusing a run dir
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Two epochs of 23 steps, checkpoints every 5 steps and at epoch ends, none pruned."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(FAST + ["epochs=2", "checkpoint_every=5", "keep_checkpoints=0", f"output_dir={run}"]) == 0
    return run


def _copy(run: Path, tmp_path: Path, keep_up_to: int) -> Path:
    """A copy of ``run`` whose newest checkpoint is the one at step ``keep_up_to``."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for p in list_checkpoints(copy):
        if int(p.stem.split("-")[1]) > keep_up_to:
            p.unlink()
    return copy


def test_new_run_into_a_run_directory_stops_before_any_work(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path, 46)
    before = _snapshot(run)
    assert train_main(FAST + ["epochs=3", f"output_dir={run}"]) == 2
    err = _error_line(capsys)
    assert f"output_dir {run} already holds checkpoints" in err and "resume=auto" in err and "another output_dir" in err
    assert _snapshot(run) == before


def test_resume_lists_every_config_difference_and_leaves_the_run_intact(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path, 46)
    before = _snapshot(run)
    changed = ["method.name=ls", "model.name=resnet20_cifar", "seed=3", "epochs=3", f"data.val={tmp_path}/other"]
    assert train_main(FAST + changed + [f"output_dir={run}", "resume=auto"]) == 2
    err = _error_line(capsys)
    for diff in ("epochs: 2 -> 3", "seed: 0 -> 3", "model.name: 'resnet8_cifar' -> 'resnet20_cifar'",
                 "method.name: 'ce' -> 'ls'", "method.smoothing: (absent) -> 0.1", "data.val: 'digits' -> "):
        assert diff in err
    assert "resume_allow_changes" in err
    assert _snapshot(run) == before  # config.yaml included: `skd eval RUN_DIR` still works
    assert evaluate_target(run, ["data.num_workers=0"])["num_samples"] == 360
    # An explicit opt-in continues the run with the new number of epochs.
    first_id = load_checkpoint(list_checkpoints(run)[-1])["run_id"]
    assert train_main(FAST + ["epochs=3", f"output_dir={run}", "resume=auto", "resume_allow_changes=[epochs]"]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # The schedule follows the new length: the demo's cosine over 3 epochs, at epoch 2.
    assert history[2]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    newest = load_checkpoint(list_checkpoints(run)[-1])
    assert newest["step"] == 69 and newest["run_id"] == first_id


def test_resume_from_a_file_into_another_runs_directory_or_of_a_foreign_file_is_refused(finished_run, tmp_path,
                                                                                       capsys):
    other = _copy(finished_run, tmp_path / "other", 46)
    assert train_main(FAST + ["epochs=1", f"output_dir={tmp_path}/mine"]) == 0  # another run
    foreign_state = list_checkpoints(tmp_path / "mine")[-1]
    before = _snapshot(other)
    assert train_main(FAST + ["epochs=1", f"output_dir={other}", f"resume={foreign_state}"]) == 2
    assert f"output_dir {other} holds checkpoints of another run" in _error_line(capsys)
    assert _snapshot(other) == before
    plain = tmp_path / "plain.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    assert train_main(FAST + ["epochs=1", f"output_dir={tmp_path}/new", f"resume={plain}"]) == 2
    assert f"config key 'resume' = '{plain}': checkpoint {plain} is not an skd checkpoint" in _error_line(capsys)


def test_resume_from_the_best_epochs_checkpoint_restores_a_best_pt_lost_to_a_kill(finished_run, tmp_path):
    # A kill between saving epoch 0's checkpoint and linking it as best.pt leaves no best.pt.
    run = _copy(finished_run, tmp_path, 23)
    (run / "checkpoints" / "best.pt").unlink()
    assert train_main(FAST + ["epochs=1", "resume_allow_changes=[epochs]", f"output_dir={run}",
                              "resume=auto"]) == 0
    best = skd.checkpoint.best_checkpoint(run)
    assert best is not None
    assert best.read_bytes() == (run / "checkpoints" / "step-000000023.pt").read_bytes()


def test_mid_epoch_resume_with_another_batch_and_workers_continues_the_epoch(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path, 20)  # newest: 20 batches of 64 into epoch 0 (1,280 samples)
    assert train_main(FAST + ["epochs=2", f"output_dir={run}", "resume=auto", "data.batch_size=32"]) == 2
    assert "data.batch_size: 64 -> 32" in _error_line(capsys)  # a new recipe: only when opted in
    args = ["epochs=2", f"output_dir={run}", "resume=auto", "data.batch_size=32", "data.num_workers=1",
            "keep_checkpoints=0", "resume_allow_changes=[data.batch_size]"]
    assert train_main(FAST + args) == 0
    # The rest of epoch 0, 157 samples, in 5 batches of 32; then epoch 1 in 45.
    steps = [load_checkpoint(p)["step"] for p in list_checkpoints(run)]
    assert steps == [5, 10, 15, 20, 25, 70]
    assert load_checkpoint(list_checkpoints(run)[-2])["loader"]["epoch"] == 1


def test_damaged_newest_checkpoint_falls_back_to_the_one_before_and_is_moved_aside(finished_run, tmp_path, caplog):
    run = _copy(finished_run, tmp_path, 45)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step-000000045.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    parts = [newest.with_name(f"{newest.name}.rank-{r:05d}-of-00002") for r in range(2)]
    for part in parts:  # as a sharded state leaves them
        part.write_bytes(b"part")
    (run / "metrics.json").unlink()
    with caplog.at_level(logging.WARNING, logger="skd.resume"):
        assert train_main(FAST + ["epochs=2", f"output_dir={run}", "resume=auto"]) == 0
    damaged = run / "checkpoints" / "damaged"
    assert f"checkpoint {newest} does not load: it is damaged" in caplog.text
    assert f"moved it to {damaged / newest.name} and resuming from step-000000040.pt" in caplog.text
    assert sorted(p.name for p in damaged.iterdir()) == sorted([newest.name] + [p.name for p in parts])
    assert json.loads((run / "metrics.json").read_text()) == json.loads((finished_run / "metrics.json").read_text())
    # The next resume (a finished run: it only evaluates) no longer meets it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skd.resume"):
        assert train_main(FAST + ["epochs=2", f"output_dir={run}", "resume=auto"]) == 0
    assert "damaged" not in caplog.text


def test_a_checkpoint_of_another_skd_version_stops_resume_auto_and_is_not_moved(finished_run, tmp_path, capsys):
    """Not damaged, only not readable by this version: resume=auto stops with one line instead of
    setting it aside and quietly resuming from an older checkpoint."""
    run = _copy(finished_run, tmp_path, 45)
    newest = list_checkpoints(run)[-1]
    state = torch.load(newest, weights_only=True)
    torch.save({**state, "format": "skd-checkpoint-9"}, newest)
    assert train_main(FAST + ["epochs=2", f"output_dir={run}", "resume=auto"]) == 2
    err = _error_line(capsys)
    assert f"resume=auto: checkpoint {newest} was written by another version of skd (format 'skd-checkpoint-9')" in err
    assert newest.is_file() and not (run / "checkpoints" / "damaged").exists()


# ----------------------------------------------------------------------------- stop and corrupt data
def test_stop_request_is_honoured_one_step_later_without_a_logging_step(tmp_path):
    """With log_every far away, a signal arriving during step 7 checkpoints at step 8."""
    trainer = Trainer(load_config(None, FAST + ["log_every=1000", f"output_dir={tmp_path}"]))
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        if trainer.step == 6:  # the 7th optimizer step is running
            trainer._stop_signal = signal.SIGTERM
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    with pytest.raises(StopRequested):
        trainer.fit()
    (checkpoint,) = list_checkpoints(tmp_path)
    state = load_checkpoint(checkpoint)
    assert state["step"] == 8 and (state["loader"]["epoch"], state["loader"]["batches"]) == (0, 8)


def test_a_sigterm_delivered_twice_at_once_is_one_stop_request(tmp_path):
    """A scheduler's SIGTERM reaches a worker directly and again through its launcher: the second,
    moments after the first, must not end the process before its checkpoint is written."""
    trainer = Trainer(load_config(None, FAST + ["log_every=1000", f"output_dir={tmp_path}"]))
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    with pytest.raises(StopRequested):
        trainer.fit()
    (checkpoint,) = list_checkpoints(tmp_path)
    assert load_checkpoint(checkpoint)["step"] == 5


def test_corrupt_samples_are_reported_and_bounded(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", [20, 20], corrupt={13})
    data = [f"data.train={shards}", f"data.val={shards}", "data.img_size=16", "data.train_crop=pad_crop",
            "data.crop_pct=1.0", "data.batch_size=10"]
    run = tmp_path / "run"
    assert train_main(FAST + data + ["epochs=2", "data.max_corrupt_fraction=0.1", f"output_dir={run}"]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["train_corrupt_samples"] for h in history] == [1, 1]
    assert [h["num_corrupt"] for h in history] == [1, 1]
    assert json.loads((run / "metrics.json").read_text())["num_corrupt"] == 1
    out = capsys.readouterr().out
    assert "corrupt samples skipped: 2 in training (all epochs), 1 in the final evaluation" in out
    # 1 of 40 is above a limit of 2 %: the run stops with the count, exit status 2.
    assert train_main(FAST + data + ["epochs=1", "data.max_corrupt_fraction=0.02", f"output_dir={tmp_path}/strict"]) == 2
    err = _error_line(capsys)
    assert "1 corrupt training samples skipped so far in epoch 0 (more than data.max_corrupt_fraction=0.02 of its 40)" in err


# ----------------------------------------------------------------------------- accumulation
class _ListLoader:
    """A stand-in training loader yielding fixed batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], info) -> None:
        self.batches, self.num_corrupt, self.info = batches, 0, info

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "batches": 0}

    def __iter__(self):
        return iter(self.batches)


def test_short_last_accumulation_window_gives_the_big_batch_gradient(tmp_path):
    """6 micro-batches with grad_accum_steps=4: windows of 4 and 2. The second update must use the
    gradient of the mean loss over its 2 micro-batches (a LayerNorm ViT, so micro-batching is exact)."""
    cfg = load_config(None, FAST + ["model.name=test_vit", "model.kwargs={img_size: 32, patch_size: 8}",
                                    "data.img_size=32", "grad_accum_steps=4", "data.batch_size=32",
                                    "optim.lr=0.1", "optim.weight_decay=0", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(8, 3, 32, 32, generator=gen), "label": torch.randint(0, 10, (8,), generator=gen),
                "index": torch.arange(8)} for _ in range(6)]
    trainer.train_loader = _ListLoader(batches, trainer.train_loader.info)
    seen: list[tuple[dict, dict]] = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        model = trainer.unwrapped.model
        seen.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                     {n: p.grad.detach().clone() for n, p in model.named_parameters()}))
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    trainer.method.train()
    trainer.train_one_epoch(0)
    assert len(seen) == 2
    weights, grads = seen[1]
    model = trainer.unwrapped.model
    model.load_state_dict(weights)
    model.zero_grad(set_to_none=True)
    images = torch.cat([b["image"] for b in batches[4:]])
    labels = torch.cat([b["label"] for b in batches[4:]])
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_launcher_mixed_precision_other_than_the_configs_is_refused(tmp_path, monkeypatch, capsys):
    """skd's `precision` key is the one source: `accelerate launch --mixed_precision fp16` with a
    config that resolves to another precision stops before any work."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert train_main(FAST + [f"output_dir={tmp_path}/run"]) == 2
    err = _error_line(capsys)
    assert "accelerate launch asks for mixed precision 'fp16' but the config's precision resolves to 'no'" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what a launch without the key sets
    assert Trainer(load_config(None, FAST + [f"output_dir={tmp_path}/ok"])).accelerator.mixed_precision == "no"


def test_an_epoch_resumed_on_other_processes_keeps_the_loss_sums_of_its_first_part(tmp_path):
    """Two processes saved their epoch's loss sums mid-epoch; one process continues (its loader
    re-plans the rest of the epoch from batch 0): it starts from the sums of both, so the epoch's
    train loss covers the batches before the resume too."""
    trainer = Trainer(load_config(None, FAST + [f"output_dir={tmp_path}"]))
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(8, 3, 32, 32, generator=gen), "label": torch.randint(0, 10, (8,), generator=gen),
                "index": torch.arange(8)} for _ in range(3)]
    trainer.train_loader = _ListLoader(batches, trainer.train_loader.info)
    saved = [{"sums": {"loss": torch.tensor(6.0)}, "count": 3, "images": 24},
             {"sums": {"loss": torch.tensor(9.0)}, "count": 3, "images": 24}]
    trainer._restore_epoch_sums({"epoch_meters": saved, "epoch_corrupt": [2, 1], "loader": {"epoch": 0, "batches": 3}})
    stats = trainer.train_one_epoch(0)
    assert trainer.epoch_meter.count == 6 + 3  # both ranks' 3 micro-batches, then 3 more here
    new = trainer.epoch_meter.sums["loss"].item() - 15.0
    assert stats["loss"] == pytest.approx((15.0 + new) / 9)
    assert stats["corrupt_samples"] == 3  # both ranks' corrupt samples skipped before the resume


def test_an_epoch_resumed_mid_way_keeps_its_corrupt_sample_count(tmp_path, capsys):
    """A run stopped mid-epoch (max_steps) and resumed reports the epoch's corrupt samples of both
    parts, as the uninterrupted run does, and bounds them together."""
    shards = write_shards(tmp_path / "shards", [20, 20], corrupt={3, 13, 23, 33})
    val = write_shards(tmp_path / "val", [20])
    data = [f"data.train={shards}", f"data.val={val}", "data.img_size=16", "data.train_crop=pad_crop",
            "data.crop_pct=1.0", "data.batch_size=5", "epochs=1", "data.max_corrupt_fraction=0.2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_main(FAST + data + [f"output_dir={whole}"]) == 0
    assert train_main(FAST + data + ["max_steps=3", f"output_dir={split}"]) == 0
    (checkpoint,) = list_checkpoints(split)
    before = load_checkpoint(checkpoint)["epoch_corrupt"]
    assert 0 < sum(before) < 4, "the stop must fall between corrupt samples for this test to mean anything"
    assert train_main(FAST + data + ["max_steps=0", "resume=auto", "resume_allow_changes=[max_steps]",
                                     f"output_dir={split}"]) == 0
    counts = [json.loads((run / "history.jsonl").read_text())["train_corrupt_samples"] for run in (whole, split)]
    assert counts == [4, 4]
    # The bound counts the samples skipped before the resume too: 4 of 40 is above 8 %.
    capsys.readouterr()
    strict = data[:-1] + ["data.max_corrupt_fraction=0.08"]
    assert train_main(FAST + strict + ["max_steps=3", f"output_dir={tmp_path}/strict"]) == 0
    assert train_main(FAST + strict + ["max_steps=0", "resume=auto", "resume_allow_changes=[max_steps]",
                                       f"output_dir={tmp_path}/strict"]) == 2
    assert "4 corrupt training samples skipped so far in epoch 0" in _error_line(capsys)
