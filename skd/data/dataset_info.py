"""``dataset.json``: what a shard directory holds, so nothing has to scan the tars to know N.

A sample's global id is the number of samples in the shards listed before its own, plus its
position inside its shard. For shards written by ``skd shard`` this equals the numeric
``__key__``; for shards written elsewhere it is the definition.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skd.errors import DataError

DATASET_FILE = "dataset.json"
FORMAT = "skd-shards-1"


class DatasetInfoError(DataError):
    """``dataset.json`` is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name of the shard, relative to the directory that holds ``dataset.json``."""
    num_samples: int
    """Number of samples (``__key__`` groups) in the shard."""


@dataclass
class DatasetInfo:
    num_samples: int
    """Total number of samples over all shards."""
    num_classes: int
    """Labels lie in ``[0, num_classes)``."""
    class_names: list[str]
    """One name per class index."""
    shards: list[ShardInfo] = field(default_factory=list)
    """Shards in sample-id order."""

    def __post_init__(self) -> None:
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        self.class_names = [str(c) for c in self.class_names]
        self.validate()

    # ----------------------------------------------------------------------------- derived
    @property
    def shard_offsets(self) -> np.ndarray:
        """int64 ``[len(shards) + 1]``: the first sample id of each shard, then ``num_samples``."""
        counts = np.array([s.num_samples for s in self.shards], dtype=np.int64)
        return np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])

    # ------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "num_samples": self.num_samples, "num_classes": self.num_classes,
                "class_names": list(self.class_names),
                "shards": [{"name": s.name, "num_samples": s.num_samples} for s in self.shards]}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/dataset.json`` atomically (temporary file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DATASET_FILE
        fd, tmp = tempfile.mkstemp(prefix=".dataset.", suffix=".json.tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetInfo":
        """Read and validate ``directory/dataset.json`` (or the file itself when given one)."""
        path = Path(directory)
        if path.is_dir() or path.name != DATASET_FILE:
            path = path / DATASET_FILE
        if not path.is_file():
            raise DatasetInfoError(f"{path}: not found (write it with `skd shard IMAGE_FOLDER OUT_DIR`, "
                                   f"or `skd shard --index-only SHARD_DIR` for shards made elsewhere)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetInfoError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = DATASET_FILE) -> "DatasetInfo":
        if not isinstance(raw, dict):
            raise DatasetInfoError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        for key in ("num_samples", "num_classes", "class_names", "shards"):
            if key not in raw:
                raise DatasetInfoError(f"{source}: missing key '{key}'")
        _check_int(raw["num_samples"], source, "num_samples")
        _check_int(raw["num_classes"], source, "num_classes", minimum=1)
        if not isinstance(raw["class_names"], list):
            raise DatasetInfoError(f"{source}: key 'class_names': expected a list of names")
        if not isinstance(raw["shards"], list):
            raise DatasetInfoError(f"{source}: key 'shards': expected a list of "
                                   "{\"name\": ..., \"num_samples\": ...} objects")
        shards = []
        for i, s in enumerate(raw["shards"]):
            key = f"shards[{i}]"
            if not isinstance(s, dict) or "name" not in s or "num_samples" not in s:
                raise DatasetInfoError(f"{source}: key '{key}': expected an object with 'name' and 'num_samples'")
            if not isinstance(s["name"], str) or not s["name"]:
                raise DatasetInfoError(f"{source}: key '{key}.name': expected a file name, got {s['name']!r}")
            _check_int(s["num_samples"], source, f"{key}.num_samples")
            shards.append(ShardInfo(s["name"], s["num_samples"]))
        try:
            return cls(raw["num_samples"], raw["num_classes"], raw["class_names"], shards)
        except DatasetInfoError as e:
            raise DatasetInfoError(f"{source}: {e}") from None

    def validate(self) -> None:
        _check_int(self.num_samples, None, "num_samples")
        _check_int(self.num_classes, None, "num_classes", minimum=1)
        if len(self.class_names) != self.num_classes:
            raise DatasetInfoError(f"key 'class_names': {len(self.class_names)} names for "
                                   f"num_classes={self.num_classes}")
        seen = set()
        for i, s in enumerate(self.shards):
            p = Path(s.name)
            if p.is_absolute() or ".." in p.parts:
                raise DatasetInfoError(f"key 'shards[{i}].name': {s.name!r} must be relative to the "
                                       "directory of dataset.json")
            if s.name in seen:
                raise DatasetInfoError(f"key 'shards[{i}].name': {s.name!r} is listed twice")
            seen.add(s.name)
            _check_int(s.num_samples, None, f"shards[{i}].num_samples")
        total = sum(s.num_samples for s in self.shards)
        if total != self.num_samples:
            raise DatasetInfoError(f"key 'num_samples': {self.num_samples}, but the shards hold {total}")


def _check_int(value: Any, source: str | None, key: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        where = f"{source}: " if source else ""
        raise DatasetInfoError(f"{where}key '{key}': expected an integer >= {minimum}, got {value!r}")
