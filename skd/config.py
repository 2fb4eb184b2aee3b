"""Run configuration: nested dataclasses, YAML presets and ``key.path=value`` overrides.

Strict by design: an unknown key, or a value of the wrong type, range or choice, is a
``ConfigError`` that names the key (and suggests the closest valid one) before any work starts.
The ``method`` section is typed by the chosen method's own ``Config`` dataclass (see
``skd.methods``).

A config only describes a run: building one imports neither timm's registries nor DALI and looks
at no GPU, so a run's config loads, compares and reports anywhere. Whether the machine can run it
(the model and optimizer names known to timm, DALI and a GPU for ``data.backend=dali``) is checked
when a run starts, by ``skd.environment.check_environment``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skd.config_checks import bounded, check_fields, one_of
from skd.errors import ConfigError
from skd.methods import MethodConfig, get_method_class, get_method_config_class, list_methods

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    train: str = "digits"
    """Training shard directory (with dataset.json), or ``digits`` for the built-in demo data."""
    val: str = "digits"
    """Evaluation shard directory, or ``digits``."""
    backend: str = one_of("torch", ("torch", "dali"))
    """Loader backend. ``torch``: PIL + timm transforms in DataLoader workers. ``dali``: the same
    samples, batches and crops, decoded and augmented by NVIDIA DALI (``pip install 'skd[dali]'``)."""
    dali_device: str = one_of("gpu", ("gpu", "cpu"))
    """``backend=dali``: ``gpu`` decodes (nvJPEG, hardware JPEG decoder) and augments on this
    process's GPU; ``cpu`` runs the same DALI pipeline on the CPU (no GPU needed)."""
    dali_threads: int = bounded(4, ge=1)
    """``backend=dali``: DALI CPU threads per process (they do all the decoding when dali_device=cpu)."""
    dali_hw_decoder_load: float = bounded(0.65, ge=0, le=1)
    """``backend=dali``, ``dali_device=gpu``: share of the JPEGs sent to the GPU's hardware JPEG
    decoder (A100, H100, H200); the rest are decoded with CUDA."""
    dali_dtype: str = one_of("float32", ("float32", "float16", "bfloat16"))
    """``backend=dali``: dtype of the normalised images (half types need precision=bf16/fp16)."""
    batch_size: int = bounded(128, ge=1)
    """Global batch per optimizer step: processes × per-process batch × grad_accum_steps."""
    eval_batch_size: int = bounded(0, ge=0)
    """Global evaluation batch; 0 means the training batch size."""
    num_workers: int = bounded(2, ge=0)
    """DataLoader worker processes per rank (with backend=dali they only read the shards)."""
    shuffle_buffer: int = bounded(2000, ge=0)
    """Training: the epoch's sample order is shuffled within consecutive windows of this many
    positions (larger mixes more; reads stay within a window's shard regions)."""
    max_corrupt_fraction: float = bounded(0.01, ge=0, le=1)
    """Stop when more than this fraction of an epoch's training samples so far (or of the
    evaluation set) were corrupt and skipped."""
    drop_last: bool = False
    """Drop the incomplete last training batch. Off by default, as in the seeds' loaders: every
    sample is seen every epoch (PS-KD's memory has no never-written rows)."""
    img_size: int = bounded(224, ge=1)
    """Input resolution fed to the model."""
    train_crop: str = one_of("rrc", ("rrc", "pad_crop"))
    """``rrc``: timm RandomResizedCrop pipeline; ``pad_crop``: CIFAR-style RandomCrop with padding."""
    crop_padding: int = bounded(4, ge=0)
    """Zero padding of the ``pad_crop`` random crop."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range."""
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = bounded(0.5, ge=0, le=1)
    """Horizontal flip probability."""
    rotation: float = bounded(0.0, ge=0, le=180)
    """Random rotation in degrees (TF-KD's CIFAR recipe uses 15); 0 disables it."""
    color_jitter: float = bounded(0.0, ge=0)
    """timm colour jitter strength (0 disables)."""
    auto_augment: str | None = None
    """timm auto-augment policy string, e.g. ``rand-m9-mstd0.5``."""
    re_prob: float = bounded(0.0, ge=0, le=1)
    """Random-erasing probability."""
    re_mode: str = one_of("const", ("const", "rand", "pixel"))
    """Random-erasing fill (timm ``re_mode``): ``const`` zeros, ``rand`` one normal colour per box,
    ``pixel`` normal noise per pixel (DeiT, Swin)."""
    pca_lighting: float = bounded(0.0, ge=0)
    """AlexNet PCA lighting noise (PS-KD's ImageNet code, pycls): standard deviation of the
    weights of the ImageNet RGB eigenvectors added to [0, 1] pixels, e.g. 0.1; 0 disables it."""
    interpolation: str = one_of("bilinear", ("bilinear", "bicubic", "nearest", "random"))
    """Resize interpolation."""
    crop_pct: float = bounded(0.875, gt=0, le=1)
    """Evaluation centre-crop fraction (resize to img_size / crop_pct, then crop)."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel normalisation mean (RGB)."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel normalisation standard deviation (RGB)."""

    def __post_init__(self) -> None:
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "data.scale", self.scale,
               "must be [low, high] with 0 < low <= high <= 1")
        _check(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "data.ratio", self.ratio,
               "must be [low, high] with 0 < low <= high")
        _check(len(self.mean) == 3, "data.mean", self.mean, "must hold 3 values (RGB)")
        _check(len(self.std) == 3 and all(s > 0 for s in self.std), "data.std", self.std,
               "must hold 3 positive values (RGB)")
        _check(self.rotation == 0 or self.train_crop == "pad_crop", "data.rotation", self.rotation,
               "is only supported with data.train_crop=pad_crop")


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Any ``timm.create_model`` name, including skd's CIFAR models (``skd.models``)."""
    pretrained: bool = False
    """Load timm pretrained weights (needs them cached locally or a hub)."""
    checkpoint: str = ""
    """Initial weights from a local file: safetensors, or a torch file of tensors (a state_dict,
    possibly under ``state_dict``/``model``/``net``/``module``, or an skd checkpoint's student),
    loaded strictly: its names and shapes must be the model's (with this run's class count)."""
    drop_rate: float = bounded(0.0, ge=0, lt=1)
    """Classifier dropout."""
    drop_path_rate: float = bounded(0.0, ge=0, lt=1)
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
    lr: float = bounded(0.1, ge=0)
    """Base learning rate (for the global batch size)."""
    momentum: float = bounded(0.9, ge=0, le=1)
    """Momentum of the SGD variants."""
    weight_decay: float = bounded(5e-4, ge=0)
    """Weight decay (timm applies it decoupled for AdamW-style optimizers)."""
    wd_exclude_norm_bias: bool = False
    """Skip weight decay on norm and bias parameters and on the model's ``no_weight_decay()``
    parameters (timm style). False = the seeds' behaviour (decay on every parameter)."""
    layer_decay: float | None = bounded(None, gt=0, le=1)
    """Layer-wise lr decay (timm ``layer_decay``, ViT fine-tuning): the lr of the student's layer
    groups (its ``group_matcher``) shrinks by this factor per layer from the head down."""
    clip_grad: float | None = bounded(None, gt=0)
    """Clip the global gradient norm to this value."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.optim.create_optimizer_v2``."""


@dataclass
class SchedConfig:
    sched: str = one_of("multistep", ("multistep", "step", "cosine", "tanh", "poly"))
    """timm scheduler (not ``plateau``: the loop passes it no metric)."""
    decay_milestones: list[int] = field(default_factory=lambda: [150, 225])
    """Epochs at which ``multistep`` multiplies the lr by decay_rate (applied from that epoch on)."""
    decay_epochs: float = bounded(30, gt=0)
    """Period of the ``step`` schedule."""
    decay_rate: float = bounded(0.1, gt=0)
    """Factor applied to the lr at each decay."""
    warmup_epochs: int = bounded(0, ge=0)
    """Epochs of linear warm-up from ``warmup_lr``."""
    warmup_lr: float = bounded(1e-5, ge=0)
    """lr at the start of the warm-up."""
    min_lr: float = bounded(0.0, ge=0)
    """Floor of the decaying schedules (cosine, poly)."""
    step_on_epochs: bool = True
    """Update the lr once per epoch (False: every optimizer step, smoother warm-up/cosine)."""

    def __post_init__(self) -> None:
        m = self.decay_milestones
        _check(all(e >= 0 for e in m) and m == sorted(set(m)), "sched.decay_milestones", m,
               "must be distinct epochs >= 0 in increasing order")


@dataclass
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too."""
    decay: float = bounded(0.9998, ge=0, le=1)
    """Weight of the old average at each update."""
    warmup: bool = False
    """timm's EMA warm-up (a smaller decay during the first updates)."""


@dataclass
class MixupConfig:
    """Mixup/CutMix with timm's parameters, one λ per batch (timm ``mode="batch"``: sample i is
    mixed with sample B−1−i). On when ``alpha`` or ``cutmix_alpha`` is positive or
    ``cutmix_minmax`` is set; only methods that accept mixed targets may use it."""

    alpha: float = bounded(0.0, ge=0)
    """Mixup α: λ ~ Beta(α, α); 0 turns Mixup off (DeiT: 0.8)."""
    cutmix_alpha: float = bounded(0.0, ge=0)
    """CutMix α: λ ~ Beta(α, α), a box of 1 − λ of the image pasted from the partner; 0 turns
    CutMix off (DeiT: 1.0)."""
    cutmix_minmax: list[float] | None = None
    """CutMix box sides as [min, max] fractions of the image sides, instead of drawing λ (timm:
    then cutmix_alpha counts as 1)."""
    prob: float = bounded(1.0, ge=0, le=1)
    """Probability that a batch is mixed at all."""
    switch_prob: float = bounded(0.5, ge=0, le=1)
    """With both on: probability that a mixed batch uses CutMix rather than Mixup."""
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    """ε inside the mixed target: each one-hot becomes (1 − ε)·onehot + ε/C before mixing."""
    correct_lam: bool = True
    """CutMix: λ = 1 − (area of the box after clipping to the image) / (image area)."""

    def __post_init__(self) -> None:
        minmax = self.cutmix_minmax
        _check(minmax is None or (len(minmax) == 2 and 0 < minmax[0] < minmax[1] <= 1),
               "mixup.cutmix_minmax", minmax, "must be [min, max] with 0 < min < max <= 1")

    @property
    def enabled(self) -> bool:
        return self.alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of initial weights, data order and augmentation."""
    epochs: int = bounded(300, ge=1)
    """Length of the run; the lr and PS-KD α schedules depend on it."""
    output_dir: str = ""
    """Run directory; empty means ``runs/<time>-<method>-<model>``."""
    resume: str = ""
    """``auto``: continue from the newest checkpoint in output_dir; or a checkpoint path."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Config keys (``epochs``, ``optim.lr``, a section such as ``sched``) that may differ from the
    checkpoint's config on resume; any other difference stops the resume."""
    precision: str = one_of("auto", ("auto", "no", "bf16", "fp16"))
    """``auto`` (bf16 on GPU, fp32 on CPU), ``no``, ``bf16`` or ``fp16``."""
    grad_accum_steps: int = bounded(1, ge=1)
    """Micro-batches per optimizer step."""
    max_steps: int = bounded(0, ge=0)
    """Stop after this many optimizer steps in all, then evaluate and write the run's files as at
    the end of a run (0: no limit). For a quick try of a preset; the lr and method schedules still
    follow ``epochs``."""
    checkpoint_every: int = bounded(0, ge=0)
    """Also checkpoint every N optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = bounded(2, ge=0)
    """How many of the newest checkpoints to keep (0: all)."""
    log_every: int = bounded(50, ge=1)
    """Optimizer steps between log lines (losses reach the host, the NaN check runs)."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers: ``tensorboard``, ``wandb``; empty for none."""
    deterministic: bool = False
    """torch deterministic algorithms, cuDNN benchmark off."""
    dist_bn: str = one_of("reduce", ("reduce", "broadcast", "none"))
    """With several processes, make BatchNorm running statistics (the model's, the method's extra
    modules' and the EMA's) equal on every process before each evaluation and checkpoint, as
    timm's ``--dist-bn``: ``reduce`` averages them, ``broadcast`` takes process 0's; ``none``
    leaves each process its own (the evaluation then mixes statistics of different processes)."""
    divergence_factor: float = bounded(3.0, ge=0)
    """A logged training loss above this many times the run's first logged loss counts as
    diverged: ``checkpoints/last_good.pt`` stays on the newest checkpoint written before it, and a
    run stopped by a NaN names that checkpoint. 0 turns the bound off."""
    best_metric: str = one_of("top1", ("top1", "top5", "nll", "ece", "aurc", "eaurc"))
    """Validation metric that picks the best epoch (``top1``/``top5``: highest; the others: lowest);
    its checkpoint is kept as ``checkpoints/best.pt`` and its weights as ``model_best.safetensors``."""
    save_probs: bool = False
    """Also keep every softmax probability (``[N, C]`` float32) in ``predictions.npz`` and
    ``predictions_best.npz``; they are then gathered across processes at every evaluation."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: get_method_config_class("ce")(name="ce"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    reference: dict[str, Any] = field(default_factory=dict)
    """Informational: where a preset comes from and what it should reach (source, table, metric,
    expected value, notes). Not used by training."""

    def __post_init__(self) -> None:
        _check(self.resume != "auto" or bool(self.output_dir), "resume", self.resume,
               "needs output_dir: the run directory to continue (without one, every run gets a new one)")
        keys = flat_fields(config_to_dict(self))  # as config_differences compares them
        for key in self.resume_allow_changes:
            if not any(in_sections(k, [key]) for k in keys):
                _check(False, "resume_allow_changes", self.resume_allow_changes,
                       f"{key!r} is not a config key or section{_suggest(key, sorted(keys))}")
        if self.mixup.enabled:  # refused before any work: the method must accept mixed targets
            why = get_method_class(self.method.name).mixup_refusal(self.method)
            able = [m for m in list_methods() if get_method_class(m).supports_mixup]
            _check(why is None, "method.name", self.method.name,
                   f"cannot train with Mixup/CutMix (mixup.alpha, mixup.cutmix_alpha): {why}; "
                   f"methods that can: {', '.join(able)}")


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
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {raw!r} is not a YAML value "
                              f"({getattr(e, 'problem', None) or e}); quote a string: {key}=\"'{raw}'\"") from e
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins, and an empty mapping in it replaces (``key={}``
    clears a mapping such as ``model.kwargs``)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (a preset, a run's ``config.yaml``); ``ConfigError`` naming the
    file when it is missing, a directory, empty, not YAML or not a mapping."""
    path = Path(path)
    if path.is_dir():
        presets = sorted(str(p) for p in path.rglob("*.yaml"))
        some = f" such as {', '.join(presets[:3])}{', ...' if len(presets) > 3 else ''}" if presets else ""
        raise ConfigError(f"config file {path} is a directory; give a YAML file{some}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:  # libyaml's safe loader when PyYAML has it: ten times faster (a sweep reads hundreds of presets)
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Demo defaults when no file is given, else the file; then the ``key=value`` overrides.

    An override that switches ``method.name`` drops the preset's method settings, and one that
    switches ``model.name`` drops the preset's ``model.kwargs``: both belong to what was replaced.
    """
    raw = DEMO_OVERRIDES if config_file is None else load_yaml(config_file)
    where = "demo config" if config_file is None else str(config_file)
    update = parse_overrides(list(overrides))
    for section, drop in (("method", None), ("model", "kwargs")):
        new_name = update.get(section, {}).get("name") if isinstance(update.get(section), dict) else None
        old = raw.get(section) if isinstance(raw.get(section), dict) else {}
        if new_name is not None and new_name != old.get("name"):
            kept = {} if drop is None else {k: v for k, v in old.items() if k != drop}
            raw = {**raw, section: kept}
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
    section = cls(**kwargs)
    check_fields(section, prefix)
    return section


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
        if value is None:  # key=null clears a mapping
            return {}
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
    """Write ``cfg`` as YAML through a temporary file: ``path`` is whole or untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def in_sections(key: str, sections: tuple[str, ...] | list[str]) -> bool:
    """The dotted ``key`` is one of ``sections`` or lies inside one (``"optim"`` holds ``"optim.lr"``)."""
    return any(key == p or key.startswith(p + ".") for p in sections)


def flat_fields(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"scale": [0.08, 1.0]}}`` → ``{"data.scale": [0.08, 1.0]}``: one key per config
    field, values kept as they are; the mapping-valued fields (``model.kwargs``,
    ``method.teacher_kwargs``) stay one value, so an empty one is still a key."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key not in ("kwargs", "teacher_kwargs"):
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``, lists as strings (for tracker hyper-parameters)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
