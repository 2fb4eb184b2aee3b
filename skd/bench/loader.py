"""Loader throughput: skd's torch and DALI backends against plain webdataset, on synthetic shards.

    python -m skd.bench loader [--backends torch,dali,dali-reader,webdataset] [--num-images 1200]
        [--batch-size 64] [--num-workers 2] [--device cpu|cuda] [--feed-model resnet50] [--smoke]

The shards are ImageNet-shaped JPEGs written with ``skd shard``'s writer (``ShardSetWriter``):
500×375 (every fourth one 375×500), quality 90, about 110 KB, 1,000 classes; they are made once
under ``--work-dir`` and reused. Every backend applies timm's 224-px training pipeline
(RandomResizedCrop, flip, normalise) to one epoch, batches of ``--batch-size``:

- ``torch``: skd's torch backend, ``--num-workers`` DataLoader processes (PIL + timm).
- ``dali``: skd's DALI backend (the same plan, samples and crop boxes), the CPU pipeline with
  ``--device cpu`` and the GPU decoder with ``--device cuda``; ``--num-workers`` DALI threads and
  ``workers // 4`` shard-reading processes (0: the main process reads, best on 2 cores).
- ``dali-reader``: the alternative design, DALI's own ``fn.readers.webdataset`` with
  ``decoders.image_random_crop`` (DALI's random numbers: no skd plan, resume position or
  partners); the number to beat for the design above.
- ``webdataset``: the plain peer, ``wds.WebDataset(...).shuffle(1000).decode("pil")`` with the
  same timm transform and ``--num-workers`` ``WebLoader`` processes.

``img_per_s`` counts the images after the first batch (worker start-up excluded). With
``--feed-model`` every backend also feeds training steps of that timm model (bf16 autocast on a
GPU, channels_last, SGD), beside a ``synthetic`` row that trains on one batch already on the
device: the ceiling a loader can reach.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

BACKENDS = ("torch", "dali", "dali-reader", "webdataset")
IMAGE_SIZE = (500, 375)
QUALITY = 90
NUM_CLASSES = 1000
CROP = 224
SMOKE_IMAGE_SIZE, SMOKE_CROP = (80, 60), 64


# ------------------------------------------------------------------------------------ data
def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = QUALITY) -> bytes:
    """A photo-like JPEG: a smooth random colour field plus pixel noise, so that it compresses
    like a natural image (about 110 KB at 500×375, quality 90)."""
    from PIL import Image
    coarse = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.int16)
    noisy = np.clip(smooth + rng.integers(-32, 33, smooth.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_synthetic_shards(out_dir: Path, num_images: int, *, size: tuple[int, int] = IMAGE_SIZE,
                           num_classes: int = NUM_CLASSES, quality: int = QUALITY, max_per_shard: int = 400,
                           seed: int = 0) -> Path:
    """Shards of ``num_images`` synthetic JPEGs (label = id mod ``num_classes``; every fourth image
    portrait) in ``out_dir``, written unless a complete set with these settings is there."""
    from skd.data.dataset_info import DatasetInfo
    from skd.data.shard_writer import ShardSetWriter

    out_dir = Path(out_dir)
    stamp = out_dir / "synthetic.json"
    settings = {"num_images": num_images, "size": list(size), "num_classes": num_classes, "quality": quality,
                "max_per_shard": max_per_shard, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        try:
            if DatasetInfo.load(out_dir).num_samples == num_images:
                return out_dir
        except (OSError, ValueError):
            pass
    for old in out_dir.glob("*.tar"):
        old.unlink()
    rng = np.random.default_rng(seed)
    writer = ShardSetWriter(out_dir, [str(c) for c in range(num_classes)], prefix="train",
                            max_per_shard=max_per_shard)
    width, height = size
    for i in range(num_images):
        w, h = (height, width) if i % 4 == 3 else (width, height)
        writer.add(synthetic_jpeg(rng, w, h, quality), "jpg", i % num_classes)
    writer.close()
    stamp.write_text(json.dumps(settings))
    return out_dir


# -------------------------------------------------------------------------------- loaders
def _data_config(backend: str, *, crop: int, num_workers: int, device: torch.device) -> Any:
    from skd.config import DataConfig
    if backend == "dali":
        return DataConfig(backend="dali", dali_device="gpu" if device.type == "cuda" else "cpu",
                          num_workers=num_workers // 4, dali_threads=max(1, num_workers),
                          img_size=crop, shuffle_buffer=1000)
    return DataConfig(backend="torch", num_workers=num_workers, img_size=crop, shuffle_buffer=1000)


def _skd_loader(backend: str, shards: Path, *, batch_size: int, crop: int, num_workers: int,
                device: torch.device, channels_last: bool) -> tuple[Iterable, str]:
    from skd.data.factory import create_data_loader
    cfg = _data_config(backend, crop=crop, num_workers=num_workers, device=device)
    loader = create_data_loader(cfg, shards, train=True, batch_size=batch_size, device=device,
                                channels_last=channels_last)
    workers = (f"{cfg.num_workers} proc + {cfg.dali_threads} thr" if backend == "dali"
               else f"{cfg.num_workers} proc")
    return (batch["image"] for batch in loader), workers


def _webdataset_loader(shards: Path, *, batch_size: int, crop: int, num_workers: int) -> tuple[Iterable, str]:
    import webdataset as wds
    from timm.data import create_transform
    transform = create_transform(crop, is_training=True)
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil")
               .to_tuple("jpg", "cls").map_tuple(transform, int).batched(batch_size, partial=True))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)
    return (images for images, _ in loader), f"{num_workers} proc"


def _dali_reader_loader(shards: Path, *, batch_size: int, crop: int, num_workers: int,
                        device: torch.device, channels_last: bool) -> tuple[Iterable, str]:
    """DALI end to end: its webdataset reader, random crop while decoding, resize, flip, normalise."""
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from skd.config import IMAGENET_MEAN, IMAGENET_STD
    gpu = device.type == "cuda"
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_workers),
                    device_id=(device.index or 0) if gpu else None, seed=0)
    with pipe:
        jpegs = fn.readers.webdataset(paths=sorted(str(p) for p in shards.glob("*.tar")), ext=["jpg"],
                                      random_shuffle=True, initial_fill=1000, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, size=[crop, crop], antialias=True)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), output_layout="HWC" if channels_last
                                          else "CHW", mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD])
        pipe.set_outputs(images)
    pipe.build()
    it = DALIGenericIterator(pipe, ["image"], reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL)

    def batches() -> Iterable[torch.Tensor]:
        for (out,) in it:
            yield out["image"].permute(0, 3, 1, 2) if channels_last else out["image"]
    return batches(), f"{max(1, num_workers)} thr"


def make_loader(backend: str, shards: Path, *, batch_size: int, crop: int, num_workers: int,
                device: torch.device, channels_last: bool) -> tuple[Iterable, str]:
    """One epoch of image batches from ``backend`` and how it was parallelised."""
    if backend in ("torch", "dali"):
        return _skd_loader(backend, shards, batch_size=batch_size, crop=crop, num_workers=num_workers,
                           device=device, channels_last=channels_last)
    if backend == "webdataset":
        return _webdataset_loader(shards, batch_size=batch_size, crop=crop, num_workers=num_workers)
    if backend == "dali-reader":
        return _dali_reader_loader(shards, batch_size=batch_size, crop=crop, num_workers=num_workers,
                                   device=device, channels_last=channels_last)
    raise ValueError(f"unknown loader backend {backend!r}; choose from {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------ measuring
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model_name: str, device: torch.device, num_classes: int) -> Callable[[torch.Tensor], None]:
    import timm

    import skd.models  # noqa: F401  registers skd's CIFAR nets with timm
    model = timm.create_model(model_name, num_classes=num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    labels: dict[int, torch.Tensor] = {}

    def step(images: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if len(images) not in labels:  # setdefault would draw new labels on every step
            labels[len(images)] = torch.randint(0, num_classes, (len(images),), device=device)
        target = labels[len(images)]
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(batches: Iterable[torch.Tensor], consume: Callable[[torch.Tensor], None], device: torch.device,
            limit: int | None = None) -> tuple[int, float]:
    """Images and seconds after the first batch (start-up excluded), at most ``limit`` batches."""
    images, start = 0, None
    for k, batch in enumerate(batches):
        consume(batch)
        if start is None:
            _synchronize(device)
            start = time.perf_counter()
        else:
            images += len(batch)
        if limit is not None and k + 1 >= limit:
            break
    _synchronize(device)
    return images, (time.perf_counter() - start) if start is not None else 0.0


def run_loader_bench(work_dir: Path, *, backends: list[str], num_images: int, batch_size: int,
                     num_workers: int, device: str, feed_model: str | None, smoke: bool) -> list[dict]:
    """One row per backend (and a ``synthetic`` row with ``feed_model``): backend, device, mode
    (``alone`` or the model fed), workers, batch_size, images, seconds, img_per_s."""
    dev = torch.device(device)
    size, crop = (SMOKE_IMAGE_SIZE, SMOKE_CROP) if smoke else (IMAGE_SIZE, CROP)
    shards = write_synthetic_shards(Path(work_dir) / f"synthetic-{num_images}-{size[0]}x{size[1]}", num_images,
                                    size=size)
    step = _train_step(feed_model, dev, NUM_CLASSES) if feed_model else None
    mode = feed_model or "alone"
    rows = []
    if step is not None:
        fixed = torch.randn(batch_size, 3, crop, crop, device=dev).contiguous(memory_format=torch.channels_last)
        step(fixed)  # warm-up: cuDNN algorithm choice, allocator
        limit = max(2, min(num_images // batch_size, 50))
        images, seconds = measure((fixed for _ in range(limit)), step, dev)
        rows.append(dict(backend="synthetic", device=str(dev), mode=mode, workers="-", batch_size=batch_size,
                         images=images, seconds=seconds, img_per_s=images / seconds if seconds else None))
    for backend in backends:
        batches, workers = make_loader(backend, shards, batch_size=batch_size, crop=crop, num_workers=num_workers,
                                       device=dev, channels_last=step is not None)
        consume = step if step is not None else (lambda batch: None)
        images, seconds = measure(batches, consume, dev)
        name = f"{backend} ({'gpu' if dev.type == 'cuda' else 'cpu'})" if backend.startswith("dali") else backend
        rows.append(dict(backend=name, device=str(dev), mode=mode, workers=workers, batch_size=batch_size,
                         images=images, seconds=seconds, img_per_s=images / seconds if seconds else None))
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of the rows, columns as wide as their contents."""
    keys = ("backend", "device", "mode", "workers", "batch_size", "images", "img_per_s")
    cells = [list(keys)] + [[f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, {datetime.now():%Y-%m-%d}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m skd.bench loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="loaders to measure, comma-separated, of " + ", ".join(BACKENDS) + " (default: all)")
    parser.add_argument("--num-images", type=int, default=1200,
                        help="synthetic JPEGs in the shards, one epoch of them measured (default 1200)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="DataLoader / WebLoader processes of torch and webdataset, DALI threads of the "
                             "dali backends (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu: DALI's CPU pipeline; cuda: its GPU decoder, and the fed model on the GPU "
                             "(default: cuda when a GPU is visible)")
    parser.add_argument("--feed-model", default=None, metavar="TIMM_NAME",
                        help="also feed training steps of this timm model, beside a synthetic-batch ceiling row")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "skd" / "bench-loader",
                        help="where the synthetic shards are written once and reused "
                             "(default ~/.cache/skd/bench-loader)")
    parser.add_argument("--smoke", action="store_true", help="tiny images, to check the code paths")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    rows = run_loader_bench(args.work_dir, backends=backends, num_images=args.num_images, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device, feed_model=args.feed_model,
                            smoke=args.smoke)
    print(f"loader throughput ({machine()}; one epoch of {args.num_images} synthetic JPEGs, "
          f"{'smoke sizes' if args.smoke else f'{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} q{QUALITY} -> {CROP} px'})")
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    return 0
