"""``skd train``: build the components from the config, then a short loop over them.

The loop knows nothing method-specific: it calls ``method(batch)`` for the loss, steps the
optimizer, and calls ``method.after_step``. The host waits for the device only on logging steps
(losses, NaN check), at epoch ends and before checkpoints, and, one step late, for a tiny
all-reduce of the stop flag and the corrupt-sample count that every optimizer step launches
(with ``precision=fp16`` the grad scaler also checks its scale every step; a sharded PS-KD memory
reads its exchange counts once per step).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from timm.utils import distribute_bn
from tqdm import tqdm

from skd.batch import Batch
from skd.checkpoint import (BEST_NAME, CHECKPOINT_FORMAT, LAST_GOOD_NAME, CheckpointWriteError, best_checkpoint,
                            checkpoint_path, checkpoint_step, keep_as, latest_checkpoint, load_checkpoint, load_parts,
                            read_field, rng_state, save_checkpoint, save_part, set_rng_state)
from skd.config import ConfigError, TrainConfig, config_to_dict, flat_dict, load_config, save_config
from skd.config_docs import format_config_keys, format_defaults_note
from skd.data import CorruptDataError, DatasetInfo, resolve_shard_dir
from skd.data.epoch_plan import derive_seed
from skd.data.factory import create_data_loader
from skd.environment import check_environment
from skd.errors import MissingFileError, SkdError, one_line, run_command
from skd.evaluate import evaluate, format_table, predict
from skd.metrics import Predictions
from skd.methods import DataSpec, get_method_class
from skd.mixup import create_mixer
from skd.report import log_reliability_diagram
from skd.resume import check_output_dir, check_resume_config, select_checkpoint, set_aside_newer
from skd.teacher import load_state_dict_file, safetensors_metadata
from skd.train_step import LossMeter, build_training, train_step

class NonFiniteLoss(SkdError, RuntimeError):
    """The loss or the weights became NaN or infinite; nothing after the last good step is saved."""

    exit_status = 1


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint has been written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


SIGNAL_REPEAT_S = 5.0
"""A second stop signal within this many seconds of the first is the same request (a scheduler's
SIGTERM delivered both directly and through the launcher); a later one ends the process at once."""


class RankFailed(RuntimeError):
    """Another process failed in a step that every process takes together; its own error (with
    its traceback) is reported by that process."""


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        check_environment(cfg)
        self.cfg = cfg
        cpu = not torch.cuda.is_available()
        precision = ("no" if cpu else "bf16") if cfg.precision == "auto" else cfg.precision
        if cpu and precision == "fp16":  # accelerate would silently train in fp32
            raise ConfigError("config key 'precision' = 'fp16': float16 mixed precision needs a CUDA GPU, and "
                              "this process sees none; use precision=bf16 (bfloat16 autocast on the CPU) or no")
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher not in ("no", precision):  # skd's `precision` key is the one source
            raise ConfigError(f"accelerate launch asks for mixed precision {launcher!r} but the config's "
                              f"precision resolves to {precision!r}: set precision={launcher} in the config "
                              f"and drop --mixed_precision from the launch")
        # The process group comes up first so every rank agrees on one run directory and start.
        state = PartialState(cpu=cpu)
        name = f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}-{cfg.model.name}"
        self.run_dir = Path(broadcast_object_list([cfg.output_dir or name])[0])
        self._resume_state: dict[str, Any] | None = None  # the main process keeps what _start loaded
        resume_path, self.run_id = self._start(state)
        self.accelerator = acc = Accelerator(
            cpu=cpu, mixed_precision=precision, log_with=cfg.log_with or None,
            project_dir=str(self.run_dir))
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        set_seed(cfg.seed)  # same initial weights on every rank

        self._notes: list[str] = []  # shown when training starts
        info = self._build_loaders()
        # Accumulation windows never cross an epoch end: the epoch's last window may be shorter.
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        data = DataSpec(info.num_classes, info.num_samples, self.batch_size, mean=tuple(cfg.data.mean),
                        std=tuple(cfg.data.std), img_size=cfg.data.img_size)
        self.parts = parts = build_training(cfg, acc, data, self.steps_per_epoch)
        self.method, self.unwrapped, self.optimizer = parts.method, parts.unwrapped, parts.optimizer
        self.scheduler, self.ema = parts.scheduler, parts.ema
        self._notes += self.unwrapped.notes()
        self.mixer = create_mixer(cfg.mixup, info.num_classes, cfg.seed, acc.process_index)
        self.epoch, self.step = 0, 0
        self.best: dict[str, Any] | None = None  # {"epoch", "metrics"} of the best epoch so far
        self.predictions: Predictions | None = None  # the model's, from the latest evaluation
        self.loss_watch = _LossWatch(cfg.divergence_factor, report=acc.is_main_process)
        # The epoch's loss sums and corrupt-sample count, kept by mid-epoch checkpoints.
        self.epoch_meter = LossMeter()
        self._corrupt_before = 0  # the loader's count when this process started the epoch
        self._corrupt_carried = 0  # the epoch's corrupt samples skipped before a resume
        self._epoch_restored = False
        self._bn_synced_at = -1  # the step at which BatchNorm statistics were last made equal
        self._resume_path = resume_path
        self._stop_signal: int | None = None
        self._on_all_ranks_or_none(self._write_config, main_only=True)
        if acc.is_main_process:
            for note in self._notes:
                tqdm.write(note)
            tqdm.write(f"{cfg.method.name} / {cfg.model.name}: {info.num_samples} training samples, "
                       f"{info.num_classes} classes; {_plural(acc.num_processes, 'process', 'es')}, "
                       f"{_plural(self.batch_size, 'image')} per process per micro-batch, "
                       f"{_plural(self.steps_per_epoch, 'optimizer step')} per epoch; run directory {self.run_dir}")

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")

    def _start(self, state: PartialState) -> tuple[Path | None, str]:
        """Check the run directory and pick the checkpoint to resume on the main process (nothing
        is written yet), and give every rank the same answer: the path and the run id."""
        answer: dict[str, Any] = {}

        def decide() -> None:
            check_output_dir(self.run_dir)
            path, ckpt = select_checkpoint(self.run_dir, self.cfg.resume)
            if ckpt is not None:
                check_resume_config(ckpt, self.cfg)
                if self.cfg.resume != "auto":
                    set_aside_newer(self.run_dir, ckpt)
            self._resume_state = ckpt
            answer.update(path=str(path) if path else None, run_id=(ckpt or {}).get("run_id") or uuid.uuid4().hex[:12])
        self._on_all_ranks_or_none(decide, main_only=True, error=ConfigError)
        path, run_id = broadcast_object_list([answer.get("path"), answer.get("run_id")])
        if self.cfg.resume and path is None and state.is_main_process:
            tqdm.write(f"resume=auto: no checkpoint in {self.run_dir}, starting from scratch")
        return (Path(path) if path else None), run_id

    def _build_loaders(self) -> DatasetInfo:
        """Training and validation loaders of this rank; returns the training set's info."""
        cfg, acc = self.cfg, self.accelerator
        world = acc.num_processes
        per_step = world * cfg.grad_accum_steps
        if cfg.data.batch_size % per_step:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                              f"processes × grad_accum_steps = {per_step}")
        self.batch_size = cfg.data.batch_size // per_step
        eval_batch = max(1, (cfg.data.eval_batch_size or cfg.data.batch_size) // world)
        workers = cfg.data.num_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if workers > cores:  # more worker processes than cores only adds switching
            self._notes.append(f"note: data.num_workers={workers} lowered to {cores}: this process may use "
                               f"{_plural(cores, 'CPU core')}")
            workers = cores
        # The demo data is written once, by the main process; its error reaches every rank.
        def resolve() -> tuple[Path, Path]:
            return (resolve_shard_dir(cfg.data.train, "train", "data.train"),
                    resolve_shard_dir(cfg.data.val, "val", "data.val"))
        self._on_all_ranks_or_none(resolve, main_only=True, error=MissingFileError)
        train_dir, val_dir = resolve()
        common = dict(rank=acc.process_index, world_size=world, device=acc.device,
                      channels_last=cfg.model.channels_last)
        data_cfg = dataclasses.replace(cfg.data, num_workers=workers)
        self.train_loader = create_data_loader(
            data_cfg, train_dir, train=True, batch_size=self.batch_size, seed=cfg.seed,
            **get_method_class(cfg.method.name).train_loader_options(cfg.method), **common)
        self.val_loader = create_data_loader(data_cfg, val_dir, train=False, batch_size=eval_batch, **common)
        info = self.train_loader.info
        if cfg.data.batch_size > info.num_samples:
            self._notes.append(f"warning: data.batch_size={cfg.data.batch_size} is larger than the "
                               f"{info.num_samples} training samples in {train_dir}: one optimizer step per epoch")
        return info

    # ----------------------------------------------------------------------------------- run
    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        resumed_rng = self._restore(self._resume_path) if self._resume_path else None
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:  # ranks draw different dropout masks; a resume on other processes: new streams
            set_seed(derive_seed(cfg.seed, self.step, acc.process_index) % (1 << 31))
        self._init_trackers()
        try:
            with self._stop_on_signals():
                metrics = self._train_epochs()
        except BaseException:
            for tracker in acc.trackers:  # what they logged stays readable when the run stops
                tracker.finish()
            raise
        if self.best is not None:
            metrics["best"] = {"epoch": self.best["epoch"], **self.best["metrics"]}
        self.finish(metrics)
        return metrics

    def _train_epochs(self) -> dict[str, Any]:
        """Train from the current epoch to the end (or ``max_steps``), evaluating and
        checkpointing every epoch; the last evaluation's metrics."""
        metrics: dict[str, Any] = {}
        for epoch in range(self.epoch, self.cfg.epochs):
            if self._max_steps_reached():
                break
            train_stats = self.train_one_epoch(epoch)
            metrics = self.evaluate()
            # Where training continues: the next epoch, or this one when max_steps ended it early
            # (a partial epoch is no candidate for the best epoch: it comes back when continued).
            loader_state = self.train_loader.state_dict()
            finished = loader_state["batches"] >= len(self.train_loader)
            if finished:
                loader_state = {"epoch": epoch + 1, "batches": 0}
            improved = finished and self._track_best(epoch, metrics)
            self.epoch = loader_state["epoch"]
            # The epoch's records first, its checkpoint last: a kill in between resumes from an
            # earlier checkpoint, which drops the records of the epochs it trains again.
            self.log_epoch(epoch, train_stats, metrics)
            if improved:
                best_predictions = self.run_dir / "predictions_best.npz"
                self._on_all_ranks_or_none(lambda: self.predictions.save(best_predictions), main_only=True)
            path = self.save(loader_state)
            if improved:
                self._on_all_ranks_or_none(lambda: keep_as(path, BEST_NAME), main_only=True)
            self._check_stop()
        return metrics or self.evaluate()  # a finished run resumed: nothing left to train, evaluate once

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """The optimizer steps of ``epoch`` from the loader's position (to its end, or until
        ``max_steps``); returns the epoch's mean loss parts and corrupt-sample count."""
        cfg, acc = self.cfg, self.accelerator
        self.method.train()
        self.unwrapped.start_epoch(epoch, cfg.epochs)
        self.scheduler.step(epoch)
        self.scheduler.step_update(self.step)  # per-step schedules: the lr of the next step (also on resume)
        self.train_loader.set_epoch(epoch)
        self._corrupt_before = self.train_loader.num_corrupt
        start, num_batches = self.train_loader.state_dict()["batches"], len(self.train_loader)
        if not self._epoch_restored:  # a new epoch (a resume within one restored its sums)
            self.epoch_meter, self._corrupt_carried = LossMeter(), 0
        self._epoch_restored = False
        progress = _Progress(acc, num_batches, start, epoch)
        batches = self._device_batches(epoch, start)
        accum = cfg.grad_accum_steps
        j = start
        try:
            while j < num_batches and not self._max_steps_reached():
                # Windows of grad_accum_steps micro-batches from the epoch's start; the last may be shorter.
                window = min(accum - j % accum, num_batches - j)
                agreed = train_step(self.parts, batches, window, self.step, (progress, self.epoch_meter),
                                    status=lambda: (self._stop_signal is not None, self._corrupt_in_epoch()))
                j += window
                self.step += 1
                self._act_on_consensus(agreed, progress)
                if self.step % cfg.log_every == 0:
                    progress.log(self.step, self._lr(), self._corrupt_in_epoch(), self._check_loss)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    progress.flush(self.step, self._check_loss)
                    self.save(self.train_loader.state_dict())
            progress.flush(self.step, self._check_loss)
        finally:
            progress.close()  # also on an error, so its message starts a clean line
        self._act_on_consensus(self.parts.consensus.drain(), progress)
        stats = self.epoch_meter.reduce(acc)
        self._check_loss(stats, self.step)
        stats["corrupt_samples"] = self._sum_over_ranks(self._corrupt_in_epoch())
        return stats

    def _device_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """The loader's batches from number ``start`` on, on the device, Mixup/CutMix applied."""
        for j, batch in enumerate(self.train_loader, start):
            device_batch = self._to_device(batch)
            if self.mixer is not None:  # images mixed in place, soft targets added
                device_batch = self.mixer(device_batch, epoch, j)
            yield device_batch

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _check_loss(self, values: dict[str, float], step: int) -> None:
        """Every loss that reaches the host passes here: a non-finite one stops the run."""
        error = self.loss_watch.check(values, step)
        if error:
            raise NonFiniteLoss(f"{error}; stopping. {self._last_checkpoint_note()}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        self._distribute_bn()
        limit = cfg.data.max_corrupt_fraction
        self.predictions = predict(self.unwrapped.model, self.val_loader, self.accelerator,
                                   channels_last=cfg.model.channels_last, max_corrupt_fraction=limit,
                                   with_probs=cfg.save_probs)
        metrics = self.predictions.metrics()
        if self.ema is not None:
            metrics["ema"] = evaluate(self.ema.module, self.val_loader, self.accelerator,
                                      channels_last=cfg.model.channels_last, max_corrupt_fraction=limit)
        return metrics

    def _distribute_bn(self) -> None:
        """Make BatchNorm running statistics (the method's and the EMA's) equal on every process,
        as timm's ``distribute_bn``: each process's differ after its own training batches, and
        rank 0's are saved, so the metrics must come from the same values. Before every
        evaluation and checkpoint."""
        acc = self.accelerator
        if acc.num_processes == 1 or self.cfg.dist_bn == "none" or self._bn_synced_at == self.step:
            return  # (an epoch-end checkpoint right after the evaluation: already equal)
        self._bn_synced_at = self.step
        reduce = self.cfg.dist_bn == "reduce"
        distribute_bn(self.unwrapped, acc.num_processes, reduce)
        if self.ema is not None:
            distribute_bn(self.ema, acc.num_processes, reduce)

    # --------------------------------------------------------------------------- bookkeeping
    def log_epoch(self, epoch: int, train: dict[str, float], metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        method_stats = self.unwrapped.epoch_stats()
        record = {"epoch": epoch, "step": self.step, "lr": self._lr(),
                  **{f"train_{k}": v for k, v in train.items()}, **method_stats, **metrics}
        # Tags: train/... (per epoch: corrupt samples and the method's values such as PS-KD's
        # alpha_t; loss terms, lr and img/s come every log_every steps), val/... and val_ema/....
        scalars = {"epoch": epoch, "train/corrupt_samples": train["corrupt_samples"],
                   **{f"train/{k}": v for k, v in method_stats.items()},
                   **{f"val/{k}": v for k, v in metrics.items() if k not in ("ema", "best")},
                   **{f"val_ema/{k}": v for k, v in metrics.get("ema", {}).items()}}
        acc.log(scalars, step=self.step)
        log_reliability_diagram(acc, self.predictions, self.step)  # TensorBoard only
        self._on_all_ranks_or_none(lambda: _append_line(self.run_dir / "history.jsonl", json.dumps(record)),
                                   main_only=True)
        if acc.is_main_process:
            skipped = (f"  corrupt skipped: train {train['corrupt_samples']}, val {metrics['num_corrupt']}"
                       if train["corrupt_samples"] or metrics["num_corrupt"] else "")
            # An epoch of no step (resumed at its very end on other processes) has no train loss.
            tqdm.write(f"epoch {epoch}: loss {train.get('loss', float('nan')):.4f}  top1 {metrics['top1']:.2f}  "
                       f"nll {metrics['nll']:.4f}  ece {metrics['ece']:.2f}{skipped}")

    def state_dict(self, loader_state: dict[str, int]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "run_id": self.run_id,
            "config": config_to_dict(self.cfg),
            "epoch": loader_state["epoch"],
            "step": self.step,
            "loader": loader_state,
            "method": self.unwrapped.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best": self.best,
            "loss_watch": self.loss_watch.state(),
        }

    def save(self, loader_state: dict[str, int]) -> Path:
        """Checkpoint at the current step; ``loader_state`` is where training continues."""
        acc = self.accelerator
        self._distribute_bn()
        good = self.loss_watch.saved()  # the loss stayed in bounds since the last checkpoint
        state = self.state_dict(loader_state)
        part = self.unwrapped.rank_state()  # this rank's share of a sharded state, else empty
        # A finite loss at step k was computed before step k's update: every floating tensor that
        # is about to be saved (weights, BN statistics, EMA, PS-KD memory, optimizer state) is
        # checked itself, or the last checkpoint could already hold the divergence.
        bad = _first_non_finite({**state, "part": part}, ("method", "ema", "optimizer", "part"))
        if self._sum_over_ranks(int(bad is not None)):
            raise NonFiniteLoss(f"non-finite values in {bad or 'the state of another process'} after "
                                f"optimizer step {self.step}; stopping without saving them. "
                                f"{self._last_checkpoint_note()}")
        # Every rank's generators, mid-epoch loss sums and corrupt-sample count, so each resumes its own.
        meter = self.epoch_meter.state()
        meter["sums"] = _cpu(meter["sums"])
        gathered = gather_object([{"rng": rng_state(), "epoch_meter": meter, "corrupt": self._corrupt_in_epoch()}])
        path = checkpoint_path(self.run_dir, self.step)
        # Parts first, on every rank, then the main file: it appears only when all parts exist.
        # A failed write on any rank stops every rank (no rank is left waiting).
        self._on_all_ranks_or_none(lambda: save_part(part, path, acc.process_index, acc.num_processes)
                                   if part else None)
        if part:
            state["rank_parts"] = acc.num_processes
        state["rng"] = [g["rng"] for g in gathered]
        state["epoch_meters"] = [g["epoch_meter"] for g in gathered]
        state["epoch_corrupt"] = [g["corrupt"] for g in gathered]
        self._on_all_ranks_or_none(lambda: save_checkpoint(state, path, self.cfg.keep_checkpoints)
                                   if acc.is_main_process else None)
        if good:
            self._on_all_ranks_or_none(lambda: keep_as(path, LAST_GOOD_NAME), main_only=True)
        return path

    def _on_all_ranks_or_none(self, action: Callable[[], Any], *, main_only: bool = False,
                              error: type[Exception] = CheckpointWriteError) -> None:
        """Run ``action`` here (with ``main_only``, on the main process alone); if it fails on any
        rank, every rank raises, so none is left waiting in a collective for a rank that died:
        the failing rank its own exception, the others ``error`` with its message (an ``OSError``
        or a user error: a file that cannot be written or read) or ``RankFailed`` (anything else)."""
        failure: BaseException | None = None
        try:
            if PartialState().is_main_process or not main_only:
                action()
        except Exception as e:  # noqa: BLE001  every kind: the other ranks must learn of it
            failure = e
        report = None if failure is None else (
            isinstance(failure, (OSError, SkdError)), f"{type(failure).__name__}: {one_line(failure)}",
            one_line(failure))
        reports = [r for r in gather_object([report]) if r]
        if isinstance(failure, OSError) and not isinstance(failure, SkdError):  # a write that failed
            raise error(one_line(failure)) from failure
        if failure is not None:
            raise failure
        if reports:
            user_error, described, message = reports[0]
            raise error(message) if user_error else RankFailed(f"another process failed: {described}")

    def _restore(self, path: Path) -> dict[str, Any] | None:
        """Restore every component from checkpoint ``path``; return this rank's RNG state."""
        state = self._resume_state if self._resume_state is not None else load_checkpoint(path)
        self._resume_state = None
        try:
            self.unwrapped.load_trainable_state_dict(state["method"])
            if state.get("rank_parts"):  # a sharded state, re-sharded for this run's processes
                self.unwrapped.load_rank_states(load_parts(path, state["rank_parts"]))
        except SkdError as e:  # a method state or memory part of another shape, a missing part
            raise ConfigError(f"checkpoint {path} does not fit this run: {one_line(e)}") from None
        # The optimizer's buffers (momentum, Adam moments) continue; its hyper-parameters come from
        # this run's config, as does the lr schedule (timm's schedulers are functions of the epoch
        # and step, so their saved state is not needed): a resume that changes `epochs` or
        # `optim.*` (resume_allow_changes) follows the new values.
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best = state.get("best")
        self.loss_watch.load_state(state.get("loss_watch"))
        self.train_loader.load_state_dict(state["loader"])
        self._restore_epoch_sums(state)
        if (self.best is not None and self.best["epoch"] == self.epoch - 1 and state["loader"]["batches"] == 0
                and path.parent == checkpoint_path(self.run_dir, 0).parent):
            # This checkpoint is the best epoch's: a kill right after saving it may have kept
            # best.pt from linking to it.
            self._on_all_ranks_or_none(lambda: keep_as(path, BEST_NAME), main_only=True)
        self._on_all_ranks_or_none(lambda: _truncate_history(self.run_dir / "history.jsonl", self.epoch),
                                   main_only=True)
        if self.accelerator.is_main_process:
            tqdm.write(f"resumed from step {self.step} (epoch {self.epoch}, batch {state['loader']['batches']})")
        rngs = state["rng"]
        # Another number of processes cannot continue the same random streams (the data is
        # continued, see ShardLoader.load_state_dict; dropout and the like draw new streams).
        return rngs[self.accelerator.process_index] if len(rngs) == self.accelerator.num_processes else None

    def _restore_epoch_sums(self, state: dict[str, Any]) -> None:
        """The loss sums and corrupt-sample count of the epoch so far, so the epoch's mean and
        count (and the ``data.max_corrupt_fraction`` bound) cover its batches before the resume
        too. Each process continues its own; on another number of processes, each starts from an
        equal share of the loss sums (its mean is then that of the whole epoch, weighted as close
        as the new layout allows) and the main process carries the whole count."""
        meters = state.get("epoch_meters")
        if not meters or state["loader"]["batches"] == 0:
            return
        acc = self.accelerator
        self._epoch_restored = True
        corrupt = state.get("epoch_corrupt") or [0] * len(meters)
        if len(meters) == acc.num_processes:
            self._corrupt_carried = corrupt[acc.process_index]
            self.epoch_meter.load_state(meters[acc.process_index], acc.device)
            return
        self._corrupt_carried = sum(corrupt) if acc.is_main_process else 0
        names = set().union(*(m["sums"] for m in meters))
        self.epoch_meter.load_state({
            "sums": {n: sum(m["sums"][n] for m in meters if n in m["sums"]) / acc.num_processes for n in names},
            "count": sum(m["count"] for m in meters) / acc.num_processes,
            "images": sum(m["images"] for m in meters) // acc.num_processes}, acc.device)

    def _init_trackers(self) -> None:
        """One tracker run per skd run: TensorBoard writes every start into ``RUN_DIR/skd/`` (the
        config as a text summary: accelerate's hparams would add a timestamped folder per start),
        W&B resumes the run named by the run id."""
        acc = self.accelerator
        acc.init_trackers("skd", init_kwargs={"wandb": {"id": self.run_id, "resume": "allow",
                                                         "dir": str(self.run_dir)}})
        if not acc.is_main_process:
            return
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text("config", f"```yaml\n{(self.run_dir / 'config.yaml').read_text()}```",
                                        global_step=self.step)
            else:
                tracker.store_init_configuration(flat_dict(config_to_dict(self.cfg)))

    def _track_best(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Remember ``epoch`` if its ``best_metric`` beats the best so far; True if it does."""
        key = self.cfg.best_metric
        sign = 1 if key in ("top1", "top5") else -1
        if self.best is not None and sign * metrics[key] <= sign * self.best["metrics"][key]:
            return False
        self.best = {"epoch": epoch, "metrics": {k: v for k, v in metrics.items() if k != "ema"}}
        return True

    def finish(self, metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        acc.end_training()
        if not acc.is_main_process:
            return
        # The exports record how their inputs were normalised: a run that distils from them as a
        # teacher feeds it exactly that (skd.teacher.training_statistics).
        cfg = self.cfg
        meta = safetensors_metadata(cfg.model.name, cfg.data.mean, cfg.data.std, cfg.data.img_size)
        save_file(_cpu(self.unwrapped.model.state_dict()), self.run_dir / "model.safetensors", metadata=meta)
        if self.ema is not None:
            save_file(_cpu(self.ema.module.state_dict()), self.run_dir / "model_ema.safetensors", metadata=meta)
        best = best_checkpoint(self.run_dir)
        if best is not None:
            save_file(_cpu(load_state_dict_file(best)), self.run_dir / "model_best.safetensors", metadata=meta)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.predictions.save(self.run_dir / "predictions.npz")
        print(format_table(metrics, title=f"{self.cfg.method.name} / {self.cfg.model.name}"))
        train_corrupt = sum(json.loads(line).get("train_corrupt_samples", 0)
                            for line in (self.run_dir / "history.jsonl").read_text().splitlines())
        if train_corrupt or metrics["num_corrupt"]:
            print(f"corrupt samples skipped: {train_corrupt} in training (all epochs), "
                  f"{metrics['num_corrupt']} in the final evaluation")
        if self._max_steps_reached() and self.epoch < self.cfg.epochs:
            print(f"stopped after max_steps={self.cfg.max_steps} optimizer steps (epoch {self.epoch} of "
                  f"{self.cfg.epochs}); continue with the same command and output_dir={self.run_dir} "
                  f"resume=auto max_steps=0 resume_allow_changes=[max_steps]")
        print(f"run directory: {self.run_dir}")

    # --------------------------------------------------------------------------------- helpers
    def _to_device(self, batch: Batch) -> Batch:
        out = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        if self.cfg.model.channels_last:
            for key in self.unwrapped.image_keys:
                out[key] = out[key].contiguous(memory_format=torch.channels_last)
        return out

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _last_checkpoint_note(self) -> str:
        return self.loss_watch.advice(latest_checkpoint(self.run_dir), self.run_dir)

    def _corrupt_in_epoch(self) -> int:
        """This process's corrupt samples skipped in the epoch so far, before a resume included."""
        return self.train_loader.num_corrupt - self._corrupt_before + self._corrupt_carried

    def _sum_over_ranks(self, value: int) -> int:
        total = self.accelerator.reduce(torch.tensor([value], device=self.accelerator.device), "sum")
        return int(total.item())

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGINT request a stop at the next agreed step; the caller's
        handlers come back afterwards (a notebook's Ctrl-C, or processes forked later, such as a
        multiprocessing pool, must not inherit a handler that only sets a flag)."""
        if threading.current_thread() is not threading.main_thread():  # signal.signal() is main-only
            yield
            return

        first: dict[str, float] = {}

        def request_stop(signum: int, frame: Any) -> None:
            # A scheduler's SIGTERM can arrive twice within moments (to the process directly and
            # through its launcher): one request. A signal after that ends the process at once.
            if "at" in first and time.monotonic() - first["at"] > SIGNAL_REPEAT_S:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            first.setdefault("at", time.monotonic())
            self._stop_signal = signum
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():  # None: a handler not set from Python
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _act_on_consensus(self, agreed: tuple[bool, int] | None, progress: _Progress) -> None:
        """Every rank gets the same all-reduced values at the same step and acts on them."""
        if agreed is None:
            return
        stop, corrupt = agreed
        limit = self.cfg.data.max_corrupt_fraction * self.train_loader.info.num_samples
        if corrupt > limit:
            raise CorruptDataError(
                f"{corrupt} corrupt training samples skipped so far in epoch {self.epoch} (more than "
                f"data.max_corrupt_fraction={self.cfg.data.max_corrupt_fraction} of its "
                f"{self.train_loader.info.num_samples}); the warnings above name them. "
                f"{self._last_checkpoint_note()}")
        if stop:
            progress.flush(self.step, self._check_loss)  # the losses since the last log line, checked
            self.save(self.train_loader.state_dict())
            raise StopRequested(self._stop_signal or signal.SIGTERM)

    def _check_stop(self) -> None:
        """At an epoch end (checkpoint already written): stop if any rank got a signal."""
        if self._sum_over_ranks(int(self._stop_signal is not None)) > 0:
            raise StopRequested(self._stop_signal or signal.SIGTERM)


class _LossWatch:
    """What the losses that reached the host say about the run: the last finite one, and whether
    every one since the previous checkpoint stayed below ``factor`` × the run's first logged loss
    (a loss far above the untrained model's has diverged, even while it is finite). The newest
    checkpoint written in bounds is kept as ``checkpoints/last_good.pt``: where a diverged run can
    go back to."""

    def __init__(self, factor: float, report: bool = True) -> None:
        self.factor = factor
        self.report = report  # this process prints the warnings
        self.reference: float | None = None  # the first logged loss of the run
        self.last_finite: tuple[int, float] | None = None
        self.in_bounds = True  # every loss since the last checkpoint
        self.diverging = False  # the latest loss, for one warning per excursion

    def check(self, values: dict[str, float], step: int) -> str | None:
        """Take the losses reduced at ``step``; an error message if one is not finite."""
        loss = values.get("loss")
        if loss is None:
            return None
        if not all(math.isfinite(v) for v in values.values()):
            self.in_bounds = False
            parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            last = (f"the loss was last finite at optimizer step {self.last_finite[0]} "
                    f"({self.last_finite[1]:.4g})" if self.last_finite else "no finite loss was logged before")
            return f"non-finite loss at or before optimizer step {step} ({parts}); {last}"
        if self.reference is None:
            self.reference = loss
        self.last_finite = (step, loss)
        diverging = bool(self.factor) and loss > self.factor * self.reference
        if diverging and not self.diverging and self.report:
            tqdm.write(f"warning: training loss {loss:.4g} at optimizer step {step} is above divergence_factor="
                       f"{self.factor:g} × the first logged loss ({self.reference:.4g}): the run may be "
                       f"diverging (a smaller optim.lr or a warm-up helps); checkpoints/last_good.pt stays on "
                       f"the last checkpoint before it")
        self.diverging = diverging
        self.in_bounds = self.in_bounds and not diverging
        return None

    def saved(self) -> bool:
        """A checkpoint is being written: True if it is a good one (to keep as last_good.pt)."""
        good, self.in_bounds = self.in_bounds, True
        return good

    def advice(self, newest: Path | None, run_dir: Path) -> str:
        """Which checkpoint to go back to, for a message about a stopped run."""
        if newest is None:
            return "No checkpoint had been written yet."
        good = run_dir / "checkpoints" / LAST_GOOD_NAME
        text = f"The newest checkpoint, {newest}, is intact."
        good_step = read_field(good, "step") if self.factor and good.is_file() else None
        if good_step is not None and good_step != checkpoint_step(newest):
            bound = (f" ({self.factor * self.reference:.4g})" if self.reference is not None else "")
            text += (f" The newest one written while the training loss stayed below divergence_factor="
                     f"{self.factor:g} × the first logged loss{bound} is {good} (optimizer step "
                     f"{good_step}): resume from it with resume={good} (and, if the loss "
                     f"diverged, a smaller optim.lr).")
        return text

    def state(self) -> dict[str, Any]:
        return {"reference": self.reference, "last_finite": self.last_finite, "diverging": self.diverging}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.reference, self.diverging = state["reference"], bool(state.get("diverging"))
            self.last_finite = tuple(state["last_finite"]) if state["last_finite"] else None


class _Progress:
    """Loss parts and images since the last log line, the progress bar, and the log line itself."""

    def __init__(self, acc: Accelerator, num_batches: int, start: int, epoch: int) -> None:
        self.acc = acc
        self.bar = tqdm(total=num_batches, initial=start, desc=f"epoch {epoch}",
                        disable=not acc.is_main_process, dynamic_ncols=True, leave=False)
        self._reset()

    def _reset(self) -> None:
        self.meter, self.tic = LossMeter(), time.perf_counter()

    def add(self, out: dict[str, Any], images: int) -> None:
        self.meter.add(out, images)
        self.bar.update(1)

    def log(self, step: int, lr: float, corrupt: int, check: Callable[[dict[str, float], int], None]) -> None:
        """Deliberate sync point: the losses reach the host and pass ``check`` (the NaN check)."""
        values = self.meter.reduce(self.acc)
        check(values, step)
        rate = self.meter.images * self.acc.num_processes / (time.perf_counter() - self.tic)
        self.acc.log({**{f"train/{k}": v for k, v in values.items()}, "train/img_per_s": rate, "train/lr": lr},
                     step=step)
        postfix = dict(loss=f"{values['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        if corrupt:
            postfix["corrupt"] = str(corrupt)
        self.bar.set_postfix(postfix)
        self._reset()

    def flush(self, step: int, check: Callable[[dict[str, float], int], None]) -> None:
        """The losses since the last log line through ``check`` (before a checkpoint)."""
        if self.meter.count:
            check(self.meter.reduce(self.acc), step)

    def close(self) -> None:
        self.bar.close()


def _first_non_finite(state: dict[str, Any], sections: tuple[str, ...]) -> str | None:
    """The name of the first floating tensor in ``state[section]`` (nested) with a NaN or inf.
    One device-to-host transfer when everything is finite."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel():
                tensors.append((prefix, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)

    for section in sections:
        walk(section, state.get(section))
    if not tensors:
        return None
    flags = torch.stack([t.isfinite().all().to(tensors[0][1].device) for _, t in tensors])
    if bool(flags.all()):
        return None
    return next(name for (name, _), ok in zip(tensors, flags.tolist()) if not ok)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{suffix}"


def _append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_history(path: Path, epoch: int) -> None:
    """Drop history lines of epochs that the resumed run will train again (and a line cut off by
    a kill), writing the file anew through a temporary file."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] < epoch:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skd train", description="Train a timm model with a (self-)distillation method. "
        "Without --config, runs the embedded demo (PS-KD on the scikit-learn digits, CPU-sized).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any as key=value; `skd config ...` prints the resolved config)\n\n"
               + format_defaults_note() + "\n\n" + format_config_keys())
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, nested with dots, e.g. data.batch_size=256 epochs=90")
    args = parser.parse_intermixed_args(argv)  # --config may come after overrides

    def run() -> int:
        try:
            Trainer(load_config(args.config, args.overrides)).fit()
        except StopRequested as e:
            print(f"skd train: stopped by {e}; checkpoint written, continue with resume=auto",
                  file=sys.stderr)
            return 128 + e.signum
        return 0

    return run_command("skd train", run)
