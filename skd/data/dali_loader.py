"""The DALI loading backend (``data.backend=dali``): the torch backend's batches, decoded by NVIDIA DALI.

Which samples a rank reads, in which order and batch, is not decided here: the torch backend's
loader runs unchanged (epoch plan, shard reading in DataLoader workers, shuffle buffer, resume
position, CS-KD partners, label checks), with two hooks of ``create_loader``:

- ``decode`` only parses the image header (format and size). A header that does not parse is a
  corrupt sample, skipped with a warning and counted exactly as in the torch backend.
- the per-sample "transform" draws the augmentation parameters, with the same random calls as
  timm's / torchvision's transforms (``RandomResizedCropAndInterpolation.get_params``,
  ``RandomCrop.get_params``, ``torch.rand(1) < p`` for the flip, ``RandomRotation.get_params``),
  under the same per-batch seeds. Both backends therefore cut the same boxes and flip the same
  samples; the pixels differ only by the decoder's and resizer's rounding.

The workers ship batches of encoded bytes and parameters (uint8 / float64 tensors, through shared
memory); here they are fed to a DALI pipeline through ``fn.external_source``: decode (libjpeg-turbo
on the CPU, nvJPEG and the hardware JPEG decoder on the GPU), crop, resize, rotate, flip and
normalise. DALI runs one batch ahead of the consumer, on its own threads. DALI's own random
operators are not used, so the output is a function of (seed, epoch, rank, batch): deterministic,
and a resumed epoch continues with the very batches of the uninterrupted one.

An image that parses but does not decode in DALI (a truncated JPEG) fails its whole DALI batch;
the batch is then decoded sample by sample to find it, and the sample (with its CS-KD partner, or
the anchor of a bad partner) is dropped and counted in ``num_corrupt``; a DLB repeated sample that
does not decode is dropped from the repeated half (its own batch counted it).

Nothing here imports DALI at module level: ``import skd.data`` works without it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import os
import random
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from skd.batch import Batch
from skd.data.loader import ShardLoader, create_loader
from skd.errors import ConfigError

_log = logging.getLogger("skd.data")

INSTALL_HINT = "pip install 'skd[dali]'"
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000"})
"""Image formats (PIL's names) that DALI's decoders read; another format is a corrupt sample."""
UNSUPPORTED = ("color_jitter", "auto_augment", "re_prob", "pca_lighting")
"""Augmentations of the torch backend that the DALI pipeline does not have (off when falsy)."""
INTERP_CODES = {"nearest": 0, "bilinear": 1, "bicubic": 2}
"""Interpolations, numbered as DALI's ``DALIInterpType`` (INTERP_NN, INTERP_LINEAR, INTERP_CUBIC)."""

# A process forked from one that runs DALI pipelines (a DataLoader worker) inherits the pipeline
# objects but not their threads; if its garbage collector finalised one (an unreachable cycle of
# the parent's), DALI's shutdown would wait forever for those threads. Forked children hold every
# pipeline instead: they end with os._exit, finalising nothing.
_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_HELD_IN_CHILD: list = []
os.register_at_fork(after_in_child=lambda: _HELD_IN_CHILD.extend(_PIPELINES))

# Columns of the per-sample parameter rows (float64, exact for the integers they hold).
TOP, LEFT, HEIGHT, WIDTH, FLIP, INTERP, ANGLE, RESIZE_H, RESIZE_W = range(9)
NUM_PARAMS = 9


# ---------------------------------------------------------------------------------- checks
def check_dali_config(cfg: Any, *, training: bool = True) -> None:
    """Raise ``ConfigError`` naming the config key when ``data.backend=dali`` cannot run here: DALI
    is not installed, a GPU pipeline is asked for without a GPU, or (``training``) an augmentation
    DALI's pipeline lacks is set. Imports no DALI (``skd.environment.check_environment`` calls it
    before anything else of a run)."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        raise ConfigError(f"config key 'data.backend' = 'dali': NVIDIA DALI is not installed; "
                          f"{INSTALL_HINT} (Linux x86_64 or aarch64), or use data.backend=torch")
    if cfg.dali_device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("config key 'data.dali_device' = 'gpu': this process sees no CUDA GPU; set "
                          "data.dali_device=cpu (DALI's CPU pipeline) or data.backend=torch")
    for key in UNSUPPORTED if training else ():
        value = getattr(cfg, key)
        if value:
            raise ConfigError(f"config key 'data.{key}' = {value!r}: not available with data.backend=dali "
                              f"(crops, flips, rotation and normalisation only); use data.backend=torch")


def import_dali() -> Any:
    """``nvidia.dali``, or an ``ImportError`` that says how to install it."""
    try:
        import nvidia.dali
    except ImportError as e:
        raise ImportError(f"data.backend=dali needs NVIDIA DALI: {INSTALL_HINT} ({e})") from None
    return nvidia.dali


# ------------------------------------------------------- worker side: header + parameters
@dataclass
class EncodedImage:
    """One sample's encoded image, its header-only PIL image, and its augmentation parameters."""
    data: bytes
    header: Any
    params: tuple = ()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header."""
        return self.header.size


def read_header(data: bytes) -> EncodedImage:
    """The ``decode`` hook: parse the header only; raise for a sample DALI cannot decode."""
    from PIL import Image
    header = Image.open(io.BytesIO(data))  # lazy: reads the header, decodes nothing
    if header.format not in DALI_FORMATS:
        raise ValueError(f"image format {header.format} is not decoded by DALI")
    width, height = header.size
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}")
    return EncodedImage(data, header)


def _params(top: int, left: int, height: int, width: int, flip: bool = False, interp: int = 1,
            angle: float = 0.0, resize_h: int = 0, resize_w: int = 0) -> tuple:
    return (top, left, height, width, float(flip), interp, angle, resize_h, resize_w)


def _flip(p: float) -> bool:
    """torchvision's ``RandomHorizontalFlip`` draw (no draw when the flip is off, as no flip op
    is in the torch pipeline then)."""
    return p > 0 and bool(torch.rand(1) < p)


class RandomResizedCropParams:
    """timm's training pipeline (``train_crop=rrc``): RandomResizedCropAndInterpolation, then
    RandomHorizontalFlip. The box is cut from the source image and resized to ``img_size``."""

    def __init__(self, cfg: Any) -> None:
        self.scale, self.ratio = tuple(cfg.scale), tuple(cfg.ratio)
        self.hflip, self.interpolation = cfg.hflip, cfg.interpolation

    def __call__(self, image: EncodedImage) -> EncodedImage:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(image.header, self.scale,
                                                                                self.ratio)
        if self.interpolation == "random":  # timm draws it after the box
            interp = random.choice((INTERP_CODES["bilinear"], INTERP_CODES["bicubic"]))
        else:
            interp = INTERP_CODES[self.interpolation]
        image.params = _params(top, left, height, width, _flip(self.hflip), interp)
        return image


class PadCropParams:
    """The CIFAR recipe (``train_crop=pad_crop``): RandomCrop(img_size, padding) with zero padding,
    RandomHorizontalFlip, RandomRotation (nearest, zero fill). No resize."""

    def __init__(self, cfg: Any) -> None:
        self.size, self.padding = cfg.img_size, cfg.crop_padding
        self.hflip, self.rotation = cfg.hflip, cfg.rotation

    def __call__(self, image: EncodedImage) -> EncodedImage:
        from torchvision import transforms as T
        width, height = image.size
        pad = self.padding
        # get_params reads only the shape of the padded image: a stride-0 view allocates nothing.
        padded = torch.empty(()).expand(3, height + 2 * pad, width + 2 * pad)
        top, left, _, _ = T.RandomCrop.get_params(padded, (self.size, self.size))
        flip = _flip(self.hflip)
        angle = T.RandomRotation.get_params([-self.rotation, self.rotation]) if self.rotation > 0 else 0.0
        # The pipeline rotates before it mirrors: rotate(flip(x), a) = flip(rotate(x, -a)).
        image.params = _params(top - pad, left - pad, self.size, self.size, flip,
                               INTERP_CODES["nearest"], -angle if flip else angle)
        return image


class CenterCropParams:
    """timm's evaluation pipeline: Resize(floor(img_size / crop_pct)) of the shorter side (the
    longer one truncated as torchvision does), then CenterCrop(img_size)."""

    def __init__(self, cfg: Any) -> None:
        self.size = cfg.img_size
        self.scale_size = math.floor(cfg.img_size / cfg.crop_pct)
        # timm's evaluation transform has no random interpolation; bilinear stands in for it.
        self.interp = INTERP_CODES.get(cfg.interpolation, INTERP_CODES["bilinear"])

    def __call__(self, image: EncodedImage) -> EncodedImage:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.scale_size * long / short)
        resize_w, resize_h = (self.scale_size, new_long) if width <= height else (new_long, self.scale_size)
        top = round((resize_h - self.size) / 2.0)  # torchvision's center_crop
        left = round((resize_w - self.size) / 2.0)
        image.params = _params(top, left, self.size, self.size, interp=self.interp,
                               resize_h=resize_h, resize_w=resize_w)
        return image


def collate_encoded(images: list[EncodedImage]) -> dict[str, torch.Tensor]:
    """The ``collate`` hook: one uint8 tensor of all encoded bytes, their sizes, the parameters."""
    sizes = [len(image.data) for image in images]
    data = torch.empty(sum(sizes), dtype=torch.uint8)
    flat, pos = data.numpy(), 0
    for image, size in zip(images, sizes):
        flat[pos:pos + size] = np.frombuffer(image.data, dtype=np.uint8)
        pos += size
    params = torch.tensor([image.params for image in images], dtype=torch.float64).reshape(-1, NUM_PARAMS)
    return {"data": data, "sizes": torch.tensor(sizes, dtype=torch.int64), "params": params}


# ------------------------------------------------------------------ main side: the pipeline
@dataclass(frozen=True)
class PipelineSpec:
    """What the DALI graph does, and where."""
    mode: str
    """``rrc``, ``pad_crop`` or ``eval``."""
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rotation: bool
    device_id: int | None
    """GPU index for ``mixed`` decoding; None: the CPU pipeline."""
    threads: int
    max_batch: int
    hw_decoder_load: float
    dtype: str
    """``float32``, ``float16`` or ``bfloat16`` (cast by torch: DALI has no bf16 output)."""
    channels_last: bool


def build_pipeline(spec: PipelineSpec) -> Any:
    """The DALI graph of ``spec``, built; its inputs are fed with ``Pipeline.feed_input``."""
    dali = import_dali()
    from nvidia.dali import fn, types

    gpu = spec.device_id is not None
    pipe = dali.Pipeline(batch_size=spec.max_batch, num_threads=spec.threads, device_id=spec.device_id,
                         prefetch_queue_depth=1, exec_dynamic=True)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=1)  # (top, left)
        shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)  # (height, width)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        if spec.mode != "pad_crop":
            interp = fn.cast(fn.external_source(name="interp", dtype=types.INT32, ndim=0),
                             dtype=types.INTERP_TYPE)
        decoder = dict(device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
        if gpu:
            decoder["hw_decoder_load"] = spec.hw_decoder_load
        if spec.mode == "rrc":
            # Only the box is decoded (ROI decoding), then resized: torchvision's resized_crop.
            images = fn.decoders.image_slice(encoded, start, shape, axis_names="HW", **decoder)
            images = fn.resize(images, size=[spec.img_size, spec.img_size], interp_type=interp, antialias=True)
        elif spec.mode == "pad_crop":
            images = fn.decoders.image(encoded, **decoder)
            images = fn.slice(images, start, shape, axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
            if spec.rotation:
                angle = fn.external_source(name="angle", dtype=types.FLOAT, ndim=0)
                images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0,
                                   interp_type=types.INTERP_NN)
        else:
            resize = fn.external_source(name="resize", dtype=types.FLOAT, ndim=1)  # (height, width)
            images = fn.decoders.image(encoded, **decoder)
            images = fn.resize(images, size=resize, interp_type=interp, antialias=True)
            images = fn.slice(images, start, shape, axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std],
            output_layout="HWC" if spec.channels_last else "CHW",
            dtype=types.FLOAT16 if spec.dtype == "float16" else types.FLOAT)
        pipe.set_outputs(images)
    pipe.build()
    _PIPELINES.add(pipe)
    return pipe


class _Runner:
    """One DALI pipeline with at most one batch in flight; rebuilt after a decoding failure."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.pipe = build_pipeline(spec)
        self.device = torch.device("cuda", spec.device_id) if spec.device_id is not None else torch.device("cpu")
        self._inflight: tuple[list[np.ndarray], np.ndarray] | None = None
        self._owner: object = None  # the iteration whose batch is in flight

    def submit(self, encoded: list[np.ndarray], params: np.ndarray, owner: object) -> None:
        """Start decoding a batch (returns at once; DALI works on its own threads). A batch left
        in flight by an abandoned iteration (another ``owner``) is dropped first."""
        if self._inflight is not None:
            self.discard(self._owner)
        if encoded:
            self._feed(encoded, params)
            self.pipe.schedule_run()
        self._inflight, self._owner = (encoded, params), owner

    def collect(self, owner: object) -> tuple[torch.Tensor, np.ndarray]:
        """The submitted batch's images ``[n,3,H,W]`` and the mask of its samples that decoded."""
        if self._inflight is None or self._owner is not owner:
            raise RuntimeError("a newer iteration of this DALI loader has started; one loader iterates "
                               "one epoch at a time")
        encoded, params = self._inflight
        self._inflight = None
        ok = np.ones(len(encoded), dtype=bool)
        if not encoded:
            return self._empty(), ok
        try:
            (out,) = self.pipe.outputs()
        except RuntimeError:  # some sample does not decode: find it, alone
            self.pipe = build_pipeline(self.spec)
            for k in range(len(encoded)):
                ok[k] = self._run([encoded[k]], params[k:k + 1]) is not None
            keep = np.flatnonzero(ok)
            out = self._run([encoded[k] for k in keep], params[keep]) if len(keep) else None
            if out is None:  # nothing decoded (or only alone): drop the whole batch
                ok[:] = False
                return self._empty(), ok
        return self._to_torch(out), ok

    def discard(self, owner: object) -> None:
        """Drop ``owner``'s batch if it is still in flight (the consumer left the loop early)."""
        if self._inflight is None or self._owner is not owner:
            return
        if self._inflight[0]:
            try:
                self.pipe.outputs()
            except RuntimeError:
                self.pipe = build_pipeline(self.spec)
        self._inflight = None

    def _run(self, encoded: list[np.ndarray], params: np.ndarray) -> Any:
        try:
            self._feed(encoded, params)
            self.pipe.schedule_run()
            return self.pipe.outputs()[0]
        except RuntimeError:
            self.pipe = build_pipeline(self.spec)
            return None

    def _feed(self, encoded: list[np.ndarray], params: np.ndarray) -> None:
        feed, mode = self.pipe.feed_input, self.spec.mode
        feed("encoded", encoded)
        feed("start", np.ascontiguousarray(params[:, [TOP, LEFT]], dtype=np.int32))
        feed("shape", np.ascontiguousarray(params[:, [HEIGHT, WIDTH]], dtype=np.int32))
        feed("mirror", params[:, FLIP].astype(np.int32))
        if mode != "pad_crop":
            feed("interp", params[:, INTERP].astype(np.int32))
        if mode == "pad_crop" and self.spec.rotation:
            feed("angle", params[:, ANGLE].astype(np.float32))
        if mode == "eval":
            feed("resize", np.ascontiguousarray(params[:, [RESIZE_H, RESIZE_W]], dtype=np.float32))

    def _to_torch(self, out: Any) -> torch.Tensor:
        # DALI's dynamic executor hands over each output batch (no buffer reuse): zero-copy.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            images = torch.from_dlpack(out.as_tensor())
        if self.spec.channels_last:  # NHWC memory seen as NCHW: torch's channels_last format
            images = images.permute(0, 3, 1, 2)
        if self.spec.dtype == "bfloat16":
            images = images.to(torch.bfloat16)
        return images

    def _empty(self) -> torch.Tensor:
        size = self.spec.img_size
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.spec.dtype]
        return torch.zeros((0, 3, size, size), dtype=dtype, device=self.device)


def _split(entry: dict[str, torch.Tensor]) -> tuple[list[np.ndarray], np.ndarray]:
    """A collated entry → per-sample uint8 views of the encoded bytes, and the parameter rows."""
    data = entry["data"].numpy()
    ends = np.cumsum(entry["sizes"].numpy())
    starts = ends - entry["sizes"].numpy()
    return [data[a:b] for a, b in zip(starts, ends)], entry["params"].numpy()


# ----------------------------------------------------------------------------- the loader
class DaliLoader:
    """A ``ShardLoader`` whose images DALI decodes: the same interface and batches (``image``,
    ``label``, ``index`` [+ ``partner``, ``partner_index``] [+ ``repeat``, ``repeat_label``,
    ``repeat_index``]), images on the DALI device.

    ``len``, ``set_epoch``, ``state_dict``/``load_state_dict`` and ``info`` are the inner torch
    loader's; the state returned during an iteration is the one after the last batch yielded
    (DALI decodes one batch ahead). ``num_corrupt`` counts skipped samples of yielded batches:
    bad headers (found by the workers) and images DALI could not decode.
    """

    def __init__(self, encoded: ShardLoader, spec: PipelineSpec) -> None:
        self._encoded, self.spec = encoded, spec
        self.info = encoded.info
        self._runner: _Runner | None = None
        self._state: dict | None = None  # inner state after the last yielded batch
        self._header_corrupt = 0  # inner loader's count after the last yielded batch
        self._decode_corrupt = 0

    @property
    def num_corrupt(self) -> int:
        """Corrupt samples skipped so far (summed over the batches this process received)."""
        return self._header_corrupt + self._decode_corrupt

    def __len__(self) -> int:
        return len(self._encoded)

    @property
    def epoch(self) -> int:
        return self._encoded.epoch

    def set_epoch(self, epoch: int) -> None:
        self._encoded.set_epoch(epoch)
        self._state = None

    def state_dict(self) -> dict:
        return dict(self._state) if self._state is not None else self._encoded.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._encoded.load_state_dict(state)
        self._state = None

    def __iter__(self) -> Iterator[Batch]:
        if self._runner is None:
            self._runner = _Runner(self.spec)
        runner, owner = self._runner, object()
        self._state = None
        batches = iter(self._encoded)
        current = self._pull(batches)
        try:
            if current is not None:
                self._submit(current[0], owner)
            while current is not None:
                batch, state, header_corrupt = current
                images, ok = runner.collect(owner)
                upcoming = self._pull(batches)
                if upcoming is not None:
                    self._submit(upcoming[0], owner)  # decodes while the consumer uses this batch
                self._state, self._header_corrupt = state, header_corrupt
                yield self._assemble(batch, images, ok)
                current = upcoming
        finally:
            runner.discard(owner)

    def _pull(self, batches: Iterator[dict]) -> tuple[dict, dict, int] | None:
        batch = next(batches, None)
        if batch is None:
            return None
        return batch, self._encoded.state_dict(), self._encoded.num_corrupt

    def _submit(self, batch: Batch, owner: object) -> None:
        encoded, params = _split(batch["image"])
        for key in ("partner", "repeat"):  # they ride in the same DALI batch, after the anchors
            if key in batch:
                more, more_params = _split(batch[key])
                encoded, params = encoded + more, np.concatenate([params, more_params])
        self._runner.submit(encoded, params, owner)

    def _assemble(self, batch: Batch, images: torch.Tensor, ok: np.ndarray) -> dict[str, torch.Tensor]:
        """The output batch; samples whose image (or partner) DALI could not decode are dropped.
        ``images`` holds the decoded samples only: anchors first, then partners, then DLB's
        repeated samples."""
        n = len(batch["label"])
        with_partner = "partner" in batch
        keep = ok[:n] & ok[n:2 * n] if with_partner else ok[:n]
        out = {"label": batch["label"], "index": batch["index"]}
        if with_partner:
            out["partner_index"] = batch["partner_index"]
        rows = np.cumsum(ok) - 1  # row of each decoded sample in `images`
        if "repeat" in batch:
            # A repeated sample that does not decode was counted when its own batch dropped it.
            first = 2 * n if with_partner else n
            repeated = ok[first:]
            if repeated.all():  # the usual case: the last rows, a view (no gather, no index upload)
                out["repeat"] = images[int(ok[:first].sum()):]
                out["repeat_label"], out["repeat_index"] = batch["repeat_label"], batch["repeat_index"]
            else:
                out["repeat"] = images[torch.as_tensor(rows[first:][repeated], device=images.device)]
                out["repeat_label"] = batch["repeat_label"][torch.as_tensor(repeated)]
                out["repeat_index"] = batch["repeat_index"][torch.as_tensor(repeated)]
        if keep.all():
            out["image"] = images[:n]
            if with_partner:
                out["partner"] = images[n:2 * n]
            return out
        for k in np.flatnonzero(~keep):
            _log.warning("skipping corrupt sample id %d: DALI could not decode %s", int(batch["index"][k]),
                         "its image" if not ok[k] else "the image of its CS-KD partner")
        self._decode_corrupt += int((~keep).sum())
        kept = torch.as_tensor(keep)
        out.update({k: out[k][kept] for k in ("label", "index", "partner_index") if k in out})
        out["image"] = images[torch.as_tensor(rows[:n][keep])]
        if with_partner:
            out["partner"] = images[torch.as_tensor(rows[n:2 * n][keep])]
        return out


def create_dali_loader(shard_dir: str | Path, cfg: Any, *, train: bool, batch_size: int,
                       device: torch.device | None = None, channels_last: bool = False,
                       **plan: Any) -> DaliLoader:
    """A ``DaliLoader`` over ``shard_dir``: DALI's settings and the augmentation from the
    ``DataConfig`` ``cfg`` (``dali_device``, ``dali_threads``, ``dali_hw_decoder_load``,
    ``dali_dtype``, crop keys); ``plan`` is passed on to ``create_loader`` (seed, rank, world
    size, workers, shuffle buffer, drop_last, the method's loader options). ``device`` is the GPU
    to decode on (default: the current one)."""
    import_dali()  # the config itself was checked when it was built
    if train:
        mode = cfg.train_crop
        params = RandomResizedCropParams(cfg) if mode == "rrc" else PadCropParams(cfg)
    else:
        mode, params = "eval", CenterCropParams(cfg)
    device_id = None
    if cfg.dali_device == "gpu":
        device_id = device.index if device is not None and device.type == "cuda" and device.index is not None \
            else torch.cuda.current_device()
    encoded = create_loader(shard_dir, train=train, batch_size=batch_size, transform=params,
                            pin_memory=False, decode=read_header, collate=collate_encoded, **plan)
    images_per_sample = 1 + bool(plan.get("with_partner")) + bool(plan.get("repeat_previous"))
    spec = PipelineSpec(mode=mode, img_size=cfg.img_size, mean=tuple(cfg.mean), std=tuple(cfg.std),
                        rotation=train and mode == "pad_crop" and cfg.rotation > 0, device_id=device_id,
                        threads=cfg.dali_threads, max_batch=batch_size * images_per_sample,
                        hw_decoder_load=cfg.dali_hw_decoder_load, dtype=cfg.dali_dtype,
                        channels_last=channels_last)
    return DaliLoader(encoded, spec)
