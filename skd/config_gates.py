"""Which config keys mean something for a run: a key that applies only under a condition on other
keys (``data.dali_device`` only with ``data.backend=dali``, ``optim.momentum`` only with a momentum
optimizer) is declared once in ``GATES``, and ``applies`` says whether a key applies to a config.
Two configs that differ only in keys that apply to neither are the same experiment: ``skd report``
groups and labels runs by it, and ``skd.resume.config_differences`` (resume checks, sweeps, the
paper report) compares configs by it.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping

from skd.config import MixupConfig
from skd.optim import MOMENTUM_OPTIMIZERS

__all__ = ["Gate", "GATES", "applies"]


@dataclass(frozen=True)
class Gate:
    """Config keys (``fnmatch`` patterns) that mean something only where ``test`` holds for the
    values of the keys ``on`` (and those keys apply themselves). ``method`` limits the gate to
    that method's runs: its fields are its own. A run whose config lacks a key of ``on`` (one its
    version did not have) is not gated."""

    keys: tuple[str, ...]
    on: tuple[str, ...]
    test: Callable[..., bool]
    method: str | None = None


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _positive(value: Any) -> bool:
    return value is not None and value > 0


def _mixup_on(alpha: float, cutmix_alpha: float, cutmix_minmax: list[float] | None) -> bool:
    return MixupConfig(alpha=alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax).enabled


GATES: tuple[Gate, ...] = (
    Gate(("data.dali_*",), ("data.backend",), _one_of("dali")),
    Gate(("data.dali_hw_decoder_load",), ("data.dali_device",), _one_of("gpu")),
    Gate(("data.crop_padding", "data.rotation"), ("data.train_crop",), _one_of("pad_crop")),
    # The CIFAR pad-crop pipeline has no RandomResizedCrop, colour jitter, RandAugment or erasing.
    Gate(("data.scale", "data.ratio", "data.color_jitter", "data.auto_augment", "data.re_prob"),
         ("data.train_crop",), _one_of("rrc")),
    Gate(("data.re_mode",), ("data.re_prob",), _positive),
    Gate(("optim.momentum",), ("optim.opt",), _one_of(*MOMENTUM_OPTIMIZERS)),
    # What timm's create_scheduler_v2 reads for each schedule.
    Gate(("sched.decay_milestones",), ("sched.sched",), _one_of("multistep")),
    Gate(("sched.decay_epochs",), ("sched.sched",), _one_of("step")),
    Gate(("sched.decay_rate",), ("sched.sched",), _one_of("step", "multistep", "poly")),
    Gate(("sched.min_lr",), ("sched.sched",), _one_of("cosine", "tanh", "poly")),
    Gate(("sched.warmup_lr",), ("sched.warmup_epochs",), _positive),
    Gate(("ema.decay", "ema.warmup"), ("ema.enabled",), _one_of(True)),
    Gate(("mixup.prob", "mixup.switch_prob", "mixup.label_smoothing", "mixup.correct_lam"),
         ("mixup.alpha", "mixup.cutmix_alpha", "mixup.cutmix_minmax"), _mixup_on),
    # A KD term's temperature does nothing while the term's weight is 0 (KD, ICKD, the feature baselines).
    Gate(("method.temperature",), ("method.kd_weight",), _positive),
    Gate(("method.memory_k", "method.memory_rest"), ("method.memory",), _one_of("topk", "sharded_topk"), "pskd"),
    Gate(("method.reg_*", "method.correct_prob"), ("method.mode",), _one_of("reg"), "tfkd"),
    Gate(("method.temperature", "method.alpha", "method.teacher*"), ("method.mode",), _one_of("self"), "tfkd"),
)
"""Every config key that applies only under a condition on other keys, declared once."""


def applies(key: str, config: Mapping[str, Any]) -> bool:
    """Whether ``key`` means something for the run of ``config`` (one key per field): it is one of
    the run's fields (``method.alpha_T`` only on PS-KD runs) and every gate on it holds."""
    if key not in config:
        return False
    for gate in GATES:
        if gate.method not in (None, config.get("method.name")) or not any(fnmatchcase(key, p) for p in gate.keys):
            continue
        if all(k in config for k in gate.on) and not (all(applies(k, config) for k in gate.on)
                                                      and gate.test(*(config[k] for k in gate.on))):
            return False
    return True
