"""The embedded demo's data: scikit-learn's digits as shards, written once into a cache.

``load_digits()`` ships inside scikit-learn (1,797 real 8×8 grey images, 10 classes; no download).
Each image is scaled to 0..255, upscaled to 32×32 (bilinear), stored as RGB PNG (lossless), and
split 80/20 stratified with a fixed seed: 1,437 train, 360 val. Shards are small on purpose
(256 train / 128 val samples each) so the demo runs the multi-shard, multi-worker paths.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from skd.data.dataset_info import DATASET_FILE
from skd.data.sample_index import INDEX_FILE

DIGITS_NAME = "digits-32px-v1"
IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0
SHARD_SIZES = {"train": 256, "val": 128}


def default_cache_dir() -> Path:
    """``$SKD_CACHE``, else ``~/.cache/skd``."""
    return Path(os.environ.get("SKD_CACHE") or Path.home() / ".cache" / "skd")


def digits_images() -> tuple[list[bytes], np.ndarray]:
    """PNG bytes (32×32 RGB) and labels of all 1,797 digits, in scikit-learn's order."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    encoded = []
    for img in pixels:
        big = Image.fromarray(img).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        big.convert("RGB").save(buf, format="PNG")
        encoded.append(buf.getvalue())
    return encoded, digits.target.astype(np.int64)


def digits_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified, seeded 80/20 split of the digit ids (each part in ascending id order)."""
    from sklearn.model_selection import train_test_split
    ids = np.arange(len(labels))
    train, val = train_test_split(ids, test_size=VAL_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(val)}


def _complete(root: Path) -> bool:
    """Every split's dataset.json, samples.npz and every shard it lists."""
    from skd.data.dataset_info import DatasetInfo, DatasetInfoError
    for split in SHARD_SIZES:
        if not all((root / split / f).is_file() for f in (DATASET_FILE, INDEX_FILE)):
            return False
        try:
            info = DatasetInfo.load(root / split)
        except DatasetInfoError:
            return False
        if not all((root / split / s.name).is_file() for s in info.shards):
            return False
    return True


def digits_shards(cache_dir: str | Path | None = None) -> Path:
    """Root directory holding ``train/`` and ``val/`` shard directories of the digits, written
    the first time they are needed. Safe when several processes call it at once: each writes
    into its own temporary directory and renames it into place; the first rename wins."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / DIGITS_NAME
    if _complete(root):
        return root
    from skd.data.shard_writer import ShardSetWriter
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIGITS_NAME}.", dir=cache))
    try:
        images, labels = digits_images()
        class_names = [str(d) for d in range(10)]
        for split, ids in digits_split(labels).items():
            writer = ShardSetWriter(tmp / split, class_names, prefix=split, max_per_shard=SHARD_SIZES[split])
            for i in ids:
                writer.add(images[i], "png", int(labels[i]))
            writer.close()
        for attempt in range(2):
            try:
                os.rename(tmp, root)
                break
            except OSError:
                if _complete(root):  # another process got there first
                    break
                if attempt:
                    raise
                # A damaged copy (files deleted by hand): move it aside, then retry.
                trash = Path(tempfile.mkdtemp(prefix=f".{DIGITS_NAME}.old.", dir=cache))
                with contextlib.suppress(OSError):
                    os.rename(root, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
