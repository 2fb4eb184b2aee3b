"""One entry point for the trainer and ``skd eval``: the loader of the configured backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from skd.config import DataConfig
from skd.data.loader import ShardLoader, create_loader
from skd.transforms import create_eval_transform, create_train_transform


def create_data_loader(cfg: DataConfig, shard_dir: str | Path, *, train: bool, batch_size: int, seed: int = 0,
                       rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                       channels_last: bool = False, **method_loader_options: Any) -> Any:
    """The training (``train``) or evaluation loader of ``shard_dir`` for ``data.backend``.

    ``batch_size`` is per process. ``method_loader_options`` are the method's training-loader
    options (CS-KD: ``with_partner``, ``exclude_self_pair``). ``device`` and ``channels_last``
    matter to the DALI backend only: its images are made on ``device`` (``data.dali_device=gpu``)
    in the memory format the model uses; the torch backend yields CPU tensors.
    """
    plan = dict(train=train, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, drop_last=cfg.drop_last,
                **method_loader_options)
    if cfg.backend == "dali":
        from skd.data.dali_loader import create_dali_loader
        return create_dali_loader(shard_dir, cfg, device=device, channels_last=channels_last, **plan)
    transform = create_train_transform(cfg) if train else create_eval_transform(cfg)
    loader: ShardLoader = create_loader(shard_dir, transform=transform, **plan)
    return loader
