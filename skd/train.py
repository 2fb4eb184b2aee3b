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
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from skd.batch import Batch
from skd.checkpoint import (CHECKPOINT_FORMAT, CheckpointWriteError, best_checkpoint, checkpoint_path,
                            keep_as_best, latest_checkpoint, load_checkpoint, load_parts, rng_state,
                            save_checkpoint, save_part, set_rng_state)
from skd.config import ConfigError, TrainConfig, config_to_dict, flat_dict, load_config, save_config
from skd.config_docs import format_config_keys, format_defaults_note
from skd.errors import MissingFileError, SkdError, run_command
from skd.data import CorruptDataError, DatasetInfo, resolve_shard_dir
from skd.data.epoch_plan import derive_seed
from skd.data.factory import create_data_loader
from skd.environment import check_environment
from skd.evaluate import evaluate, format_table, predict
from skd.metrics import Predictions
from skd.methods import DataSpec, create_method, get_method_class
from skd.mixup import create_mixer
from skd.models.factory import create_model
from skd.optim import create_optimizer, scheduler_kwargs
from skd.report import log_reliability_diagram
from skd.resume import check_output_dir, check_resume_config, select_checkpoint
from skd.teacher import load_state_dict_file

class NonFiniteLoss(SkdError, RuntimeError):
    """The loss or the weights became NaN or infinite; nothing after the last good step is saved."""

    exit_status = 1


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint has been written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        check_environment(cfg)
        self.cfg = cfg
        cpu = not torch.cuda.is_available()
        precision = ("no" if cpu else "bf16") if cfg.precision == "auto" else cfg.precision
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

        info = self._build_loaders()
        self._build_method(info)
        self.mixer = create_mixer(cfg.mixup, info.num_classes, cfg.seed, acc.process_index)
        self.unwrapped = acc.unwrap_model(self.method)
        self.epoch, self.step = 0, 0
        self.best: dict[str, Any] | None = None  # {"epoch", "metrics"} of the best epoch so far
        self.predictions: Predictions | None = None  # the model's, from the latest evaluation
        self._resume_path = resume_path
        self._stop_signal: int | None = None
        self._consensus = _StepConsensus(acc.device)
        self._on_all_ranks_or_none(self._write_config, main_only=True)
        if acc.is_main_process:
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
        answer: list[Any] = [None, None, None]
        if state.is_main_process:
            try:
                check_output_dir(self.run_dir)
                path, ckpt = select_checkpoint(self.run_dir, self.cfg.resume)
                if ckpt is not None:
                    check_resume_config(ckpt, self.cfg)
                self._resume_state = ckpt
                run_id = (ckpt or {}).get("run_id") or uuid.uuid4().hex[:12]
                answer = [str(path) if path else None, run_id, None]
            except Exception as e:  # noqa: BLE001  every rank must learn of it, or they would wait
                answer = [None, None, str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"]
        path, run_id, error = broadcast_object_list(answer)
        if error:
            raise ConfigError(error)
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
        # The demo data is written once, by the main process; its error reaches every rank.
        def resolve() -> tuple[Path, Path]:
            return (resolve_shard_dir(cfg.data.train, "train", "data.train"),
                    resolve_shard_dir(cfg.data.val, "val", "data.val"))
        self._on_all_ranks_or_none(resolve, main_only=True, error=MissingFileError)
        train_dir, val_dir = resolve()
        common = dict(rank=acc.process_index, world_size=world, device=acc.device,
                      channels_last=cfg.model.channels_last)
        self.train_loader = create_data_loader(
            cfg.data, train_dir, train=True, batch_size=self.batch_size, seed=cfg.seed,
            **get_method_class(cfg.method.name).train_loader_options(cfg.method), **common)
        self.val_loader = create_data_loader(cfg.data, val_dir, train=False, batch_size=eval_batch, **common)
        return self.train_loader.info

    def _build_method(self, info: DatasetInfo) -> None:
        """Student, method (with its teacher and extra modules), EMA, optimizer, scheduler."""
        cfg, acc = self.cfg, self.accelerator
        model = create_model(cfg.model, info.num_classes)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        method = create_method(cfg.method, model, DataSpec(info.num_classes, info.num_samples,
                                                           self.batch_size))
        method.to(acc.device)
        self.ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
        if cfg.model.compile:
            model.compile()
        self.optimizer = create_optimizer(method, cfg.optim)
        # Accumulation windows never cross an epoch end: the epoch's last window may be shorter.
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(cfg.sched, cfg.epochs, self.steps_per_epoch))
        self.method, self.optimizer = acc.prepare(method, self.optimizer)

    # ----------------------------------------------------------------------------------- run
    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        resumed_rng = self._restore(self._resume_path) if self._resume_path else None
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:  # ranks draw different dropout masks; a resume on other processes: new streams
            set_seed(derive_seed(cfg.seed, self.step, acc.process_index) % (1 << 31))
        self._init_trackers()
        with self._stop_on_signals():
            metrics: dict[str, Any] = {}
            for epoch in range(self.epoch, cfg.epochs):
                train_stats = self.train_one_epoch(epoch)
                metrics = self.evaluate()
                improved = self._track_best(epoch, metrics)
                self.epoch = epoch + 1
                # The epoch's records first, its checkpoint last: a kill in between resumes from an
                # earlier checkpoint, which drops the records of the epochs it trains again.
                self.log_epoch(epoch, train_stats, metrics)
                if improved:
                    best_predictions = self.run_dir / "predictions_best.npz"
                    self._on_all_ranks_or_none(lambda: self.predictions.save(best_predictions), main_only=True)
                path = self.save({"epoch": epoch + 1, "batches": 0})
                if improved:
                    self._on_all_ranks_or_none(lambda: keep_as_best(path), main_only=True)
                self._check_stop()
            if not metrics:  # resumed a finished run: nothing left to train, evaluate once
                metrics = self.evaluate()
            if self.best is not None:
                metrics["best"] = {"epoch": self.best["epoch"], **self.best["metrics"]}
            self.finish(metrics)
            return metrics

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        self.method.train()
        self.unwrapped.start_epoch(epoch, cfg.epochs)
        self.scheduler.step(epoch)
        self.scheduler.step_update(self.step)  # per-step schedules: the lr of the next step (also on resume)
        self.train_loader.set_epoch(epoch)
        self._corrupt_before = self.train_loader.num_corrupt
        start, num_batches = self.train_loader.state_dict()["batches"], len(self.train_loader)
        progress, epoch_meter = _Progress(acc, num_batches, start, epoch), _Meter(acc.device)
        try:
            for j, batch in enumerate(self.train_loader, start):
                # Windows of grad_accum_steps micro-batches; the epoch's last one may be shorter,
                # and its micro-batches are averaged over its real length (as timm does).
                window_start = j - j % cfg.grad_accum_steps
                window = min(cfg.grad_accum_steps, num_batches - window_start)
                sync = j + 1 == window_start + window
                device_batch = self._to_device(batch)
                if self.mixer is not None:  # Mixup/CutMix: images mixed in place, soft targets added
                    device_batch = self.mixer(device_batch, epoch, j)
                out = self._micro_step(device_batch, window, sync)
                progress.add(out, batch["label"].shape[0])
                epoch_meter.add(out)
                if sync:
                    self._end_optimizer_step(progress)
        finally:
            progress.close()  # also on an error, so its message starts a clean line
        self._act_on_consensus(self._consensus.drain())
        stats = epoch_meter.reduce(acc, self.step, self._last_checkpoint_note)
        stats = {k.removeprefix("train/"): v for k, v in stats.items()}
        stats["corrupt_samples"] = self._sum_over_ranks(self._corrupt_in_epoch())
        return stats

    def _micro_step(self, batch: Batch, window: int, sync: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; the optimizer steps on the window's last."""
        acc = self.accelerator
        with contextlib.nullcontext() if sync else acc.no_sync(self.method):
            out = self.method(batch)
            acc.backward(out["loss"] / window)
        if sync:
            if self.cfg.optim.clip_grad:
                acc.clip_grad_norm_(self.method.parameters(), self.cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.unwrapped.after_step(batch, out)
        return out

    def _end_optimizer_step(self, progress: _Progress) -> None:
        """Schedules and EMA; the stop/corrupt consensus; maybe log (a host sync), maybe checkpoint."""
        cfg = self.cfg
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.unwrapped.model, step=self.step)
        corrupt = self._corrupt_in_epoch()
        self._act_on_consensus(self._consensus.exchange(self._stop_signal is not None, corrupt))
        if self.step % cfg.log_every == 0:
            progress.log(self.step, self._lr(), corrupt, self._last_checkpoint_note)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            progress.check_finite(self.step, self._last_checkpoint_note)
            self.save(self.train_loader.state_dict())

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        limit = self.cfg.data.max_corrupt_fraction
        self.predictions = predict(self.unwrapped.model, self.val_loader, self.accelerator,
                                   channels_last=self.cfg.model.channels_last, max_corrupt_fraction=limit,
                                   with_probs=self.cfg.save_probs)
        metrics = self.predictions.metrics()
        if self.ema is not None:
            metrics["ema"] = evaluate(self.ema.module, self.val_loader, self.accelerator,
                                      channels_last=self.cfg.model.channels_last, max_corrupt_fraction=limit)
        return metrics

    # --------------------------------------------------------------------------- bookkeeping
    def log_epoch(self, epoch: int, train: dict[str, float], metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        record = {"epoch": epoch, "step": self.step, "lr": self._lr(),
                  **{f"train_{k}": v for k, v in train.items()},
                  **self.unwrapped.epoch_stats(), **metrics}
        # Tags: train/... (per epoch: corrupt samples and the method's values such as PS-KD's
        # alpha_t; loss terms, lr and img/s come every log_every steps), val/... and val_ema/....
        scalars = {"epoch": epoch, "train/corrupt_samples": train["corrupt_samples"],
                   **{f"train/{k}": v for k, v in self.unwrapped.epoch_stats().items()},
                   **{f"val/{k}": v for k, v in metrics.items() if k not in ("ema", "best")},
                   **{f"val_ema/{k}": v for k, v in metrics.get("ema", {}).items()}}
        acc.log(scalars, step=self.step)
        log_reliability_diagram(acc, self.predictions, self.step)  # TensorBoard only
        self._on_all_ranks_or_none(lambda: _append_line(self.run_dir / "history.jsonl", json.dumps(record)),
                                   main_only=True)
        if acc.is_main_process:
            skipped = (f"  corrupt skipped: train {train['corrupt_samples']}, val {metrics['num_corrupt']}"
                       if train["corrupt_samples"] or metrics["num_corrupt"] else "")
            # A run resumed exactly at an epoch's last batch has no train loss for that epoch.
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
        }

    def save(self, loader_state: dict[str, int]) -> Path:
        """Checkpoint at the current step; ``loader_state`` is where training continues."""
        acc = self.accelerator
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
        rngs = gather_object([rng_state()])  # every rank's generators, so each resumes its own
        path = checkpoint_path(self.run_dir, self.step)
        # Parts first, on every rank, then the main file: it appears only when all parts exist.
        # A failed write on any rank stops every rank (no rank is left waiting).
        self._on_all_ranks_or_none(lambda: save_part(part, path, acc.process_index, acc.num_processes)
                                   if part else None)
        if part:
            state["rank_parts"] = acc.num_processes
        state["rng"] = rngs
        self._on_all_ranks_or_none(lambda: save_checkpoint(state, path, self.cfg.keep_checkpoints)
                                   if acc.is_main_process else None)
        return path

    def _on_all_ranks_or_none(self, action: Callable[[], Any], *, main_only: bool = False,
                              error: type[Exception] = CheckpointWriteError) -> None:
        """Run ``action`` here (with ``main_only``, on the main process alone); if it fails on any
        rank, raise ``error`` with its message on every rank, so none is left waiting in a
        collective for a rank that died."""
        try:
            if self.accelerator.is_main_process or not main_only:
                action()
            message = None
        except (OSError, ValueError) as e:  # CheckpointWriteError, FileNotFoundError, ConfigError
            message = str(e)
        messages = [m for m in gather_object([message]) if m]
        if messages:
            raise error(messages[0])

    def _restore(self, path: Path) -> dict[str, Any] | None:
        """Restore every component from checkpoint ``path``; return this rank's RNG state."""
        state = self._resume_state if self._resume_state is not None else load_checkpoint(path)
        self._resume_state = None
        try:
            self.unwrapped.load_trainable_state_dict(state["method"])
            if state.get("rank_parts"):  # a sharded state, re-sharded for this run's processes
                self.unwrapped.load_rank_states(load_parts(path, state["rank_parts"]))
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"checkpoint {path} does not fit this run: {str(e).splitlines()[0]}") from None
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
        self.train_loader.load_state_dict(state["loader"])
        if (self.best is not None and self.best["epoch"] == self.epoch - 1 and state["loader"]["batches"] == 0
                and path.parent == checkpoint_path(self.run_dir, 0).parent):
            # This checkpoint is the best epoch's: a kill right after saving it may have kept
            # best.pt from linking to it.
            self._on_all_ranks_or_none(lambda: keep_as_best(path), main_only=True)
        self._on_all_ranks_or_none(lambda: _truncate_history(self.run_dir / "history.jsonl", self.epoch),
                                   main_only=True)
        if self.accelerator.is_main_process:
            tqdm.write(f"resumed from step {self.step} (epoch {self.epoch}, batch {state['loader']['batches']})")
        rngs = state["rng"]
        # Another number of processes cannot continue the same random streams (the data is
        # continued, see ShardLoader.load_state_dict; dropout and the like draw new streams).
        return rngs[self.accelerator.process_index] if len(rngs) == self.accelerator.num_processes else None

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
        save_file(_cpu(self.unwrapped.model.state_dict()), self.run_dir / "model.safetensors")
        if self.ema is not None:
            save_file(_cpu(self.ema.module.state_dict()), self.run_dir / "model_ema.safetensors")
        best = best_checkpoint(self.run_dir)
        if best is not None:
            save_file(_cpu(load_state_dict_file(best)), self.run_dir / "model_best.safetensors")
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.predictions.save(self.run_dir / "predictions.npz")
        print(format_table(metrics, title=f"{self.cfg.method.name} / {self.cfg.model.name}"))
        train_corrupt = sum(json.loads(line).get("train_corrupt_samples", 0)
                            for line in (self.run_dir / "history.jsonl").read_text().splitlines())
        if train_corrupt or metrics["num_corrupt"]:
            print(f"corrupt samples skipped: {train_corrupt} in training (all epochs), "
                  f"{metrics['num_corrupt']} in the final evaluation")
        print(f"run directory: {self.run_dir}")

    # --------------------------------------------------------------------------------- helpers
    def _to_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        if self.cfg.model.channels_last:
            for key in self.unwrapped.image_keys:
                out[key] = out[key].contiguous(memory_format=torch.channels_last)
        return out

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _last_checkpoint_note(self) -> str:
        last = latest_checkpoint(self.run_dir)
        return (f"The last checkpoint written before it, {last}, is intact." if last
                else "No checkpoint had been written yet.")

    def _corrupt_in_epoch(self) -> int:
        return self.train_loader.num_corrupt - self._corrupt_before

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

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_signal = signum
            signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():  # None: a handler not set from Python
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _act_on_consensus(self, agreed: tuple[bool, int] | None) -> None:
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
            self.save(self.train_loader.state_dict())
            raise StopRequested(self._stop_signal or signal.SIGTERM)

    def _check_stop(self) -> None:
        """At an epoch end (checkpoint already written): stop if any rank got a signal."""
        if self._sum_over_ranks(int(self._stop_signal is not None)) > 0:
            raise StopRequested(self._stop_signal or signal.SIGTERM)


class _StepConsensus:
    """The stop flag and the epoch's corrupt-sample count, summed over ranks every optimizer step
    without stalling the device queue: the all-reduce launched at step k is read at step k+1,
    when the device has long finished it, so all ranks act on the same values at the same step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.alone = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        self.pending: tuple[torch.Tensor, Any] | None = None

    def exchange(self, stop: bool, corrupt: int) -> tuple[bool, int] | None:
        """Launch this step's reduction; return the previous step's result (None at the first)."""
        previous = self.drain()
        values = torch.tensor([float(stop), float(corrupt)], dtype=torch.float64)
        if self.alone:  # nothing to reduce: the values wait on the host, acted on a step later as with ranks
            self.pending = (values, None)
            return previous
        values = values.to(self.device, non_blocking=True)
        dist.all_reduce(values, async_op=True).wait()  # NCCL: the stream waits, not the host
        event = None
        if self.cuda:
            host = torch.empty(2, dtype=torch.float64, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending = (values, event)
        return previous

    def drain(self) -> tuple[bool, int] | None:
        if self.pending is None:
            return None
        values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # waits for one step back, not for the queued work
        stop, corrupt = values.tolist()
        return stop > 0, int(corrupt)


class _Progress:
    """Loss parts and images since the last log line, the progress bar, and the log line itself."""

    def __init__(self, acc: Accelerator, num_batches: int, start: int, epoch: int) -> None:
        self.acc = acc
        self.bar = tqdm(total=num_batches, initial=start, desc=f"epoch {epoch}",
                        disable=not acc.is_main_process, dynamic_ncols=True, leave=False)
        self._reset()

    def _reset(self) -> None:
        self.meter, self.images, self.tic = _Meter(self.acc.device), 0, time.perf_counter()

    def add(self, out: dict[str, Any], images: int) -> None:
        self.meter.add(out)
        self.images += images
        self.bar.update(1)

    def log(self, step: int, lr: float, corrupt: int, note: Callable[[], str]) -> None:
        """Deliberate sync point: the losses reach the host, the NaN check runs."""
        values = self.meter.reduce(self.acc, step, note)
        rate = self.images * self.acc.num_processes / (time.perf_counter() - self.tic)
        self.acc.log({**values, "train/img_per_s": rate, "train/lr": lr}, step=step)
        postfix = dict(loss=f"{values['train/loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        if corrupt:
            postfix["corrupt"] = str(corrupt)
        self.bar.set_postfix(postfix)
        self._reset()

    def check_finite(self, step: int, note: Callable[[], str]) -> None:
        if self.meter.count:
            self.meter.reduce(self.acc, step, note)

    def close(self) -> None:
        self.bar.close()


class _Meter:
    """Sums loss parts on the device; ``reduce`` is the only place they reach the host."""

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.device = device

    def add(self, out: dict[str, Any]) -> None:
        parts = {"loss": out["loss"], **out.get("parts", {})}
        for name, value in parts.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def reduce(self, acc: Accelerator, step: int, note: Callable[[], str]) -> dict[str, float]:
        """Mean of each part over the added steps and ranks; raises ``NonFiniteLoss`` (with
        ``note()`` saying which checkpoint is intact) if one is not finite."""
        if not self.count:
            return {}
        names = sorted(self.sums)
        values = acc.reduce(torch.stack([self.sums[n] for n in names]) / self.count, reduction="mean")
        result = {f"train/{n}": float(v) for n, v in zip(names, values.tolist())}
        if not all(math.isfinite(v) for v in result.values()):
            parts = ", ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in result.items())
            raise NonFiniteLoss(f"non-finite loss at or before optimizer step {step} ({parts}); "
                                f"stopping. {note()}")
        return result


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
