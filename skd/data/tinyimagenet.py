"""TinyImageNet's folder (``tiny-imagenet-200/``) as a ``skd shard`` input.

- ``train/<wnid>/images/*.JPEG``: the training images of each class (the ``<wnid>_boxes.txt``
  files beside them are ignored);
- ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (tab-separated: file name, wnid, box)
  giving the class of each validation image;
- ``wnids.txt``: the 200 class ids; ``words.txt``: ``wnid<TAB>names`` for every WordNet id.

Classes are the wnids in sorted order (the class index ImageFolder gives ``train/``), named by
their ``words.txt`` entry. ``test/`` has no labels and is not read. The output splits are
``train`` and ``val``.
"""
from __future__ import annotations

from pathlib import Path

from skd.data.shard_writer import SplitListing, list_image_folder
from skd.errors import DataError, MissingFileError

__all__ = ["is_tinyimagenet", "list_tinyimagenet"]


def is_tinyimagenet(root: str | Path) -> bool:
    """Whether ``root`` has TinyImageNet's layout (``wnids.txt`` beside ``train/`` and ``val/``)."""
    root = Path(root)
    return (root / "wnids.txt").is_file() and (root / "train").is_dir() and (root / "val").is_dir()


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (TinyImageNet layout)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def list_tinyimagenet(root: str | Path) -> list[SplitListing]:
    """The ``train`` and ``val`` splits of a TinyImageNet folder."""
    root = Path(root)
    wnids = _lines(root / "wnids.txt")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{root / 'wnids.txt'}: a class id is listed twice")
    wnids.sort()
    words = dict(line.split("\t", 1) for line in _lines(root / "words.txt") if "\t" in line)
    unnamed = [w for w in wnids if w not in words]
    if unnamed:
        raise DataError(f"{root / 'words.txt'}: no entry for class {unnamed[0]}")
    class_names = [words[w].strip() for w in wnids]

    folders, train_items, ignored = list_image_folder(root / "train")
    if folders != wnids:
        extra, absent = sorted(set(folders) - set(wnids)), sorted(set(wnids) - set(folders))
        raise DataError(f"{root / 'train'}: class folders differ from wnids.txt: not listed "
                        f"{extra[:5]}, without a folder {absent[:5]}")

    label = {w: i for i, w in enumerate(wnids)}
    annotations = root / "val" / "val_annotations.txt"
    val_labels: dict[str, int] = {}
    for n, line in enumerate(_lines(annotations), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DataError(f"{annotations}:{n}: expected 'FILE<TAB>WNID<TAB>...' with a wnid of "
                            f"wnids.txt, got {line[:80]!r}")
        if fields[0] in val_labels:
            raise DataError(f"{annotations}:{n}: {fields[0]} is annotated twice")
        val_labels[fields[0]] = label[fields[1]]
    images = root / "val" / "images"
    present = {p.name for p in images.iterdir() if p.is_file()} if images.is_dir() else set()
    absent = sorted(set(val_labels) - present)
    if absent:
        raise DataError(f"{annotations}: {absent[0]} is annotated but not in {images} "
                        f"({len(absent)} missing)")
    unlabelled = sorted(name for name in present - set(val_labels) if not name.startswith("."))
    if unlabelled:
        raise DataError(f"{images / unlabelled[0]} has no line in {annotations} "
                        f"({len(unlabelled)} unannotated)")
    val_items = [(images / name, val_labels[name]) for name in sorted(val_labels)]
    return [SplitListing("train", class_names, train_items, ignored),
            SplitListing("val", class_names, val_items)]
