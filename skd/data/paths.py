"""Shard directories as a config names them: a directory with ``dataset.json``, or ``digits``."""
from __future__ import annotations

from pathlib import Path

from skd.data.dataset_info import DATASET_FILE
from skd.data.digits import digits_shards
from skd.errors import ConfigError, MissingFileError


def resolve_shard_dir(value: str, split: str, key: str) -> Path:
    """The shard directory named by config key ``key``; ``digits`` is the built-in demo data
    (its ``split``: ``train`` or ``val``). Raises ``FileNotFoundError`` naming the key."""
    if value == "digits":
        return digits_shards() / split
    if not value:
        raise ConfigError(f"config key '{key}' is not set: pass {key}=SHARD_DIR")
    path = Path(value)
    if not (path / DATASET_FILE).is_file():
        raise MissingFileError(f"config key '{key}' = {value!r}: no {DATASET_FILE} in {path} "
                               f"(make shards with `skd shard` or index them with `skd shard --index-only`)")
    return path
