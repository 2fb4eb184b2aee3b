"""The CIFAR-10 / CIFAR-100 binary archives as a ``skd shard`` input (never the pickle versions).

- ``cifar-10-binary.tar.gz`` (folder ``cifar-10-batches-bin/``): ``data_batch_1.bin`` …
  ``data_batch_5.bin`` (train) and ``test_batch.bin`` (test), records of 1 label byte + 3,072
  pixel bytes; class names in ``batches.meta.txt``.
- ``cifar-100-binary.tar.gz`` (folder ``cifar-100-binary/``): ``train.bin`` and ``test.bin``,
  records of 1 coarse label byte, 1 fine label byte + 3,072 pixel bytes; the fine labels (100
  classes, the ones the seeds report) are used, names from ``fine_label_names.txt``.

The pixels of a record are the 32×32 red plane, then green, then blue, row-major. The archive
itself or its extracted folder is accepted. Samples are listed in archive order (train batches
1…5, records in file order), so with ``--keep-order`` sample ids equal the usual CIFAR indices.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skd.data.shard_writer import RawImage, SplitListing
from skd.errors import DataError

__all__ = ["is_cifar_binary_folder", "list_cifar_binary"]

_SIDE = 32
_PIXELS = 3 * _SIDE * _SIDE


@dataclass(frozen=True)
class _Layout:
    name: str
    splits: dict[str, tuple[str, ...]]
    """Split → its member files, in order."""
    names_file: str
    label_bytes: int
    """Label bytes before the pixels of a record."""
    label_index: int
    """Which of them is the label used."""
    num_classes: int

    @property
    def record_size(self) -> int:
        return self.label_bytes + _PIXELS

    @property
    def members(self) -> tuple[str, ...]:
        return (*(m for files in self.splits.values() for m in files), self.names_file)


_CIFAR10 = _Layout("CIFAR-10", {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                                "test": ("test_batch.bin",)}, "batches.meta.txt", 1, 0, 10)
_CIFAR100 = _Layout("CIFAR-100", {"train": ("train.bin",), "test": ("test.bin",)},
                    "fine_label_names.txt", 2, 1, 100)
_LAYOUTS = (_CIFAR10, _CIFAR100)
# Members of the python versions (cifar-10-batches-py/, cifar-100-python/): pickles, refused.
_PICKLE_MEMBERS = ("data_batch_1", "batches.meta", "train", "test", "meta")


def _layout_of(names: set[str]) -> _Layout | None:
    for layout in _LAYOUTS:
        if layout.splits["train"][0] in names:
            return layout
    return None


def is_cifar_binary_folder(path: str | Path) -> bool:
    """Whether ``path`` is an extracted CIFAR binary archive (or a CIFAR pickle folder, which
    ``list_cifar_binary`` then refuses with a clear message)."""
    path = Path(path)
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir() if p.is_file()}
    return _layout_of(names) is not None or _is_pickle_version(names)


def _is_pickle_version(names: set[str]) -> bool:
    return "data_batch_1" in names or {"train", "test", "meta"} <= names


def _read_members(path: Path) -> dict[str, bytes]:
    """Basename → bytes of the files of interest, from the archive (one pass) or the folder."""
    wanted = {m for layout in _LAYOUTS for m in layout.members}
    if path.is_dir():  # pickle members are noted (empty), never read
        return {p.name: p.read_bytes() if p.name in wanted else b"" for p in sorted(path.iterdir())
                if p.is_file() and (p.name in wanted or p.name in _PICKLE_MEMBERS)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and (base in wanted or base in _PICKLE_MEMBERS):
                    found[base] = tar.extractfile(member).read() if base in wanted else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        why = "not a tar archive" if isinstance(e, tarfile.ReadError) else f"unreadable ({e})"
        raise DataError(f"{path}: {why}; skd shard reads image folders, TinyImageNet's folder and "
                        "the CIFAR-10/100 binary archives") from None
    return found


def list_cifar_binary(path: str | Path) -> list[SplitListing]:
    """The ``train`` and ``test`` splits of a CIFAR-10 or CIFAR-100 binary archive (or its folder)."""
    path = Path(path)
    members = _read_members(path)
    layout = _layout_of(set(members))
    if layout is None:
        if _is_pickle_version(set(members)):
            raise DataError(f"{path} is the python (pickle) version of CIFAR, which skd never unpickles; "
                            "use the binary version (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz)")
        raise DataError(f"{path}: not a CIFAR-10/100 binary archive (no data_batch_1.bin or train.bin)")
    missing = [m for m in layout.members if m not in members]
    if missing:
        raise DataError(f"{path}: {layout.name} binary archive without {missing[0]}")
    class_names = [line.strip() for line in members[layout.names_file].decode("utf-8").splitlines()
                   if line.strip()]
    if len(class_names) != layout.num_classes:
        raise DataError(f"{path}:{layout.names_file}: {len(class_names)} class names, "
                        f"expected {layout.num_classes}")
    listings = []
    for split, files in layout.splits.items():
        items: list = []
        for name in files:
            items += _records(members[name], layout, f"{path.name}:{name}")
        listings.append(SplitListing(split, class_names, items))
    return listings


def _records(data: bytes, layout: _Layout, source: str) -> list[tuple[RawImage, int]]:
    if len(data) % layout.record_size:
        raise DataError(f"{source}: {len(data)} bytes is not a whole number of "
                        f"{layout.record_size}-byte records")
    records = np.frombuffer(data, np.uint8).reshape(-1, layout.record_size)
    labels = records[:, layout.label_index].astype(np.int64)
    bad = np.flatnonzero(labels >= layout.num_classes)
    if bad.size:
        raise DataError(f"{source}: record {bad[0]} has label {labels[bad[0]]}, outside "
                        f"[0, {layout.num_classes})")
    # planes [N, 3, 32, 32] → images [N, 32, 32, 3]: views of the archive's bytes, no copy
    pixels = records[:, layout.label_bytes:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return [(RawImage(f"{source}[{i}]", pixels[i]), int(label)) for i, label in enumerate(labels)]
