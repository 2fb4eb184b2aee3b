"""The per-sample index beside ``dataset.json``, and the tar scan that builds it.

``samples.npz`` (uncompressed, so every array is memory-mapped in place) holds one row per
sample, in sample-id order:

=================  ========  ======================================================
``label``          int32     class index (from ``cls``)
``shard``          int32     index of the shard in ``dataset.json``
``offset``         int64     byte offset of the sample's first tar header in its shard
``image_offset``   int64     byte offset of the image member's data
``image_size``     int64     size of the image member's data
``image_ext``      uint8     0 ``jpg``, 1 ``png``, 2 ``webp`` (:data:`IMAGE_EXTS`)
=================  ========  ======================================================

33 bytes a sample: 42 MB for ImageNet-1k. It gives the loader and CS-KD's partner drawing the
labels of all samples without a scan, and random access to any image by one ``pread``.

Samples are grouped from tar members exactly as webdataset does (``webdataset.tariterators``:
key = the member name up to the first dot of its base name, consecutive members with one key
form a sample, ``__meta__`` files and non-regular members skipped), so the position of a sample
in its shard is the one any webdataset reader sees.
"""
from __future__ import annotations

import os
import re
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from skd.data.dataset_info import DatasetInfo
from skd.errors import DataError, MissingFileError

INDEX_FILE = "samples.npz"
EXT_NAMES = ("jpg", "png", "webp")
"""Image extension of each ``image_ext`` code; the name written by ``skd shard``."""
IMAGE_EXTS = {"jpg": 0, "jpeg": 0, "png": 1, "webp": 2}
"""Member extensions decoded as images (and their ``image_ext`` code). Nothing else is decoded
except ``cls`` (ASCII label) and, when there is no ``cls``, ``json`` (a ``label`` field)."""
INDEX_FIELDS = {"label": np.int32, "shard": np.int32, "offset": np.int64, "image_offset": np.int64,
                "image_size": np.int64, "image_ext": np.uint8}
_META = re.compile(r"__[^/]*__($|/)")
_MAX_JSON = 1 << 20


class ShardFormatError(DataError):
    """A shard does not hold what ``dataset.json`` or the sample format promises."""


# ----------------------------------------------------------------------------------- reading
@dataclass
class RawSample:
    """One sample of a tar scan: where it and its image lie, and its label bytes."""
    key: str
    shard: str
    """Shard file name (for messages)."""
    offset: int
    image_ext: str | None = None
    image_offset: int = -1
    image_size: int = 0
    cls: bytes | None = None
    json: bytes | None = None

    def label(self) -> int:
        """The class index from ``cls`` (or ``json["label"]``); errors name the shard and key."""
        if self.cls is not None:
            text = self.cls.decode("ascii", errors="replace").strip()
        elif self.json is not None:
            import json
            try:
                meta = json.loads(self.json)
                text = str(meta.get("label", meta.get("cls", ""))) if isinstance(meta, dict) else ""
            except ValueError:
                text = ""
        else:
            raise ShardFormatError(f"{self.shard}: sample '{self.key}' has no 'cls' label")
        if not text.isdigit():
            raise ShardFormatError(f"{self.shard}: sample '{self.key}' has label {text!r}, "
                                   "not a non-negative integer")
        return int(text)


def _base_plus_ext(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(name)


def iter_shard(path: str | Path) -> Iterator[RawSample]:
    """The samples of one tar shard, in order: keys, positions, image offsets and label bytes
    (only ``cls``/``json`` members are read; images stay on disk). A damaged or truncated shard
    raises ``ShardFormatError`` saying how many of its samples were complete."""
    name = Path(path).name
    path = str(path)
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            if os.fstat(f.fileno()).st_size == 0:
                return  # an empty file is an empty shard
            raise ShardFormatError(f"{name}: not a readable tar file: {e}") from None
        current: RawSample | None = None
        position = 0

        def found() -> str:
            return f" ({position} complete samples before it)"

        try:
            while True:
                info = tar.next()
                tar.members = []  # keep memory flat over huge shards
                if info is None:
                    break
                fname = info.name
                if not info.isreg() or ("/" not in fname and fname.startswith("__") and fname.endswith("__")):
                    continue
                if _META.match(fname):
                    continue
                key, ext = _base_plus_ext(fname)
                if key is None:
                    continue
                ext = ext.lower()
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                        position += 1
                    current = RawSample(key=key, shard=name, offset=info.offset)
                if ext in IMAGE_EXTS:
                    if current.image_ext is not None:
                        if current.image_ext == ext:
                            raise ShardFormatError(f"{name}: sample '{key}' has two '{ext}' members")
                        continue  # a second image format of the same sample: the first one wins
                    current.image_ext, current.image_offset, current.image_size = ext, info.offset_data, info.size
                elif ext == "cls":
                    if current.cls is not None:
                        raise ShardFormatError(f"{name}: sample '{key}' has two 'cls' members")
                    current.cls = _read_member(f, info, name, key, found)
                elif ext == "json" and info.size <= _MAX_JSON:
                    current.json = _read_member(f, info, name, key, found)
        except (tarfile.TarError, EOFError, OSError) as e:
            where = f"sample '{current.key}'" if current is not None else "its start"
            raise ShardFormatError(f"{name}: damaged tar file after {where}: {e}{found()}") from None
        # tarfile ends quietly at an invalid header after the first one; only zero blocks may follow.
        if current is not None:
            position += 1  # the last sample is complete: its members were read
        _check_end_of_archive(f, tar.offset, name, found)
        if current is not None:
            yield current


def _check_end_of_archive(f, offset: int, shard: str, found: Callable[[], str]) -> None:
    f.seek(offset)
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise ShardFormatError(f"{shard}: damaged tar header at byte {offset}{found()}; the shard has "
                                   f"data after it that cannot be read (re-create or re-download the shard)")


def _read_member(f, info: tarfile.TarInfo, shard: str, key: str, found: Callable[[], str]) -> bytes:
    f.seek(info.offset_data)
    data = f.read(info.size)
    if len(data) != info.size:
        raise ShardFormatError(f"{shard}: sample '{key}': file ends inside member {info.name}{found()}")
    return data


def scan_shard(path: str | Path, shard_index: int = 0) -> dict[str, np.ndarray]:
    """Index rows for every sample of one shard, reading only headers and labels."""
    rows: dict[str, list] = {k: [] for k in INDEX_FIELDS}
    for s in iter_shard(path):
        if s.image_ext is None:
            raise ShardFormatError(f"{Path(path).name}: sample '{s.key}' has no image "
                                   f"(expected one of {sorted(IMAGE_EXTS)})")
        for k, v in (("label", s.label()), ("shard", shard_index), ("offset", s.offset),
                     ("image_offset", s.image_offset), ("image_size", s.image_size),
                     ("image_ext", IMAGE_EXTS[s.image_ext])):
            rows[k].append(v)
    columns = {k: np.asarray(v, dtype=INDEX_FIELDS[k]) for k, v in rows.items()}
    # Cut inside an image: its header was still whole.
    check_not_truncated(Path(path).name, columns["image_offset"] + columns["image_size"], os.path.getsize(path))
    return columns


def check_not_truncated(shard: str, image_ends: np.ndarray, size: int) -> None:
    """Raise ``ShardFormatError`` if the shard file (``size`` bytes) ends before one of its
    samples' images does (``image_ends``: each image's end offset), saying how many are complete."""
    if len(image_ends) and int(image_ends.max()) > size:
        raise ShardFormatError(f"{shard}: the file is truncated ({size} bytes): "
                               f"{int(np.count_nonzero(image_ends <= size))} of its {len(image_ends)} samples "
                               f"are complete; re-create or re-download it")


def _scan_job(job: tuple[str, int]) -> dict[str, np.ndarray]:
    return scan_shard(*job)


def write_index(directory: str | Path, columns: dict[str, np.ndarray]) -> Path:
    """Write ``samples.npz`` atomically (uncompressed: it is memory-mapped when loaded)."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    tmp = directory / f".{INDEX_FILE}.{os.getpid()}.tmp"
    n = len(columns["label"])
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(columns[k], dtype=dt).reshape(n) for k, dt in INDEX_FIELDS.items()})
    os.replace(tmp, path)
    return path


def index_shards(directory: str | Path, *, workers: int = 1, progress: bool = True,
                 class_names: list[str] | None = None) -> DatasetInfo:
    """``skd shard --index-only``: scan the ``*.tar`` shards of ``directory`` (sorted by name)
    once, write ``dataset.json`` and ``samples.npz``, return the new ``DatasetInfo``.

    Sample ids follow shard order and position in the shard. ``num_classes`` is the largest label
    + 1 unless ``class_names`` (or an existing ``dataset.json``'s names) cover more.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"{directory}: no such directory")
    names = sorted(p.name for p in directory.glob("*.tar") if p.is_file())
    if not names:
        raise MissingFileError(f"{directory}: no *.tar shards to index")
    jobs = [(str(directory / n), i) for i, n in enumerate(names)]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc=f"index {directory.name}", unit="shard", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            parts = []
            for part in pool.imap(_scan_job, jobs):
                parts.append(part)
                bar.update(1)
    else:
        parts = []
        for job in jobs:
            parts.append(_scan_job(job))
            bar.update(1)
    bar.close()
    columns = {k: np.concatenate([p[k] for p in parts]) for k in INDEX_FIELDS}
    n = len(columns["label"])
    if n == 0:
        raise ShardFormatError(f"{directory}: the shards hold no samples")
    num_classes = int(columns["label"].max()) + 1
    if class_names is None and (directory / "dataset.json").is_file():
        try:
            class_names = DatasetInfo.load(directory).class_names
        except ValueError:
            class_names = None
    if class_names is not None and len(class_names) >= num_classes:
        num_classes = len(class_names)
    else:
        class_names = [str(i) for i in range(num_classes)]
    from skd.data.dataset_info import ShardInfo
    info = DatasetInfo(n, num_classes, list(class_names),
                       [ShardInfo(name, len(p["label"])) for name, p in zip(names, parts)])
    write_index(directory, columns)
    info.save(directory)
    return info


# ------------------------------------------------------------------------------ random access
MAX_OPEN_SHARDS = 64
"""Shard files a process keeps open for random access (a batch touches one or two)."""


class SampleIndex:
    """Memory-mapped ``samples.npz`` plus random access to any sample's image bytes.

    Arrays are mapped, not copied, so DataLoader workers share one copy in the page cache.
    Shard files are opened on first use, once per process (safe across ``fork``); reads use
    ``os.pread`` and carry no file position. Pickles as its directory.
    """

    def __init__(self, directory: str | Path, info: DatasetInfo | None = None) -> None:
        self.directory = Path(directory)
        self.info = info if info is not None else DatasetInfo.load(self.directory)
        path = self.directory / INDEX_FILE
        if not path.is_file():
            raise MissingFileError(f"{path} is missing (the index of every sample); write it with "
                                   f"`skd shard --index-only {self.directory}`")
        cols = _load_npz_mmap(path)
        missing = [k for k in INDEX_FIELDS if k not in cols]
        if missing:
            raise ShardFormatError(f"{path}: missing arrays {missing}; re-run `skd shard --index-only`")
        for k, arr in cols.items():
            if k in INDEX_FIELDS and arr.shape != (self.info.num_samples,):
                raise ShardFormatError(f"{path}: array '{k}' has shape {arr.shape}, but dataset.json "
                                       f"says {self.info.num_samples} samples; re-run `skd shard --index-only`")
        shard = cols["shard"]
        counts = np.bincount(shard, minlength=len(self.info.shards)) if len(shard) else np.zeros(0, int)
        if (len(shard) and np.any(np.diff(shard) < 0)) or counts.tolist()[: len(self.info.shards)] != \
                [s.num_samples for s in self.info.shards] or len(counts) != len(self.info.shards):
            raise ShardFormatError(f"{path}: its samples do not lie in the shards of dataset.json in order "
                                   f"(a stale or mismatched pair); re-run `skd shard --index-only {self.directory}`")
        self._cols = cols
        self._fds: dict[int, int] = {}  # open shards, least recently used first
        self._pid = os.getpid()

    @classmethod
    def load(cls, directory: str | Path, info: DatasetInfo | None = None) -> "SampleIndex":
        return cls(directory, info)

    def __len__(self) -> int:
        return self.info.num_samples

    def __getitem__(self, name: str) -> np.ndarray:
        return self._cols[name]

    @property
    def labels(self) -> np.ndarray:
        """int32 ``[N]``: the class of every sample, by sample id."""
        return self._cols["label"]

    def read_image_bytes(self, sample_id: int) -> bytes:
        """The encoded image of ``sample_id`` (one seek+read, no scan)."""
        if not 0 <= sample_id < self.info.num_samples:
            raise IndexError(f"sample id {sample_id} outside [0, {self.info.num_samples})")
        shard = int(self._cols["shard"][sample_id])
        offset, size = int(self._cols["image_offset"][sample_id]), int(self._cols["image_size"][sample_id])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ShardFormatError(f"{self.info.shards[shard].name}: sample {sample_id}: file ends "
                                   f"before byte {offset + size}; re-run `skd shard --index-only`")
        return data

    def _fd(self, shard: int) -> int:
        """An open descriptor of ``shard``. At most ``MAX_OPEN_SHARDS`` stay open per process: a
        reader moves through the shards, and thousands of them (ImageNet-21k) would exhaust the
        process's descriptor limit."""
        if self._pid != os.getpid():  # forked: open our own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.directory / self.info.shards[shard].name, os.O_RDONLY)
        self._fds[shard] = fd  # now the most recently used
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "info": self.info}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["info"])


def _load_npz_mmap(path: Path) -> dict[str, np.ndarray]:
    """Memory-map each array of an uncompressed ``.npz`` in place (``np.load`` copies npz members)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    with open(path, "rb") as f:
        for info in infos:
            if not info.filename.endswith(".npy"):
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ShardFormatError(f"{path}: damaged zip member {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ShardFormatError(f"{path}: member {info.filename} holds Python objects")
            key = info.filename[:-4]
            if int(np.prod(shape)) == 0:
                out[key] = np.zeros(shape, dtype)
            else:
                out[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                     order="F" if fortran else "C")
    return out
