"""One optimizer step, as the trainer runs it: the function that ``skd.train.Trainer``, the
benchmarks (``python -m skd.bench gpu``: timing, host-synchronisation counts) and their tests
all call, so every number measured about a step describes the step users run.

``build_training`` builds what a step uses from the config (student, method with its teacher and
extra modules, EMA, optimizer, scheduler, accelerate's wrapping); ``train_step`` runs one
optimizer step over a window of micro-batches already on the device: forward and backward of each
(DDP reduces gradients only on the last), gradient clipping, the optimizer step, the method's
``after_step``, the per-step lr, the EMA update, the loss meters and the stop/corrupt consensus.
Nothing in it waits for the device (the consensus reads the previous step's all-reduce).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
from accelerate import Accelerator
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from skd.batch import Batch
from skd.collectives import world
from skd.config import TrainConfig
from skd.methods import DataSpec, Method, create_method
from skd.models.factory import create_model
from skd.optim import create_optimizer, scheduler_kwargs

__all__ = ["TrainingParts", "build_training", "forward_backward_step", "train_step", "LossMeter",
           "StepConsensus", "StepObserver"]


@dataclasses.dataclass
class TrainingParts:
    """What a training step uses, built by ``build_training``."""

    accelerator: Accelerator
    method: nn.Module
    """The method as accelerate prepared it (DDP-wrapped on several processes): what ``forward``
    and ``no_sync`` go through."""
    unwrapped: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    """timm scheduler: ``step(epoch)`` at epoch starts, ``step_update(step)`` after every step."""
    ema: ModelEmaV3 | None
    clip_grad: float | None
    consensus: StepConsensus


def build_training(cfg: TrainConfig, accelerator: Accelerator, data: DataSpec,
                   steps_per_epoch: int) -> TrainingParts:
    """Student, method (with its teacher and extra modules), EMA, optimizer and scheduler from
    ``cfg``, prepared by ``accelerator``. Seed the generators first for reproducible weights."""
    model = create_model(cfg.model, data.num_classes)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = create_method(cfg.method, model, data)
    method.to(accelerator.device)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    if cfg.model.compile:
        model.compile()
    optimizer = create_optimizer(method, cfg.optim)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(cfg.sched, cfg.epochs, steps_per_epoch))
    # Only the method goes into DDP: its trainable modules. A frozen teacher is held outside its
    # module tree (``Method.frozen_modules``), so DDP neither broadcasts its buffers nor sees it.
    prepared, optimizer = accelerator.prepare(method, optimizer)
    return TrainingParts(accelerator=accelerator, method=prepared, unwrapped=accelerator.unwrap_model(prepared),
                         optimizer=optimizer, scheduler=scheduler, ema=ema, clip_grad=cfg.optim.clip_grad,
                         consensus=StepConsensus(accelerator.device))


class StepObserver(Protocol):
    """What sees every micro-batch's output: loss meters, the progress bar."""

    def add(self, out: dict[str, Any], images: int) -> None: ...


def forward_backward_step(parts: TrainingParts, batch: Batch, window: int, sync: bool) -> dict[str, Any]:
    """Forward and backward of one micro-batch of a window of ``window``; DDP reduces the
    gradients only when ``sync`` (the window's last micro-batch)."""
    acc = parts.accelerator
    with contextlib.nullcontext() if sync else acc.no_sync(parts.method):
        out = parts.method(batch)
        acc.backward(out["loss"] / window)
    return out


def train_step(parts: TrainingParts, batches: Iterator[Batch], window: int, step: int,
               observers: Sequence[StepObserver] = (),
               status: Callable[[], tuple[bool, int]] = lambda: (False, 0)) -> tuple[bool, int] | None:
    """Optimizer step number ``step + 1`` over the next ``window`` micro-batches of ``batches``.

    The micro-batches are averaged over ``window`` (an epoch's last window may be shorter than
    ``grad_accum_steps``: its gradient is then the mean over its real length, as timm does).
    ``status()`` is read after the window: whether this process got a stop signal, and the epoch's
    corrupt samples so far. Returns the previous step's values of both summed over all processes
    (None at the first step): every process acts on them at the same step."""
    optimizer = parts.optimizer
    for i in range(window):
        batch = next(batches)
        sync = i == window - 1
        out = forward_backward_step(parts, batch, window, sync)
        if sync:
            if parts.clip_grad:
                parts.accelerator.clip_grad_norm_(parts.method.parameters(), parts.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        parts.unwrapped.after_step(batch, out)
        for observer in observers:
            observer.add(out, batch["label"].shape[0])
    parts.scheduler.step_update(step + 1)
    if parts.ema is not None:
        parts.ema.update(parts.unwrapped.model, step=step + 1)
    return parts.consensus.exchange(*status())


class StepConsensus:
    """The stop flag and the epoch's corrupt-sample count, summed over ranks every optimizer step
    without stalling the device queue: the all-reduce launched at step k is read at step k+1,
    when the device has long finished it, so all ranks act on the same values at the same step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.alone = world()[1] == 1
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


class LossMeter:
    """Sums loss parts on the device and counts images; ``reduce`` is the only place the sums
    reach the host."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: float = 0
        self.images = 0

    def add(self, out: dict[str, Any], images: int) -> None:
        parts = {"loss": out["loss"], **out.get("parts", {})}
        for name, value in parts.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1
        self.images += images

    def state(self) -> dict[str, Any]:
        """The running sums (device tensors) and counts, for a checkpoint taken mid-epoch."""
        return {"sums": dict(self.sums), "count": self.count, "images": self.images}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count, self.images = state["count"], int(state["images"])  # a share of a count may be fractional

    def reduce(self, acc: Accelerator) -> dict[str, float]:
        """Mean of each part over the added micro-batches and over ranks (a host sync)."""
        if not self.count:
            return {}
        names = sorted(self.sums)
        values = acc.reduce(torch.stack([self.sums[n] for n in names]) / self.count, reduction="mean")
        return {n: float(v) for n, v in zip(names, values.tolist())}
