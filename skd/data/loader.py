"""The torch loading backend: tar shards → PIL → the given (timm) transform, in DataLoader workers.

Which samples each rank reads in each batch is the epoch plan's (``skd.data.epoch_plan``): every
rank walks one seeded order of the epoch's samples in global steps, so the loader's position is
simply how far into that order the epoch has got. Batch j of a rank belongs to worker
``j % W``; the DataLoader takes batches round-robin from its workers, hence the training loop
sees batch 0, 1, 2, ... Samples are read by random access through ``samples.npz`` (each image
is one ``pread``; a batch's samples lie in one or a few neighbouring windows of the order, so
reads stay local).

Augmentation (and the CS-KD partner draw) is reseeded for every batch from (seed, epoch, plan
start, rank, batch number), so a resumed run with the same processes and batch size receives
exactly the batches, pixels included, of the uninterrupted run; with others it continues the
epoch from the same position, every sample once. DLB's repeated samples are batch j − 1's, which
the plan names, so the worker of batch j reads them again itself (under any number of workers),
with a seed of their own. Nothing is ever unpickled: only images are decoded, labels come from
``samples.npz`` and are checked against ``dataset.json`` up front.
"""
from __future__ import annotations

import contextlib
import io
import logging
import random
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from skd.batch import Batch
from skd.data.dataset_info import DatasetInfo
from skd.data.epoch_plan import (AUGMENT, PARTNER, REPEAT, WORKERS, EpochPlan, derive_seed, plan_epoch,
                                 previous_batch_ids)
from skd.data.partners import PartnerSampler
from skd.data.sample_index import SampleIndex, ShardFormatError, check_not_truncated
from skd.errors import ConfigError, DataError, MissingFileError

_log = logging.getLogger("skd.data")

_PARTNER_TRIES = 10


class CorruptDataError(DataError):
    """More samples failed to decode than ``data.max_corrupt_fraction`` allows."""


# ---------------------------------------------------------------------------- the reading
class _ShardSource:
    """Everything a worker needs (picklable): the index, partner sampler, transform and hooks."""

    def __init__(self, info: DatasetInfo, index: SampleIndex, transform: Callable, seed: int, rank: int,
                 partners: PartnerSampler | None, decode: Callable | None = None,
                 collate: Callable | None = None, repeat_previous: bool = False) -> None:
        self.info, self.index = info, index
        self.transform, self.seed, self.rank = transform, seed, rank
        self.decode, self.collate = decode or _decode, collate
        self.partners = partners
        self.repeat_previous = repeat_previous
        self.offsets = info.shard_offsets

    def iter_worker(self, plan: EpochPlan, worker: int, num_workers: int, start_batch: int,
                    previous_epoch: EpochPlan | None = None) -> Iterator[dict[str, Any]]:
        """Batches ``j ≡ worker (mod num_workers)`` of ``plan`` from ``start_batch`` on;
        ``previous_epoch`` is the plan whose last batch the first batch repeats (DLB)."""
        first = start_batch + (worker - start_batch) % num_workers
        for j in range(first, plan.num_batches, num_workers):
            yield self._make_batch(plan, j, previous_epoch)

    def _describe(self, sid: int) -> str:
        shard = int(self.index["shard"][sid])
        return f"{self.info.shards[shard].name}: sample {sid - int(self.offsets[shard])} (id {sid})"

    def _read(self, sample_ids: np.ndarray, action: str) -> tuple[list[Any], list[int], list[int], int]:
        """Transformed images, labels and ids of the readable samples among ``sample_ids``, and
        how many were corrupt (skipped with a warning that says ``action``)."""
        images, labels, ids, corrupt = [], [], [], 0
        for sid in sample_ids.tolist():
            img = self._decoded(sid, action)
            if img is None:
                corrupt += 1
                continue
            images.append(self.transform(img))
            labels.append(int(self.index.labels[sid]))
            ids.append(sid)
        return images, labels, ids, corrupt

    def _make_batch(self, plan: EpochPlan, j: int, previous_epoch: EpochPlan | None = None) -> dict[str, Any]:
        with _seeded(derive_seed(self.seed, plan.stream.epoch, plan.start, self.rank, j, AUGMENT)):
            images, labels, ids, corrupt = self._read(plan.sample_ids(j), "skipping corrupt sample")
            partners: list[Any] = []
            partner_ids: list[int] = []
            if self.partners is not None:
                gen = np.random.default_rng(derive_seed(self.seed, plan.stream.epoch, plan.start, self.rank, j,
                                                        PARTNER))
                ids, labels, images, partners, partner_ids, lost = self._partners(ids, labels, images, gen)
                corrupt += lost
            batch: Batch = {
                "image": self._collate(images),
                "label": torch.tensor(labels, dtype=torch.int64),
                "index": torch.tensor(ids, dtype=torch.int64),
            }
            if self.partners is not None:
                batch["partner"] = self._collate(partners)
                batch["partner_index"] = torch.tensor(partner_ids, dtype=torch.int64)
        if self.repeat_previous:  # a view of its own: the first half's pixels do not depend on it
            with _seeded(derive_seed(self.seed, plan.stream.epoch, plan.start, self.rank, j, REPEAT)):
                # A corrupt sample was counted when its own batch skipped it.
                images, labels, ids, _ = self._read(previous_batch_ids(plan, j, previous_epoch),
                                                    "skipping corrupt repeated sample")
            batch["repeat"] = self._collate(images)
            batch["repeat_label"] = torch.tensor(labels, dtype=torch.int64)
            batch["repeat_index"] = torch.tensor(ids, dtype=torch.int64)
        batch["num_corrupt"] = corrupt
        return batch

    def _decoded(self, sid: int, action: str) -> Any | None:
        """The decoded image of sample ``sid``, or None (after a warning) if its bytes do not decode
        or lie past the end of a cut-off shard. An error of the file system itself (too many open
        files, I/O) propagates: it says nothing about the sample."""
        try:
            data = self.index.read_image_bytes(sid)
        except ShardFormatError as e:  # the shard ends inside this sample
            error: Exception = e
        else:
            try:
                return self.decode(data)
            except Exception as e:  # PIL raises many types on corrupt data
                error = e
        _log.warning("%s: %s: %s: %s", self._describe(sid), action, type(error).__name__, error)
        return None

    def _partners(self, ids: list[int], labels: list[int], images: list[Any], gen: np.random.Generator
                  ) -> tuple[list[int], list[int], list[Any], list[Any], list[int], int]:
        """A same-class partner per anchor (uniform over the class, with replacement), read by
        random access; a corrupt partner is redrawn, an anchor without a readable one dropped."""
        picks = self.partners.draw(np.asarray(labels, dtype=np.int64), gen, ids) if labels else []
        keep_ids, keep_labels, keep_images, partners, partner_ids, lost = [], [], [], [], [], 0
        for sid, label, image, pid in zip(ids, labels, images, picks):
            img = None
            for attempt in range(_PARTNER_TRIES):  # a corrupt partner is redrawn
                if attempt:
                    pid = int(self.partners.draw(np.array([label]), gen, [sid])[0])
                img = self._decoded(int(pid), "corrupt CS-KD partner, drawing another")
                if img is not None:
                    break
            if img is None:
                lost += 1
                continue
            keep_ids.append(sid), keep_labels.append(label), keep_images.append(image)
            partners.append(self.transform(img))
            partner_ids.append(int(pid))
        return keep_ids, keep_labels, keep_images, partners, partner_ids, lost

    def _collate(self, items: list) -> Any:
        if self.collate is not None:
            return self.collate(items)
        return torch.stack(items) if items else self._empty()

    def _empty(self) -> torch.Tensor:
        """A 0-sample image tensor of the transform's output shape (a batch whose samples were all
        corrupt still has to be yielded, or ranks would see different batch counts)."""
        from PIL import Image
        shape = self.transform(Image.new("RGB", (64, 64))).shape
        return torch.zeros((0, *shape), dtype=torch.float32)


def _leave_stop_signals_to_main(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: a signal sent to the whole process group
    (``timeout``, ``kill -- -PGID``, Ctrl-C, schedulers) must reach only the training process,
    which checkpoints and then shuts its workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode(data: bytes):
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, random and numpy for one batch; restore the caller's states afterwards (with
    ``num_workers=0`` this runs in the training process, whose generators must not move)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _EpochDataset(IterableDataset):
    """One epoch of one rank; each DataLoader worker runs the logical worker it stands for."""

    def __init__(self, source: _ShardSource, plan: EpochPlan, start_batch: int, num_workers: int,
                 previous_epoch: EpochPlan | None = None) -> None:
        self.source, self.plan, self.start_batch, self.num_workers = source, plan, start_batch, num_workers
        self.previous_epoch = previous_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"planned for {self.num_workers} workers, running on {workers}")
        # The DataLoader asks physical worker 0 first; after skipping k batches the next batch is
        # k, owned by logical worker k % W, so physical worker p runs logical worker (p + k) % W.
        logical = (physical + self.start_batch) % workers
        return self.source.iter_worker(self.plan, logical, workers, self.start_batch, self.previous_epoch)


# ---------------------------------------------------------------------------- the loader
class ShardLoader:
    """Batches of one rank over one epoch at a time: dicts of CPU tensors ``image`` float
    ``[B,3,H,W]``, ``label`` int64 ``[B]``, ``index`` int64 ``[B]`` (global sample id), with
    ``with_partner`` also ``partner`` ``[B,3,H,W]`` and ``partner_index`` int64 ``[B]``, and with
    ``repeat_previous`` also ``repeat`` ``[B',3,H,W]``, ``repeat_label`` and ``repeat_index``
    int64 ``[B']`` (the samples of this rank's batch before, augmented anew; none at the first
    batch of the first epoch).

    ``set_epoch(e)`` selects the epoch (a new epoch starts at its beginning). ``state_dict()`` is
    where the epoch stands: ``epoch``, ``batches`` yielded by the current plan, the plan's
    ``start`` position in the epoch's sample order, and the ``world_size``, ``batch_size`` and
    shuffle ``window`` the plan was made for. After ``load_state_dict`` the next ``iter()``
    continues the epoch: with the same world size and batch size it skips the yielded batches
    (the very batches of the uninterrupted run follow); with others it plans the rest of the epoch
    from the position reached, ``start + batches·world_size·batch_size``, with the saved window.
    Every ``iter()`` without a pending resume reads the current plan from its start (after an
    elastic resume, the rest of the epoch; the next epoch starts at its beginning).
    """

    def __init__(self, source: _ShardSource, *, train: bool, batch_size: int, world_size: int, num_workers: int,
                 drop_last: bool, window: int, pin_memory: bool, prefetch_factor: int | None) -> None:
        self._source = source
        self.info = source.info
        self.batch_size, self.world_size, self.num_workers = batch_size, world_size, num_workers
        self.rank, self.train, self.drop_last, self.window = source.rank, train, drop_last, window
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.num_corrupt = 0
        """Corrupt samples skipped so far (summed over the batches this process received)."""
        self._epoch, self._start, self._epoch_window = 0, 0, window
        self._position, self._resume = 0, False

    def plan(self) -> EpochPlan:
        """This rank's plan for the current epoch (from the current start position)."""
        return self._plan(self.rank, self.world_size, self.batch_size, self.drop_last, self._start)

    def _plan(self, rank: int, world_size: int, batch_size: int, drop_last: bool, start: int,
              epoch: int | None = None) -> EpochPlan:
        return plan_epoch([s.num_samples for s in self.info.shards], seed=self._source.seed,
                          epoch=self._epoch if epoch is None else epoch, rank=rank, world_size=world_size,
                          batch_size=batch_size, train=self.train, drop_last=drop_last,
                          window=self._epoch_window, start=start)

    def _previous_epoch_plan(self, plan: EpochPlan) -> EpochPlan | None:
        """The plan whose last batch a fresh epoch's first batch repeats (DLB): the epoch before,
        from its start, with this loader's layout; None when nothing is repeated from it."""
        if not (self._source.repeat_previous and self.train and plan.start == 0 and self._epoch > 0):
            return None
        return self._plan(self.rank, self.world_size, self.batch_size, self.drop_last, 0, self._epoch - 1)

    def __len__(self) -> int:
        return self.plan().num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._start, self._epoch_window = epoch, 0, self.window
            self._position, self._resume = 0, False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._position, "start": self._start,
                "world_size": self.world_size, "batch_size": self.batch_size, "window": self._epoch_window,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        start = int(state.get("start", 0))
        layout = (int(state.get("world_size", self.world_size)), int(state.get("batch_size", self.batch_size)))
        self._epoch, self._epoch_window = epoch, int(state.get("window", self.window))
        self._resume = True
        if layout == (self.world_size, self.batch_size) or batches == 0:
            self._start, self._position = start, batches
            return
        # Another number of processes or batch size: plan the rest of the epoch from the position
        # the saved plan reached (all of it when that plan was finished).
        old = self._plan(0, *layout, bool(state.get("drop_last", self.drop_last)), start)
        done = batches >= old.num_batches
        self._start = self.info.num_samples if done else old.position_after(batches)
        self._position = 0
        _log.info("loader: epoch %d continues at sample position %d of %d with %d processes x %d (was %d x %d)",
                  epoch, self._start, self.info.num_samples, self.world_size, self.batch_size, *layout)

    def __iter__(self) -> Iterator[Batch]:
        start = self._position if self._resume else 0
        self._resume, self._position = False, start
        plan = self.plan()
        if start >= plan.num_batches:
            return
        workers = max(self.num_workers, 1)
        dataset = _EpochDataset(self._source, plan, start, workers, self._previous_epoch_plan(plan))
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            kwargs = {} if self.prefetch_factor is None else {"prefetch_factor": self.prefetch_factor}
            # The workers' base seed comes from this generator, not the caller's global one, so
            # starting them draws nothing from the training process's random streams.
            base = torch.Generator().manual_seed(derive_seed(self._source.seed, self._epoch, self._start,
                                                             self.rank, WORKERS))
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=False,
                                      worker_init_fn=_leave_stop_signals_to_main, generator=base, **kwargs))
        try:
            for batch in batches:
                self.num_corrupt += int(batch.pop("num_corrupt"))
                self._position += 1
                yield batch
        finally:
            del batches  # shuts the workers down when the loop is left early


def _check_shard_sizes(directory: Path, info: DatasetInfo, index: SampleIndex) -> None:
    """A shard shorter than its indexed samples (a truncated copy or download) is an error before
    training, naming the shard and how many of its samples are complete."""
    ends = np.asarray(index["image_offset"], dtype=np.int64) + np.asarray(index["image_size"], dtype=np.int64)
    offsets = info.shard_offsets
    for k, shard in enumerate(info.shards):
        path = directory / shard.name
        check_not_truncated(str(path), ends[offsets[k]:offsets[k + 1]], path.stat().st_size)


def create_loader(shard_dir: str | Path, *, train: bool, batch_size: int, transform: Callable,
                  seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                  shuffle_buffer: int = 2000, drop_last: bool = False, with_partner: bool = False,
                  exclude_self_pair: bool = False, repeat_previous: bool = False,
                  pin_memory: bool | None = None, prefetch_factor: int | None = None,
                  decode: Callable | None = None, collate: Callable | None = None) -> ShardLoader:
    """A ``ShardLoader`` over the shards of ``shard_dir`` (``dataset.json``, the tars and
    ``samples.npz``).

    ``batch_size`` is per process; ``transform`` maps a PIL RGB image to a ``[3,H,W]`` tensor and
    must pickle for worker processes. ``shuffle_buffer`` is the window of the epoch's sample order
    inside which training shuffles (``skd.data.epoch_plan``). ``drop_last`` (training only) keeps
    full batches only.
    ``with_partner`` adds a CS-KD partner image per anchor, never the anchor itself with
    ``exclude_self_pair`` (the official sampler allows it). ``repeat_previous`` (training, DLB)
    adds the samples this rank read in its batch before, augmented anew
    (``skd.data.epoch_plan.previous_batch_ids``).

    Raises ``FileNotFoundError`` naming every shard listed in ``dataset.json`` that is missing, or
    a missing ``samples.npz``, and ``ShardFormatError`` for a label outside ``[0, num_classes)``:
    before any batch is read.

    ``decode`` (encoded image bytes → the transform's input; default: a PIL RGB image, an
    exception marks the sample corrupt) and ``collate`` (the list of transformed images → the
    batch's ``image``/``partner`` entry; default: ``torch.stack``) let another backend reuse the
    plan, resume and partners while decoding elsewhere (the DALI backend).
    """
    directory = Path(shard_dir)
    info = DatasetInfo.load(directory)
    missing = [s.name for s in info.shards if not (directory / s.name).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingFileError(f"{directory / 'dataset.json'} lists shards that do not exist: "
                               f"{', '.join(missing[:5])}{more}")
    if info.num_samples == 0:
        raise DataError(f"{directory / 'dataset.json'}: the dataset has no samples")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    index = SampleIndex.load(directory, info)
    _check_shard_sizes(directory, info, index)
    labels = np.asarray(index.labels)
    bad = np.flatnonzero((labels < 0) | (labels >= info.num_classes))
    source = _ShardSource(info, index, transform, seed, rank, None, decode, collate, repeat_previous and train)
    if len(bad):
        raise ShardFormatError(f"{source._describe(int(bad[0]))} has label {int(labels[bad[0]])}, outside "
                               f"[0, num_classes={info.num_classes}) of dataset.json "
                               f"({len(bad)} such sample{'s' if len(bad) > 1 else ''})")
    if with_partner:
        source.partners = PartnerSampler(labels, info.num_classes, exclude_self_pair)
    drop_last = drop_last and train
    if drop_last and info.num_samples < world_size * batch_size:
        raise ConfigError(f"data.drop_last=true: {info.num_samples} training samples in {directory} are fewer "
                          f"than {world_size} process{'es' if world_size > 1 else ''} x {batch_size} per "
                          f"process: every epoch would be empty")
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    return ShardLoader(source, train=train, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
                       drop_last=drop_last, window=shuffle_buffer if train else 0, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor)
