"""``skd train``: build the components from the config, then a short loop over them.

The loop knows nothing method-specific: it calls ``method(batch)`` for the loss, steps the
optimizer, and calls ``method.after_step``. Host synchronisation happens only on logging steps,
at epoch ends and before checkpoints; NaN detection and stop signals are checked there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from skd.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, rng_state,
                            save_checkpoint, set_rng_state)
from skd.config import ConfigError, TrainConfig, config_to_dict, flat_dict, load_config, save_config
from skd.data import DatasetInfo, create_loader
from skd.evaluate import evaluate, format_table, resolve_shard_dir
from skd.methods import DataSpec, create_method, get_method_class
from skd.models.factory import create_model
from skd.optim import optimizer_kwargs, scheduler_kwargs
from skd.transforms import create_eval_transform, create_train_transform


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is kept."""


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint has been written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        cpu = not torch.cuda.is_available()
        precision = ("no" if cpu else "bf16") if cfg.precision == "auto" else cfg.precision
        # The process group comes up first so every rank agrees on one timestamped run directory.
        PartialState(cpu=cpu)
        name = f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}-{cfg.model.name}"
        self.run_dir = Path(broadcast_object_list([cfg.output_dir or name])[0])
        self.accelerator = acc = Accelerator(
            cpu=cpu, mixed_precision=precision, log_with=cfg.log_with or None,
            project_dir=str(self.run_dir))
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        set_seed(cfg.seed)  # same initial weights on every rank
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        info = self._build_loaders()
        self._build_method(info)
        if acc.is_main_process:
            tqdm.write(f"{cfg.method.name} / {cfg.model.name}: {info.num_samples} training samples, "
                       f"{info.num_classes} classes; {acc.num_processes} processes, {self.batch_size} "
                       f"images per process per step, {self.steps_per_epoch} steps per epoch; "
                       f"run directory {self.run_dir}")
        self.unwrapped = acc.unwrap_model(self.method)
        self.epoch, self.step = 0, 0
        self._stop_signal: int | None = None

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
        with acc.main_process_first():  # the demo data is written once, by the first process
            train_dir = resolve_shard_dir(cfg.data.train, "train", "data.train")
            val_dir = resolve_shard_dir(cfg.data.val, "val", "data.val")
        common = dict(rank=acc.process_index, world_size=world, num_workers=cfg.data.num_workers)
        self.train_loader = create_loader(
            train_dir, train=True, batch_size=self.batch_size, transform=create_train_transform(cfg.data),
            seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, drop_last=cfg.data.drop_last,
            **get_method_class(cfg.method.name).train_loader_options(cfg.method), **common)
        self.val_loader = create_loader(val_dir, train=False, batch_size=eval_batch,
                                        transform=create_eval_transform(cfg.data), **common)
        info = self.train_loader.info
        return info

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
        self.optimizer = create_optimizer_v2(method, **optimizer_kwargs(cfg.optim))
        # Accumulation windows never cross an epoch end: the epoch's last window may be shorter.
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(cfg.sched, cfg.epochs, self.steps_per_epoch))
        self.method, self.optimizer = acc.prepare(method, self.optimizer)

    # ----------------------------------------------------------------------------------- run
    def fit(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        resumed_rng = self.resume() if cfg.resume else None
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:
            set_seed(cfg.seed + acc.process_index)  # ranks draw different dropout masks
        acc.init_trackers("skd", config=flat_dict(config_to_dict(cfg)))
        self._install_signal_handlers()
        metrics: dict[str, Any] = {}
        for epoch in range(self.epoch, cfg.epochs):
            train_stats = self.train_one_epoch(epoch)
            metrics = self.evaluate()
            self.epoch = epoch + 1
            self.save({"epoch": epoch + 1, "batches": 0})
            self.log_epoch(epoch, train_stats, metrics)
            self._check_stop(save=False)
        if not metrics:  # resumed a finished run: nothing left to train, evaluate once
            metrics = self.evaluate()
        self.finish(metrics)
        return metrics

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        self.method.train()
        self.unwrapped.start_epoch(epoch, cfg.epochs)
        self.scheduler.step(epoch)
        self.train_loader.set_epoch(epoch)
        meter = _Meter(acc.device)
        epoch_meter = _Meter(acc.device)
        start = self.train_loader.state_dict()["batches"]
        bar = tqdm(total=len(self.train_loader), initial=start, desc=f"epoch {epoch}",
                   disable=not acc.is_main_process, dynamic_ncols=True, leave=False)
        tic, images = time.perf_counter(), 0
        num_batches, accum = len(self.train_loader), cfg.grad_accum_steps
        for j, batch in enumerate(self.train_loader, start):
            batch = self._to_device(batch)
            sync = (j + 1) % accum == 0 or j + 1 == num_batches
            with contextlib.nullcontext() if sync else acc.no_sync(self.method):
                out = self.method(batch)
                acc.backward(out["loss"] / accum)
            if sync:
                if cfg.optim.clip_grad:
                    acc.clip_grad_norm_(self.method.parameters(), cfg.optim.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.unwrapped.after_step(batch, out)
            meter.add(out)
            epoch_meter.add(out)
            images += batch["label"].shape[0]
            bar.update(1)
            if not sync:
                continue
            self.step += 1
            self.scheduler.step_update(self.step)
            if self.ema is not None:
                self.ema.update(self.unwrapped.model, step=self.step)
            if self.step % cfg.log_every == 0:
                # Deliberate sync point: losses to the host, NaN check, stop-signal consensus.
                values = meter.reduce(acc, self.step)
                rate = images * acc.num_processes / (time.perf_counter() - tic)
                values["train/img_per_s"] = rate
                acc.log(values, step=self.step)
                bar.set_postfix(loss=f"{values['train/loss']:.3f}", lr=f"{self._lr():.3g}",
                                img_s=f"{rate:.0f}")
                meter, tic, images = _Meter(acc.device), time.perf_counter(), 0
                self._check_stop(save=True)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                meter.check_finite(acc, self.step)
                self.save(self.train_loader.state_dict())
        bar.close()
        meter.check_finite(acc, self.step)
        stats = epoch_meter.reduce(acc, self.step)
        return {k.removeprefix("train/"): v for k, v in stats.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        metrics = evaluate(self.unwrapped.model, self.val_loader, self.accelerator,
                           channels_last=self.cfg.model.channels_last)
        if self.ema is not None:
            metrics["ema"] = evaluate(self.ema.module, self.val_loader, self.accelerator,
                                      channels_last=self.cfg.model.channels_last)
        return metrics

    # --------------------------------------------------------------------------- bookkeeping
    def log_epoch(self, epoch: int, train: dict[str, float], metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        record = {"epoch": epoch, "step": self.step, "lr": self._lr(),
                  **{f"train_{k}": v for k, v in train.items()},
                  **self.unwrapped.epoch_stats(), **metrics}
        acc.log(flat_dict({"val": metrics, "epoch": epoch, **self.unwrapped.epoch_stats()}), step=self.step)
        if acc.is_main_process:
            with open(self.run_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            # A run resumed exactly at an epoch's last batch has no train loss for that epoch.
            tqdm.write(f"epoch {epoch}: loss {train.get('loss', float('nan')):.4f}  top1 {metrics['top1']:.2f}  "
                       f"nll {metrics['nll']:.4f}  ece {metrics['ece']:.2f}")

    def state_dict(self, loader_state: dict[str, int]) -> dict[str, Any]:
        return {
            "format": "skd-checkpoint-1",
            "config": config_to_dict(self.cfg),
            "epoch": loader_state["epoch"],
            "step": self.step,
            "loader": loader_state,
            "method": self.unwrapped.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def save(self, loader_state: dict[str, int]) -> None:
        """Checkpoint at the current step; ``loader_state`` is where training continues."""
        acc = self.accelerator
        # A finite loss at step k was computed before step k's update; the weights saved now must
        # be checked themselves, or the last checkpoint could already hold the divergence.
        params = [p.detach() for p in self.unwrapped.parameters() if p.requires_grad]
        if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            raise NonFiniteLoss(f"non-finite weights after optimizer step {self.step}; stopping without "
                                f"saving them. The last checkpoint written before it is intact.")
        rngs = gather_object([rng_state()])  # every rank's generators, so each resumes its own
        if acc.is_main_process:
            state = self.state_dict(loader_state)
            state["rng"] = rngs
            save_checkpoint(state, checkpoint_path(self.run_dir, self.step), self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def resume(self) -> dict[str, Any] | None:
        """Restore everything from the checkpoint named by ``resume``; return this rank's RNG state."""
        path = latest_checkpoint(self.run_dir) if self.cfg.resume == "auto" else Path(self.cfg.resume)
        if path is None:
            tqdm.write(f"resume=auto: no checkpoint in {self.run_dir}, starting from scratch")
            return None
        state = load_checkpoint(path)
        self.unwrapped.load_trainable_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.train_loader.load_state_dict(state["loader"])
        if self.accelerator.is_main_process:
            _truncate_history(self.run_dir / "history.jsonl", self.epoch)
            tqdm.write(f"resumed from {path} (epoch {self.epoch}, step {self.step})")
        rngs = state["rng"]
        # A different number of processes cannot continue the same random streams.
        return rngs[self.accelerator.process_index] if len(rngs) == self.accelerator.num_processes else None

    def finish(self, metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        acc.end_training()
        if not acc.is_main_process:
            return
        weights = {k: v.detach().cpu().contiguous() for k, v in self.unwrapped.model.state_dict().items()}
        save_file(weights, self.run_dir / "model.safetensors")
        if self.ema is not None:
            ema = {k: v.detach().cpu().contiguous() for k, v in self.ema.module.state_dict().items()}
            save_file(ema, self.run_dir / "model_ema.safetensors")
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(format_table(metrics, title=f"{self.cfg.method.name} / {self.cfg.model.name}"))
        print(f"run directory: {self.run_dir}")

    # --------------------------------------------------------------------------------- helpers
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        if self.cfg.model.channels_last:
            for key in ("image", "partner"):
                if key in out:
                    out[key] = out[key].contiguous(memory_format=torch.channels_last)
        return out

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            self._stop_signal = signum
            signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)

    def _check_stop(self, save: bool) -> None:
        """All ranks agree to stop (a signal may reach them at different steps), then save."""
        flag = torch.tensor(1.0 if self._stop_signal else 0.0, device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            if save:
                self.save(self.train_loader.state_dict())
            raise StopRequested(self._stop_signal or signal.SIGTERM)


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

    def check_finite(self, acc: Accelerator, step: int) -> None:
        if self.count:
            self.reduce(acc, step)

    def reduce(self, acc: Accelerator, step: int) -> dict[str, float]:
        if not self.count:
            return {}
        names = sorted(self.sums)
        values = acc.reduce(torch.stack([self.sums[n] for n in names]) / self.count, reduction="mean")
        result = {f"train/{n}": float(v) for n, v in zip(names, values.tolist())}
        if not all(math.isfinite(v) for v in result.values()):
            parts = ", ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in result.items())
            raise NonFiniteLoss(f"non-finite loss at or before optimizer step {step} ({parts}); "
                                f"stopping. The last checkpoint written before it is intact.")
        return result


def _truncate_history(path: Path, epoch: int) -> None:
    """Drop history lines of epochs that the resumed run will train again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] < epoch]
        path.write_text("".join(line + "\n" for line in lines))


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skd train", description="Train a timm model with a (self-)distillation method. "
        "Without --config, runs the embedded demo (PS-KD on the scikit-learn digits, CPU-sized).")
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, nested with dots, e.g. data.batch_size=256 epochs=90")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, FileNotFoundError) as e:  # bad config, missing data or checkpoint
        print(f"skd train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"skd train: error: {e}", file=sys.stderr)
        return 1
    except StopRequested as e:
        print(f"skd train: stopped by {e}; checkpoint written, continue with resume=auto",
              file=sys.stderr)
        return 128 + e.signum
    return 0
