"""Write WebDataset tar shards, ``dataset.json`` and ``samples.npz`` from listed images.

A source lists each split as a ``SplitListing``: class names and ``(image, label)`` items, where an
image is a file or a ``RawImage`` held in memory (records of an archive such as CIFAR's).
``list_image_folder_splits`` lists an ImageFolder; ``write_splits`` writes any listing.

Shards are ``{prefix}-%06d.tar``; each sample is ``{id:09d}.cls`` (ASCII class index) followed by
``{id:09d}.jpg|png|webp``; ``id`` is the global sample id. Tar headers are fixed (mtime 0,
uid/gid 0, mode 0444, ustar), files are taken in sorted order and re-encoding is deterministic,
so the same input gives byte-identical shards.
"""
from __future__ import annotations

import array
import io
import itertools
import multiprocessing
import os
import random
import tarfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from skd.data.dataset_info import DATASET_FILE, DatasetInfo, ShardInfo
from skd.data.sample_index import IMAGE_EXTS, INDEX_FIELDS, INDEX_FILE, write_index
from skd.errors import ConfigError, DataError

IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
"""Files with these extensions (any case) are images; other files in class folders are ignored."""
SPLITS = ("train", "val", "test")
"""Folder names recognised as splits: ``IMAGE_FOLDER/train``, ``/val``, ``/test``."""
DEFAULT_MAX_PER_SHARD = 5000
RESIZE_JPEG_QUALITY = 95
"""JPEG quality of JPEGs shrunk by ``--max-side`` when ``--quality`` is not given."""
_BLOCK = tarfile.BLOCKSIZE
_PIL_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
"""Formats stored as they are. PIL names a JPEG with a multi-picture marker (camera stereo pairs,
phone photos with a gain map) "MPO": it is a JPEG, its first picture the image every decoder reads."""
_TYPECODES = {"int32": "i", "int64": "q", "uint8": "B"}


class ImageFolderError(DataError):
    """The input folder does not have the ImageFolder layout; the message says what is wrong."""


class SkippedImage(Exception):
    """An image file that cannot be used (empty or undecodable)."""


@dataclass(frozen=True)
class RawImage:
    """An 8-bit RGB image held in memory, written as a lossless PNG (unless re-encoding options
    say otherwise)."""
    name: str
    """Where it comes from, for messages (e.g. ``cifar-10-binary.tar.gz:test_batch.bin[17]``)."""
    pixels: np.ndarray
    """uint8 ``[H, W, 3]``."""

    def __str__(self) -> str:
        return self.name


ImageSource = Path | RawImage
"""An image to write: a file, or pixels in memory."""


@dataclass
class SplitListing:
    """One split of a dataset source, in its canonical (sorted / archive) order."""
    split: str
    """``""`` for a dataset without splits (written to ``OUT_DIR`` itself), else the split name
    (written to ``OUT_DIR/split`` with shard prefix ``split``)."""
    class_names: list[str]
    items: list[tuple[ImageSource, int]]
    """(image, class index) of every sample."""
    ignored: int = 0
    """Files of the source that are not images, ignored."""


# ------------------------------------------------------------------------------ writing shards
class ShardSetWriter:
    """Append samples (encoded image, extension, label) to numbered tar shards in ``out_dir``;
    ``close()`` writes ``dataset.json`` and ``samples.npz`` and returns the ``DatasetInfo``."""

    def __init__(self, out_dir: str | Path, class_names: list[str], *, prefix: str = "data",
                 max_per_shard: int = DEFAULT_MAX_PER_SHARD, key_width: int = 9) -> None:
        if max_per_shard < 1:
            raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (DATASET_FILE, INDEX_FILE):  # a half-written directory must not look complete
            (self.out_dir / stale).unlink(missing_ok=True)
        self.class_names = list(class_names)
        self.prefix, self.max_per_shard, self.key_width = prefix, max_per_shard, key_width
        self.shards: list[ShardInfo] = []
        # compact columns (8 bytes or less a value): 14M samples must not become 14M Python ints
        self.columns = {k: array.array(_TYPECODES[np.dtype(dt).name]) for k, dt in INDEX_FIELDS.items()}
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0  # samples in the open shard
        self._offset = 0  # bytes written to the open shard
        self.num_samples = 0

    def add(self, image: bytes, ext: str, label: int) -> int:
        """Write one sample; returns its sample id."""
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {ext!r} is not one of {sorted(IMAGE_EXTS)}")
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"label {label} outside [0, {len(self.class_names)})")
        if self._tar is None or self._count == self.max_per_shard:
            self._open_next()
        sample_id = self.num_samples
        key = f"{sample_id:0{self.key_width}d}"
        sample_offset = self._offset
        self._add_member(f"{key}.cls", str(label).encode("ascii"))
        image_offset = self._add_member(f"{key}.{ext}", image)
        for k, v in (("label", label), ("shard", len(self.shards) - 1), ("offset", sample_offset),
                     ("image_offset", image_offset), ("image_size", len(image)),
                     ("image_ext", IMAGE_EXTS[ext])):
            self.columns[k].append(v)
        self._count += 1
        self.num_samples += 1
        return sample_id

    def _add_member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        assert len(name) < 100, name  # one 512-byte ustar header per member
        self._tar.addfile(info, io.BytesIO(data))
        data_offset = self._offset + _BLOCK
        self._offset = data_offset + -(-len(data) // _BLOCK) * _BLOCK
        return data_offset

    def _open_next(self) -> None:
        self._close_shard()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append(ShardInfo(name, 0))
        self._count, self._offset = 0, 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        name = self.shards[-1].name
        os.replace(self._tmp, self.out_dir / name)
        self.shards[-1] = ShardInfo(name, self._count)
        self._tar = self._file = self._tmp = None

    def close(self) -> DatasetInfo:
        self._close_shard()
        if self.num_samples == 0:
            raise ImageFolderError(f"{self.out_dir}: no samples were written")
        info = DatasetInfo(self.num_samples, len(self.class_names), self.class_names, self.shards)
        write_index(self.out_dir, {k: np.frombuffer(v, dtype=INDEX_FIELDS[k]) if len(v) else
                                   np.zeros(0, INDEX_FIELDS[k]) for k, v in self.columns.items()})
        info.save(self.out_dir)
        return info

    def abort(self) -> None:
        if self._tar is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = self._file = self._tmp = None


# ------------------------------------------------------------------------------- the input
def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_FILE_EXTS


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]], int]:
    """Class names (sorted folder names), ``(file, class index)`` in sorted order, and the
    number of ignored non-image files. Class folders may nest images in subfolders."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a directory")
    entries = sorted((p for p in root.iterdir() if _visible(p)), key=lambda p: p.name)
    stray = [p for p in entries if not p.is_dir() and _is_image(p)]
    if stray:
        raise ImageFolderError(f"{root} holds image files directly (e.g. {stray[0].name}): expected one "
                               "folder per class, each holding that class's images (ImageFolder layout)")
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        raise ImageFolderError(f"{root}: no class folders (expected {root}/CLASS_NAME/IMAGE files)")
    items: list[tuple[Path, int]] = []
    ignored = sum(1 for p in entries if not p.is_dir())
    for label, d in enumerate(class_dirs):
        files = []
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for n in filenames:
                if n.startswith("."):
                    continue
                p = Path(dirpath) / n
                if _is_image(p):
                    files.append(p)
                else:
                    ignored += 1
        if not files:
            raise ImageFolderError(f"class folder {d} holds no images (extensions: {', '.join(IMAGE_FILE_EXTS)}); "
                                   "every class folder must be a directory of images")
        files.sort(key=lambda p: p.relative_to(d).as_posix())
        items.extend((p, label) for p in files)
    return [d.name for d in class_dirs], items, ignored


def find_splits(root: str | Path) -> list[str] | None:
    """The split names when ``root`` holds ``train``/``val``/``test`` folders of class folders."""
    root = Path(root)
    dirs = [p for p in root.iterdir() if p.is_dir() and _visible(p)] if root.is_dir() else []
    splits = [p for p in dirs if p.name in SPLITS and any(c.is_dir() and _visible(c) for c in p.iterdir())]
    if not splits:
        return None
    if len(splits) != len(dirs):
        others = sorted(p.name for p in dirs if p not in splits)
        raise ImageFolderError(f"{root} mixes split folders ({', '.join(sorted(p.name for p in splits))}) "
                               f"with other folders ({', '.join(others)}); use either IMAGE_FOLDER/CLASS/... "
                               "or IMAGE_FOLDER/{train,val,test}/CLASS/...")
    return [s for s in SPLITS if any(p.name == s for p in splits)]


def list_image_folder_splits(image_folder: str | Path) -> list[SplitListing]:
    """``IMAGE_FOLDER/CLASS/*`` as one split ``""``, or ``IMAGE_FOLDER/{train,val,test}/CLASS/*``
    as one listing per split; every split must have the same class folders."""
    image_folder = Path(image_folder)
    if not image_folder.is_dir():
        raise ImageFolderError(f"{image_folder}: not a directory")
    splits = find_splits(image_folder)
    if splits is None:
        names, items, ignored = list_image_folder(image_folder)
        return [SplitListing("", names, items, ignored)]
    listed: list[SplitListing] = []
    for split in splits:
        names, items, ignored = list_image_folder(image_folder / split)
        if listed and names != listed[0].class_names:
            a, b = set(listed[0].class_names), set(names)
            raise ImageFolderError(
                f"the class folders of {image_folder / split} differ from those of "
                f"{image_folder / splits[0]}: only in {splits[0]}: {sorted(a - b)[:10]}, only in "
                f"{split}: {sorted(b - a)[:10]}; every split needs the same class folders")
        listed.append(SplitListing(split, names, items, ignored))
    return listed


# ---------------------------------------------------------------------------- encoding
def encode_image(data: bytes, max_side: int | None = None, quality: int | None = None) -> tuple[bytes, str]:
    """``(bytes, extension)`` to store for one image file; raises ``SkippedImage`` if unusable.

    No option: JPEG/PNG/WebP bytes are kept as they are (after a full decode that proves them
    readable); other formats become PNG. ``max_side``: images whose longer side exceeds it are
    shrunk (aspect kept, Lanczos) and re-encoded (JPEG stays JPEG at quality 95, others PNG).
    ``quality``: every image is re-encoded as JPEG at that quality.
    """
    from PIL import Image
    if not data:
        raise SkippedImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            resize = max_side is not None and max(img.size) > max_side
            if quality is None and not resize and img.format in _PIL_FORMATS:
                return data, _PIL_FORMATS[img.format]
            return _reencode(img, _PIL_FORMATS.get(img.format) == "jpg", max_side, quality)
    except SkippedImage:
        raise
    except Exception as e:  # PIL raises many types for bad input
        raise SkippedImage(f"cannot decode: {type(e).__name__}: {e}") from None


def encode_pixels(image: RawImage, max_side: int | None = None,
                  quality: int | None = None) -> tuple[bytes, str]:
    """``(bytes, extension)`` of an in-memory image: PNG (lossless), or as ``encode_image``
    re-encodes with ``max_side`` / ``quality``."""
    from PIL import Image
    return _reencode(Image.fromarray(image.pixels, "RGB"), False, max_side, quality)


def _reencode(img, jpeg: bool, max_side: int | None, quality: int | None) -> tuple[bytes, str]:
    """Shrink ``img`` to ``max_side`` if larger; JPEG if ``quality`` is given or the input was a
    JPEG (``jpeg``), else PNG."""
    from PIL import Image
    out = img
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if out.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F"):
            out = out.convert("RGBA" if "A" in out.getbands() or "transparency" in out.info else "RGB")
        out = out.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if quality is not None or jpeg:
        if out.mode not in ("L", "RGB"):
            out = out.convert("RGB")
        out.save(buf, format="JPEG", quality=quality or RESIZE_JPEG_QUALITY)
        return buf.getvalue(), "jpg"
    if out.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "P"):
        out = out.convert("RGBA" if "A" in out.getbands() else "RGB")
    out.save(buf, format="PNG")
    return buf.getvalue(), "png"


_Job = tuple[str | RawImage, int | None, int | None]
"""(file path or in-memory image, max_side, quality)."""


def _prepare(job: _Job) -> tuple[bytes, str] | str:
    """Encoded image and extension, or the reason the file is skipped."""
    source, max_side, quality = job
    if isinstance(source, RawImage):
        return encode_pixels(source, max_side, quality)
    try:
        with open(source, "rb") as f:
            data = f.read()
        return encode_image(data, max_side, quality)
    except SkippedImage as e:
        return str(e)
    except OSError as e:
        return f"cannot read: {e}"


def _prepare_chunk(jobs: list[_Job]) -> list[tuple[bytes, str] | str]:
    return [_prepare(job) for job in jobs]


def _prepared(jobs: list, pool, processes: int, chunk: int = 16,
              window: int = 4) -> Iterator[tuple[bytes, str] | str]:
    """``_prepare`` of every job, in order; in ``pool`` with at most ``window`` chunks per process
    in flight, so encoded images never pile up in memory when writing is the slower side."""
    if pool is None:
        yield from map(_prepare, jobs)
        return
    chunks = (jobs[i:i + chunk] for i in range(0, len(jobs), chunk))
    pending: deque = deque()
    for part in itertools.islice(chunks, window * processes):
        pending.append(pool.apply_async(_prepare_chunk, (part,)))
    while pending:
        results = pending.popleft().get()
        part = next(chunks, None)
        if part is not None:
            pending.append(pool.apply_async(_prepare_chunk, (part,)))
        yield from results


# --------------------------------------------------------------------------- the command
@dataclass
class ShardReport:
    splits: dict[str, DatasetInfo] = field(default_factory=dict)
    """``""`` for a folder without splits, else each split name; its written ``DatasetInfo``."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of every image file that was not written."""
    ignored: int = 0
    """Files without an image extension, ignored."""
    stale: list[str] = field(default_factory=list)
    """``*.tar`` files in an output directory that ``dataset.json`` does not list (an earlier run's)."""


def write_split(items: list[tuple[ImageSource, int]], class_names: list[str], out_dir: str | Path, *,
                prefix: str = "data", max_per_shard: int = DEFAULT_MAX_PER_SHARD,
                max_side: int | None = None, quality: int | None = None, workers: int = 1,
                progress: bool = True, desc: str = "shard") -> tuple[DatasetInfo, list[tuple[str, str]]]:
    """Encode ``items`` (image, label) with ``workers`` processes, in order, into one shard set."""
    from tqdm import tqdm
    key_width = max(9, len(str(len(items))))
    writer = ShardSetWriter(out_dir, class_names, prefix=prefix, max_per_shard=max_per_shard,
                            key_width=key_width)
    jobs = [(p if isinstance(p, RawImage) else str(p), max_side, quality) for p, _ in items]
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        for (path, label), result in zip(items, _prepared(jobs, pool, workers)):
            if isinstance(result, str):
                skipped.append((str(path), result))
            else:
                writer.add(result[0], result[1], label)
            bar.update(1)
    except BaseException:
        writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    if writer.num_samples == 0:
        writer.abort()
        raise ImageFolderError(f"{desc}: none of the {len(items)} image files could be decoded")
    return writer.close(), skipped


def write_splits(listings: list[SplitListing], out_dir: str | Path, *,
                 max_per_shard: int = DEFAULT_MAX_PER_SHARD, max_side: int | None = None,
                 quality: int | None = None, workers: int = 1, progress: bool = True,
                 shuffle_seed: int | None = 0, name: str = "data") -> ShardReport:
    """Write every listed split: ``OUT_DIR`` itself for split ``""``, else ``OUT_DIR/split``.

    Samples are written in a permutation of the listed order seeded by ``shuffle_seed``
    (``None``: listed order). A streaming loader only shuffles shards and a bounded buffer, so
    class-sorted shards would give batches of a few classes. ``name`` labels the progress bar of
    a split-less listing.
    """
    out_dir = Path(out_dir)
    if quality is not None and not 1 <= quality <= 100:
        raise ConfigError(f"--quality must be in 1..100, got {quality}")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"--max-side must be >= 1, got {max_side}")
    report = ShardReport()
    for listing in listings:
        items = list(listing.items)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(items)
        dest = out_dir / listing.split if listing.split else out_dir
        info, skipped = write_split(items, listing.class_names, dest, prefix=listing.split or "data",
                                    max_per_shard=max_per_shard, max_side=max_side, quality=quality,
                                    workers=workers, progress=progress, desc=listing.split or name)
        report.splits[listing.split] = info
        report.skipped.extend(skipped)
        report.ignored += listing.ignored
        listed_names = {sh.name for sh in info.shards}
        report.stale += sorted(str(p) for p in dest.glob("*.tar") if p.name not in listed_names)
    return report
