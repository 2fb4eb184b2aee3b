"""Training steps of skd's methods on a synthetic batch already on the device, for
``python -m skd.bench gpu``: the step itself, its timing, the loss alone, and the host
synchronisations and kernel ops inside it.

The step is the trainer's own: ``skd.train_step.build_training`` builds its parts from a
``TrainConfig`` (the ImageNet recipe below unless told otherwise) exactly as ``skd.train.Trainer``
does, and every call runs ``skd.train_step.train_step``, the function the trainer's loop calls:
forward and backward of each micro-batch, clipping, the optimizer step, ``after_step``, the lr
schedule, EMA, the loss meter and the stop/corrupt consensus. Only the batch is the benchmark's.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from skd.batch import Batch
from skd.config import DataConfig, ModelConfig, OptimConfig, SchedConfig, TrainConfig
from skd.methods import DataSpec, get_method_class, get_method_config_class
from skd.teacher import safetensors_metadata
from skd.train_step import LossMeter, build_training, train_step
from skd_kernels import _dispatch

# The ImageNet recipe of the ResNet presets (SGD with momentum 0.9, lr 0.1, weight decay 1e-4).
OPTIM = OptimConfig(opt="momentum", lr=0.1, momentum=0.9, weight_decay=1e-4)

# Profiler event names that stop the host until the device catches up (cudaFree waits for the
# whole device). On a CPU run only the first exists: the op behind .item(), float(t), bool(t),
# which synchronises when t is on a GPU.
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
               "cudaEventSynchronize", "cudaMemcpy", "cudaFree")
KERNEL_OP_PREFIX = "skd_kernels::"


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A training configuration: student architecture, method, teacher architecture (teacher
    methods only; it gets randomly initialised weights, which cost the same as trained ones)."""

    model: str
    method: str
    teacher: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    """Method config fields set beside the defaults, e.g. ``(("memory", "topk"),)``."""

    @property
    def name(self) -> str:
        """The method and its options, e.g. ``pskd[memory=topk]``: the key of its result rows."""
        options = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method}[{options}]" if options else self.method

    @property
    def label(self) -> str:
        return f"{self.name} ({self.teacher} → {self.model})" if self.teacher else self.name


@dataclasses.dataclass(frozen=True)
class StepSizes:
    batch_size: int
    """Per-device batch (anchors for CS-KD, whose partners double the images forwarded)."""
    img_size: int
    num_classes: int
    num_samples: int
    """Training-set size: the rows of PS-KD's memory."""


def step_config(spec: StepSpec, sizes: StepSizes, work_dir: Path, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a benchmark step: ``spec``'s model and method (a random-weight
    teacher for teacher methods), channels_last, the ImageNet recipe's optimizer, and the
    ``TrainConfig`` fields in ``overrides`` (e.g. ``grad_accum_steps``, ``ema``, ``optim``)."""
    options: dict[str, Any] = dict(spec.options)
    if spec.teacher:
        options.update(teacher=spec.teacher, teacher_checkpoint=str(
            random_checkpoint(spec.teacher, sizes.num_classes, work_dir, sizes.img_size)))
    method = get_method_config_class(spec.method)(name=spec.method, **options)
    fields: dict[str, Any] = dict(model=ModelConfig(name=spec.model, channels_last=True), method=method,
                                  optim=OPTIM, sched=SchedConfig(sched="cosine"), epochs=100, log_with=[])
    fields.update(overrides)
    return TrainConfig(**fields)


class TrainStep:
    """The parts of a training step (``build_training``) and one synthetic batch. Calling it runs
    one optimizer step through ``train_step``, the trainer's own function, with
    ``cfg.grad_accum_steps`` micro-batches of that batch, and returns the last micro-batch's
    output. The schedules start at ``epoch`` of ``cfg.epochs`` epochs of ``steps_per_epoch``."""

    def __init__(self, accelerator: Accelerator, spec: StepSpec, sizes: StepSizes, *, work_dir: Path,
                 compile_kwargs: dict[str, Any] | None = None, cfg: TrainConfig | None = None,
                 epoch: int = 1, steps_per_epoch: int = 1000) -> None:
        cfg = cfg or step_config(spec, sizes, work_dir)
        self.accelerator, self.cfg = accelerator, cfg
        torch.manual_seed(cfg.seed)  # as the trainer: every rank builds the same initial weights
        data = DataSpec(sizes.num_classes, sizes.num_samples, sizes.batch_size, mean=tuple(cfg.data.mean),
                        std=tuple(cfg.data.std), img_size=sizes.img_size)
        self.parts = build_training(cfg, accelerator, data, steps_per_epoch)
        if compile_kwargs is not None:  # as model.compile=true, with the benchmark's options
            self.parts.unwrapped.model.compile(**compile_kwargs)
        self.method = self.parts.method
        self.method.train()
        self.parts.unwrapped.start_epoch(epoch, cfg.epochs)  # past epoch 0: PS-KD's α > 0, its memory is read
        self.parts.scheduler.step(epoch)
        loader_options = get_method_class(spec.method).train_loader_options(cfg.method)
        self.batch = synthetic_batch(sizes, accelerator.device, with_partner="with_partner" in loader_options,
                                     repeat_previous="repeat_previous" in loader_options)
        self.meter, self.epoch_meter, self.step = LossMeter(), LossMeter(), 0
        self.last: dict[str, Any] = {}

    def __call__(self) -> dict[str, torch.Tensor]:
        # The trainer's observers: the meter since the last log line, the epoch's meter (and a bar).
        train_step(self.parts, itertools.repeat(self.batch), self.cfg.grad_accum_steps, self.step,
                   observers=(self.meter, self.epoch_meter, self))
        self.step += 1
        return self.last

    def add(self, out: dict[str, Any], images: int) -> None:
        """As a step observer: keep the latest micro-batch's output."""
        self.last = out

    @contextlib.contextmanager
    def loss_only(self) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
        """Within: a step of the method's own work only. The student and the frozen modules
        (teacher) return, as fresh leaf tensors, what they returned on the first call; forward,
        backward and ``after_step`` still run everything else (the losses, USKD's weak head,
        PS-KD's memory read and write). No optimizer step."""
        method = self.parts.unwrapped
        model, frozen = method.model, dict(method._frozen)
        model_replay = _Replay(model)
        frozen_replays = {name: _Replay(module) for name, module in frozen.items()}
        replays = [model_replay, *frozen_replays.values()]
        method.model = model_replay
        method._frozen.update(frozen_replays)

        def step() -> dict[str, torch.Tensor]:
            for replay in replays:
                replay.start_step()
            out = self.method(self.batch)
            self.accelerator.backward(out["loss"])
            method.after_step(self.batch, out)
            method.zero_grad(set_to_none=True)
            return out

        try:
            yield step
        finally:
            method.model = model
            method._frozen.update(frozen)

    def close(self) -> None:
        """Release the model, optimizer and batch before the next step is built. accelerate's
        ``free_memory`` drops its references, collects garbage (the prepared forward is a bound
        method in the model's own ``__dict__``: a reference cycle) and empties the CUDA cache."""
        del self.method, self.parts, self.batch
        self.accelerator.free_memory()


def synthetic_batch(sizes: StepSizes, device: torch.device, *, with_partner: bool = False,
                    repeat_previous: bool = False) -> Batch:
    """A batch as the loader delivers it after ``Trainer._to_device``: normalised fp32 images in
    channels_last, int64 labels and sample indices (distinct, as in an epoch); for CS-KD (and
    BAKE's intra-class images) a partner image per anchor; for DLB the previous batch's samples
    augmented anew, which, as the benchmark feeds the same batch every step, are its own."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, S = sizes.batch_size, sizes.img_size

    def images() -> torch.Tensor:
        x = torch.randn(B, 3, S, S, device=device, generator=gen)
        return x.contiguous(memory_format=torch.channels_last)

    batch = {"image": images(),
             "label": torch.randint(0, sizes.num_classes, (B,), device=device, generator=gen),
             "index": torch.randperm(sizes.num_samples, device=device, generator=gen)[:B]}
    if with_partner:
        batch["partner"] = images()
        batch["partner_index"] = torch.randperm(sizes.num_samples, device=device, generator=gen)[:B]
    if repeat_previous:
        batch.update(repeat=images(), repeat_label=batch["label"].clone(), repeat_index=batch["index"].clone())
    return batch


def random_checkpoint(name: str, num_classes: int, directory: Path, img_size: int = 224) -> Path:
    """A safetensors file of a randomly initialised timm ``name`` (a teacher's weights), marked as
    trained on ``img_size`` px inputs with the ImageNet statistics (what ``data`` defaults to), so
    that the teacher is fed the training batch as it is."""
    path = directory / f"{name}-{num_classes}-{img_size}px-random.safetensors"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        data = DataConfig()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata=safetensors_metadata(name, data.mean, data.std, img_size))
    return path


class _Replay(nn.Module):
    """Stands in for a model inside a method. During the first step it calls the real module and
    records what each entry point returned; in later steps it returns those outputs again, in the
    same order, detached into new leaf tensors (so the backward stops there). Any other attribute
    is the real module's."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module
        self.recorded: list[Any] = []
        self.replaying = False
        self.position = 0

    def start_step(self) -> None:
        self.replaying, self.position = bool(self.recorded), 0

    def _call(self, entry: str, *args: Any, **kwargs: Any) -> Any:
        if not self.replaying:  # forward through __call__: hooks and a compiled model run as usual
            call = self.inner if entry == "forward" else getattr(self.inner, entry)
            out = call(*args, **kwargs)
            self.recorded.append(_map_tensors(lambda t: _Saved(t.detach(), t.requires_grad), out))
            return out
        out = self.recorded[self.position]
        self.position += 1
        return _map_tensors(lambda s: s.tensor.detach().requires_grad_(s.requires_grad), out)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", *args, **kwargs)

    def forward_features(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward_features", *args, **kwargs)

    def forward_head(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward_head", *args, **kwargs)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward_intermediates", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


@dataclasses.dataclass(frozen=True)
class _Saved:
    tensor: torch.Tensor
    requires_grad: bool


def _map_tensors(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` applied to every tensor (or ``_Saved``) in nested tuples, lists and dicts."""
    if isinstance(tree, (torch.Tensor, _Saved)):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(fn, x) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(fn, v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, *, warmup: int, windows: int,
                     calls: int) -> list[float]:
    """Seconds per call of ``fn``, one value per window of ``calls`` calls, after ``warmup`` calls.
    The device is synchronised at both ends of a window and nowhere inside it."""
    for _ in range(warmup):
        fn()
    result = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        result.append((time.perf_counter() - start) / calls)
    return result


def profiled_event_counts(fn: Callable[[], Any], device: torch.device,
                          calls: int) -> collections.Counter[str]:
    """How often each profiler event (ops, CUDA runtime calls) occurs in ``calls`` calls of ``fn``,
    less what the profiler records around an empty window (its own synchronisation on exit)."""
    if device not in _EMPTY_WINDOW:
        _EMPTY_WINDOW[device] = _event_counts(lambda: None, device, 1)
    return _event_counts(fn, device, calls) - _EMPTY_WINDOW[device]


_EMPTY_WINDOW: dict[torch.device, collections.Counter[str]] = {}


def _event_counts(fn: Callable[[], Any], device: torch.device,
                  calls: int) -> collections.Counter[str]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    return collections.Counter(event.name for event in prof.events())


def sync_debug_warnings(fn: Callable[[], Any], calls: int) -> int:
    """Warnings of ``torch.cuda.set_sync_debug_mode("warn")`` in ``calls`` calls of ``fn`` (CUDA
    only): every operation that synchronises the host with the device warns once per call."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def reference_losses() -> Iterator[None]:
    """Within: every ``skd_kernels`` call runs its plain-PyTorch reference (the losses as they
    would be without the kernels), on the GPU too."""
    previous = _dispatch.FORCE_REFERENCE
    _dispatch.FORCE_REFERENCE = True
    try:
        yield
    finally:
        _dispatch.FORCE_REFERENCE = previous
