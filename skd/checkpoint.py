"""Checkpoints: one self-describing file per save, written atomically, loaded with weights_only.

A checkpoint is written to ``<name>.tmp`` and renamed into place, so a kill at any moment leaves
either the old set of checkpoints or the old set plus one complete new file, never a partial
file under a name that ``resume=auto`` would pick. Every checkpoint carries the ``run_id`` of the
run that wrote it, and pruning only ever deletes checkpoints of the run that is writing.

State too large to gather on one process (a sharded PS-KD memory) is written by every rank as a
*part* file beside the checkpoint (``step-N.pt.rank-R-of-W``), each atomically, before the main
file; the main file records how many parts it has, and appears last. Parts go with their main
file when it is pruned; parts without one (a save that was killed) are removed by the next save.

Checkpoints are read with ``torch.load(weights_only=True)`` (``skd.weights.read_torch_file``): a
damaged file, one that is not skd's, or one that holds Python objects is a ``CheckpointError``
naming it. ``set_aside`` moves a damaged checkpoint (with its parts) into ``checkpoints/damaged/``.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from skd.errors import CheckpointError, CheckpointUnreadable, MissingFileError, SkdError
from skd.weights import read_torch_file

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged"
"""Subfolder of ``checkpoints/`` that damaged checkpoints are moved into (see ``set_aside``)."""
SUPERSEDED_DIR = "superseded"
"""Subfolder of ``checkpoints/`` for a run's checkpoints newer than the one it went back to."""
BEST_NAME = "best.pt"
"""The best epoch's checkpoint (by ``best_metric``), kept beside the pruned ones."""
LAST_GOOD_NAME = "last_good.pt"
"""The newest checkpoint written while the training loss stayed within its divergence bound."""
CHECKPOINT_FORMAT = "skd-checkpoint-2"
"""The ``format`` of the checkpoints this version writes (it reads ``skd-checkpoint-1`` too)."""
FORMATS = ("skd-checkpoint-1", CHECKPOINT_FORMAT)
_NAME = re.compile(r"^step-(\d{9})\.pt$")
_PART = re.compile(r"^(.+\.pt)\.rank-\d{5}-of-(\d{5})$")
_EXPECTED = f"an skd checkpoint ({CHECKPOINT_DIR}/step-*.pt or {CHECKPOINT_DIR}/{BEST_NAME} of a run)"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step of a ``step-N.pt`` checkpoint, from its name; None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointWriteError(SkdError, OSError):
    """A checkpoint could not be written (disk full, permissions); no partial file is left."""

    exit_status = 1


def save_checkpoint(state: dict[str, Any], path: str | Path, keep: int = 0) -> Path:
    """Atomically write ``state`` to ``path``; then keep only the ``keep`` newest checkpoints of
    the same ``state["run_id"]`` (0: all). Checkpoints of other runs are never deleted.

    Temporary files left by a save that was killed are removed once a later save succeeds.
    Raises ``CheckpointWriteError`` naming the newest intact checkpoint if the write fails.
    """
    path = Path(path)
    try:
        _write_atomically(state, path)
    except OSError as e:
        intact = latest_checkpoint(path.parent.parent)
        kept = f"the newest intact checkpoint is {intact}" if intact else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {_why(e)}; {kept}") from None
    for stale in path.parent.glob("*.tmp"):
        stale.unlink(missing_ok=True)
    if keep > 0:
        run_id = state.get("run_id")
        mine = [p for p in list_checkpoints(path.parent.parent) if read_run_id(p) == run_id]
        for old in mine[:-keep]:
            old.unlink(missing_ok=True)
    for part in path.parent.iterdir():  # parts whose checkpoint was pruned or never completed
        m = _PART.match(part.name)
        if m and not (part.parent / m.group(1)).exists():
            part.unlink(missing_ok=True)
    return path


def part_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The file of rank ``rank``'s part of checkpoint ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank-{rank:05d}-of-{world_size:05d}")


def save_part(part: dict[str, Any], path: str | Path, rank: int, world_size: int) -> None:
    """Atomically write this rank's part of checkpoint ``path`` (before the main file is saved)."""
    target = part_path(path, rank, world_size)
    try:
        _write_atomically(part, target)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint part {target}: {_why(e)}") from None


def _write_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` to ``<path>.tmp``, fsync, rename; on an ``OSError`` no file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            sink = _ErrorRecordingFile(f)
            try:
                torch.save(obj, sink)
            except RuntimeError as e:  # torch hides the OSError of a failed write behind this
                raise sink.error or e
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _why(e: OSError) -> str:
    return "the disk is full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"


def load_parts(path: str | Path, count: int) -> list[dict[str, Any]]:
    """The ``count`` parts of checkpoint ``path``, memory-mapped: a rank copies only the slices
    it needs."""
    parts = []
    for rank in range(count):
        file = part_path(path, rank, count)
        if not file.is_file():
            raise MissingFileError(f"checkpoint {path} lists {count} per-rank parts, but {file} is missing")
        parts.append(read_torch_file(file, "checkpoint part", f"rank {rank}'s part of {path}", mmap=True))
    return parts


def set_aside(path: str | Path, folder_name: str = DAMAGED_DIR) -> Path:
    """Move the checkpoint ``path`` and its per-rank parts, under their own names, into
    ``checkpoints/<folder_name>/`` (``damaged/`` by default, or ``superseded/``), where neither
    pruning nor ``resume=auto`` looks; returns its new path."""
    path = Path(path)
    folder = path.parent / folder_name
    folder.mkdir(exist_ok=True)
    for file in [*path.parent.glob(path.name + ".rank-*"), path]:  # the main file last, as when saving
        os.replace(file, folder / file.name)
    _fsync_dir(path.parent)
    return folder / path.name


class _ErrorRecordingFile:
    """A write-only file wrapper that keeps the ``OSError`` of a failed write (torch.save reports
    only a generic RuntimeError)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def read_run_id(path: str | Path) -> str | None:
    """The ``run_id`` stored in a checkpoint, read without loading its tensors (memory-mapped);
    None for a checkpoint without one or a file that does not load."""
    return read_field(path, "run_id")


def read_field(path: str | Path, key: str) -> Any:
    """The top-level ``key`` of a checkpoint, read without loading its tensors (memory-mapped);
    None for a checkpoint without it or a file that does not load."""
    try:
        state = read_torch_file(path, "checkpoint", _EXPECTED, mmap=True)
    except SkdError:  # a missing or damaged file belongs to no run
        return None
    return state.get(key) if isinstance(state, dict) else None


def keep_as(path: str | Path, name: str) -> Path:
    """Make the checkpoint ``path`` also the run's ``checkpoints/<name>`` (``best.pt``,
    ``last_good.pt``): a hard link, else a copy, swapped in atomically, with its per-rank parts.
    Pruning of ``path`` later leaves ``<name>`` in place."""
    path = Path(path)
    best = path.parent / name
    parts = [(p, best.with_name(name + p.name[len(path.name):]))
             for p in sorted(path.parent.glob(path.name + ".rank-*"))]
    stale = [old for old in best.parent.glob(name + ".rank-*") if old not in {t for _, t in parts}]
    for source, target in parts + [(path, best)]:  # the main file last, as when saving
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    for old in stale:  # another world size's parts, once best.pt no longer lists them
        old.unlink(missing_ok=True)
    _fsync_dir(best.parent)
    return best


def best_checkpoint(run_dir: str | Path) -> Path | None:
    best = Path(run_dir) / CHECKPOINT_DIR / BEST_NAME
    return best if best.is_file() else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load an skd checkpoint onto the CPU (tensors and plain containers only; ``mmap``: tensors
    memory-mapped, read only where used, e.g. the weights without the optimizer state and PS-KD
    memory). A missing file is a ``MissingFileError``; a damaged one, or any other file, a
    ``CheckpointError`` naming it."""
    state = read_torch_file(path, "checkpoint", _EXPECTED, mmap=mmap)
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith("skd-checkpoint-") and found not in FORMATS:
        raise CheckpointUnreadable(f"checkpoint {path} was written by another version of skd (format {found!r}); "
                                   f"this one reads {', '.join(FORMATS)}")
    if found not in FORMATS:
        what = (f"format {found!r}" if isinstance(state, dict) and "format" in state
                else f"{type(state).__name__} without skd's format tag, e.g. a bare state_dict")
        raise CheckpointError(f"checkpoint {path} is not an skd checkpoint ({what}); expected {_EXPECTED}")
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x: Any) -> Any:
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
