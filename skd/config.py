"""Run configuration: nested dataclasses, YAML presets and ``key.path=value`` overrides.

Strict by design: an unknown key, or a value of the wrong type, is a ``ConfigError`` that names
the key (and suggests the closest valid one) before any work starts. The ``method`` section is
typed by the chosen method's own ``Config`` dataclass (see ``skd.methods``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skd.methods import MethodConfig, get_method_config_class, list_methods

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file in its message."""


@dataclass
class DataConfig:
    train: str = "digits"
    """Training shard directory (with dataset.json), or ``digits`` for the built-in demo data."""
    val: str = "digits"
    """Evaluation shard directory, or ``digits``."""
    backend: str = "torch"
    """Loader backend. ``torch``: webdataset + PIL + timm transforms in DataLoader workers."""
    batch_size: int = 128
    """Global batch per optimizer step: processes × per-process batch × grad_accum_steps."""
    eval_batch_size: int = 0
    """Global evaluation batch; 0 means the training batch size."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples in each worker's shuffle buffer (training only)."""
    drop_last: bool = False
    """Drop the incomplete last training batch. Off by default, as in the seeds' loaders: every
    sample is seen every epoch (PS-KD's memory has no never-written rows)."""
    img_size: int = 224
    """Input resolution fed to the model."""
    train_crop: str = "rrc"
    """``rrc``: timm RandomResizedCrop pipeline; ``pad_crop``: CIFAR-style RandomCrop with padding."""
    crop_padding: int = 4
    """Zero padding of the ``pad_crop`` random crop."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range."""
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    rotation: float = 0.0
    """Random rotation in degrees (TF-KD's CIFAR recipe uses 15); 0 disables it."""
    color_jitter: float = 0.0
    """timm colour jitter strength (0 disables)."""
    auto_augment: str | None = None
    """timm auto-augment policy string, e.g. ``rand-m9-mstd0.5``."""
    re_prob: float = 0.0
    """Random-erasing probability."""
    interpolation: str = "bilinear"
    """Resize interpolation."""
    crop_pct: float = 0.875
    """Evaluation centre-crop fraction (resize to img_size / crop_pct, then crop)."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Any ``timm.create_model`` name, including skd's CIFAR models (``skd.models``)."""
    pretrained: bool = False
    """Load timm pretrained weights (needs them cached locally or a hub)."""
    checkpoint: str = ""
    """Initial weights from a local safetensors/torch file (timm ``pretrained_cfg_overlay``)."""
    drop_rate: float = 0.0
    """Classifier dropout."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate (passed only when non-zero; not every model accepts it)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model``."""
    channels_last: bool = False
    """Use the channels_last memory format (faster convolutions on tensor-core GPUs)."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""


@dataclass
class OptimConfig:
    opt: str = "sgd"
    """timm optimizer name. Note timm's ``sgd`` is Nesterov SGD; ``momentum`` is plain momentum SGD."""
    lr: float = 0.1
    """Base learning rate (for the global batch size)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    wd_exclude_norm_bias: bool = False
    """Skip weight decay on norm and bias parameters (timm style). False = the seeds' behaviour."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.optim.create_optimizer_v2``."""


@dataclass
class SchedConfig:
    sched: str = "multistep"
    """timm scheduler: ``multistep``, ``step``, ``cosine``, ``poly`` ... (not ``plateau``: the
    loop passes it no metric)."""
    decay_milestones: list[int] = field(default_factory=lambda: [150, 225])
    """Epochs at which ``multistep`` multiplies the lr by decay_rate (applied from that epoch on)."""
    decay_epochs: float = 30
    """Period of the ``step`` schedule."""
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    step_on_epochs: bool = True
    """Update the lr once per epoch (False: every optimizer step, smoother warm-up/cosine)."""


@dataclass
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too."""
    decay: float = 0.9998
    warmup: bool = False


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 300
    """Length of the run; the lr and PS-KD α schedules depend on it."""
    output_dir: str = ""
    """Run directory; empty means ``runs/<time>-<method>-<model>``."""
    resume: str = ""
    """``auto``: continue from the newest checkpoint in output_dir; or a checkpoint path."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``no``, ``bf16`` or ``fp16``."""
    grad_accum_steps: int = 1
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 50
    """Optimizer steps between log lines; NaN and stop-signal checks happen on these steps."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers: ``tensorboard``, ``wandb``; empty for none."""
    deterministic: bool = False
    """torch deterministic algorithms, cuDNN benchmark off."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: get_method_config_class("ce")(name="ce"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    reference: dict[str, Any] = field(default_factory=dict)
    """Informational: where a preset comes from and what it should reach (source, table, metric,
    expected value, notes). Not used by training."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.precision in ("auto", "no", "bf16", "fp16"), "precision", self.precision,
               "must be auto, no, bf16 or fp16")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        _check(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        _check(self.sched.sched != "plateau", "sched.sched", self.sched.sched,
               "is not supported (it needs a validation metric each epoch)")
        _check(self.data.backend == "torch", "data.backend", self.data.backend,
               "only the 'torch' backend is available in this release")
        _check(self.data.train_crop in ("rrc", "pad_crop"), "data.train_crop", self.data.train_crop,
               "must be rrc or pad_crop")


# The embedded demo: PS-KD on the scikit-learn digits, small enough for two CPU cores.
DEMO_OVERRIDES: dict[str, Any] = {
    "epochs": 12,
    "log_every": 10,
    "data": {"train": "digits", "val": "digits", "batch_size": 64, "img_size": 32,
             "train_crop": "pad_crop", "crop_padding": 2, "hflip": 0.0, "crop_pct": 1.0,
             "shuffle_buffer": 500, "num_workers": 2},
    "model": {"name": "resnet8_cifar"},
    "method": {"name": "pskd", "alpha_T": 0.8},
    "optim": {"opt": "sgd", "lr": 0.1, "weight_decay": 5e-4},
    "sched": {"sched": "cosine", "warmup_epochs": 1, "warmup_lr": 0.01},
}


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` → ``{"a": {"b": 1}, "c": [1, 2]}``; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{part}'")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Demo defaults when no file is given, else the file; then the ``key=value`` overrides."""
    raw = DEMO_OVERRIDES if config_file is None else load_yaml(config_file)
    where = "demo config" if config_file is None else str(config_file)
    update = parse_overrides(list(overrides))
    new_method = update.get("method", {}).get("name")
    if new_method is not None and new_method != raw.get("method", {}).get("name"):
        # Another method: the preset's method settings belong to the old one.
        raw = {k: v for k, v in raw.items() if k != "method"}
    return build_config(merge(raw, update), where)


def build_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a validated ``TrainConfig`` from a nested dict."""
    try:
        return _build(TrainConfig, raw, prefix="")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    if cls is MethodConfig:
        name = raw.get("name", "ce")
        if name not in list_methods():
            raise ConfigError(f"config key '{prefix}name' = {name!r}: unknown method"
                              f"{_suggest(str(name), list_methods())}; available: {', '.join(list_methods())}")
        cls = get_method_config_class(name)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(key, names, prefix)}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a method's own __post_init__ checks raise ValueError
        raise ConfigError(f"section '{prefix.rstrip('.') or 'top level'}': {e}") from None


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid keys: {', '.join(prefix + v for v in valid)})"


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it clearly is.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``, lists as strings (for tracker hyper-parameters)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
