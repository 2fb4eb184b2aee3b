"""The torch loading backend: tar shards → PIL → the given (timm) transform, in DataLoader workers.

Epoch plan (identical on every rank, computed from ``dataset.json`` alone):

1. Training shuffles the shard order with ``rng(seed, epoch)`` and rotates the resulting stream of
   N samples by a random start, so the dropped tail / wrap-around differs every epoch.
   Evaluation keeps the ``dataset.json`` order.
2. Rank r takes a contiguous range of that stream: training ``S = ceil(N / world)`` samples
   (``drop_last=False``; the shortfall, fewer than ``world`` samples, wraps around to the start of
   the stream) or ``N // (world·B)`` full batches (``drop_last=True``); every rank gets the same
   number of batches whatever the shard count. Evaluation splits N into disjoint contiguous
   ranges (every sample once over all ranks; ranks may differ by one batch).
3. Batch j of a rank belongs to worker ``j % W``; a worker's piece of the range is contiguous and
   holds exactly its batches, so it reads only the shards overlapping it, seeking to its first
   sample through ``samples.npz``. The DataLoader takes batches round-robin from its workers,
   hence the order seen by the training loop is batch 0, 1, 2, ...

Training shuffles each worker's raw (undecoded) samples in a buffer seeded by (seed, epoch, rank,
worker). Augmentation is reseeded for every batch from (seed, epoch, rank, batch number), so
skipping the first k batches on resume (raw samples are skipped without decoding) gives the very
batches, pixels included, of the uninterrupted run. Nothing is ever unpickled: only image
members and ``cls``/``json`` labels are decoded.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from skd.data.dataset_info import DatasetInfo
from skd.data.partners import PartnerSampler
from skd.data.sample_index import RawSample, SampleIndex, ShardFormatError, iter_shard

_log = logging.getLogger("skd.data")

# Seed-stream tags: the same (seed, epoch, ...) must give independent streams per purpose.
_PLAN, _SHUFFLE, _AUGMENT, _PARTNER = 0, 1, 2, 3
_PARTNER_TRIES = 10


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (any sign), via numpy's SeedSequence hashing."""
    entropy = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Segment:
    """``count`` consecutive samples of shard ``shard`` (index in dataset.json) from ``start``."""
    shard: int
    start: int
    count: int


@dataclass
class WorkerPlan:
    worker: int
    """Logical worker; it owns batches ``j ≡ worker (mod num_workers)``."""
    batches: list[int]
    """Batch numbers j of this worker, ascending."""
    batch_sizes: list[int]
    segments: list[Segment]
    """Its contiguous piece of the rank's range, as shard segments in stream order."""


@dataclass
class EpochPlan:
    epoch: int
    rank: int
    num_batches: int
    batch_sizes: list[int]
    num_samples: int
    """Samples of this rank in this epoch (with wrap-around duplicates, before corrupt skips)."""
    shard_order: list[int]
    workers: list[WorkerPlan] = field(default_factory=list)


def plan_epoch(shard_counts: list[int], *, epoch: int, seed: int, rank: int, world_size: int,
               batch_size: int, num_workers: int, train: bool, drop_last: bool) -> EpochPlan:
    """Which samples rank ``rank`` reads in ``epoch``, split into batches and worker pieces."""
    counts = np.asarray(shard_counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("the dataset has no samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = max(1, num_workers)
    if train:
        rng = np.random.default_rng(_seed(seed, epoch, _PLAN))
        order = rng.permutation(len(counts))
        rotation = int(rng.integers(n))
        if drop_last:
            per_rank = (n // (world_size * batch_size)) * batch_size
        else:
            per_rank = -(-n // world_size)
        lo = rank * per_rank
    else:
        order, rotation = np.arange(len(counts)), 0
        lo = rank * n // world_size
        per_rank = (rank + 1) * n // world_size - lo
    num_batches = -(-per_rank // batch_size)
    sizes = [min(batch_size, per_rank - j * batch_size) for j in range(num_batches)]

    ends = np.cumsum(counts[order])  # stream end of the k-th shard in order

    def segments(start: int, length: int) -> list[Segment]:
        out: list[Segment] = []
        pos = (start + rotation) % n
        while length > 0:
            k = int(np.searchsorted(ends, pos, side="right"))
            shard = int(order[k])
            inside = pos - int(ends[k] - counts[shard])
            take = min(int(counts[shard]) - inside, length)
            if out and out[-1].shard == shard and out[-1].start + out[-1].count == inside:
                out[-1] = Segment(shard, out[-1].start, out[-1].count + take)
            else:
                out.append(Segment(shard, inside, take))
            length -= take
            pos = (pos + take) % n
        return out

    plan = EpochPlan(epoch, rank, num_batches, sizes, per_rank, [int(i) for i in order])
    start = lo
    for w in range(workers):
        mine = list(range(w, num_batches, workers))
        my_sizes = [sizes[j] for j in mine]
        plan.workers.append(WorkerPlan(w, mine, my_sizes, segments(start, sum(my_sizes))))
        start += sum(my_sizes)
    return plan


# ---------------------------------------------------------------------------- the reading
class _ShardSource:
    """Everything a worker needs (picklable): paths, index, partner sampler, transform."""

    def __init__(self, directory: Path, info: DatasetInfo, index: SampleIndex | None,
                 transform: Callable, seed: int, rank: int, train: bool, shuffle_buffer: int,
                 partners: PartnerSampler | None) -> None:
        self.directory, self.info, self.index = directory, info, index
        self.transform, self.seed, self.rank = transform, seed, rank
        self.train, self.shuffle_buffer, self.partners = train, shuffle_buffer, partners
        self.offsets = info.shard_offsets
        self.paths = [str(p) for p in info.shard_paths(directory)]

    # ---- raw samples
    def _segment_samples(self, seg: Segment) -> Iterator[tuple[int, RawSample]]:
        name = self.info.shards[seg.shard].name
        base = int(self.offsets[seg.shard])
        start_offset = start_position = 0
        if self.index is not None and seg.start > 0:  # seek straight to the first sample
            start_offset, start_position = int(self.index["offset"][base + seg.start]), seg.start
        taken = 0
        if seg.count <= 0:
            return
        for raw in iter_shard(self.paths[seg.shard], start_offset=start_offset,
                              start_position=start_position, read_images=False, name=name):
            if raw.position < seg.start:
                continue
            yield base + raw.position, raw
            taken += 1
            if taken == seg.count:
                return
        raise ShardFormatError(
            f"{name}: ends after {seg.start + taken} samples, but dataset.json lists "
            f"{self.info.shards[seg.shard].num_samples}; re-index with `skd shard --index-only {self.directory}`")

    def _raw_stream(self, plan: WorkerPlan, files: "_Files", skip: int,
                    rng: random.Random | None) -> Iterator[tuple[int, RawSample]]:
        """The worker's samples, shuffled in the buffer when training. Image bytes are read as
        samples arrive (sequential I/O), except while the first ``skip`` samples are still being
        skipped; the ones not read then are read when they leave the buffer."""
        emitted = 0

        def source() -> Iterator[tuple[int, RawSample]]:
            for seg in plan.segments:
                for sid, raw in self._segment_samples(seg):
                    if emitted >= skip:
                        files.fetch(raw)
                    yield sid, raw

        stream = source()
        if rng is not None and self.shuffle_buffer > 1:
            stream = _shuffle(stream, self.shuffle_buffer, rng)
        for item in stream:
            emitted += 1
            yield item

    # ---- batches
    def iter_worker(self, plan: WorkerPlan, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
        skip_batches = sum(1 for j in plan.batches if j < start_batch)
        skip = sum(plan.batch_sizes[:skip_batches])
        rng = random.Random(_seed(self.seed, epoch, self.rank, plan.worker, _SHUFFLE)) if self.train else None
        files = _Files()
        try:
            stream = self._raw_stream(plan, files, skip, rng)
            for j, size in zip(plan.batches, plan.batch_sizes):
                raws = [next(stream) for _ in range(size)]
                if j < start_batch:
                    continue  # resume: skipped before decoding
                yield self._make_batch(raws, files, epoch, j)
        finally:
            files.close()

    def _make_batch(self, raws: list[tuple[int, RawSample]], files: "_Files", epoch: int,
                    j: int) -> dict[str, Any]:
        num_classes = self.info.num_classes
        images, labels, ids = [], [], []
        corrupt = 0
        with _seeded(_seed(self.seed, epoch, self.rank, j, _AUGMENT)):
            for sid, raw in raws:
                label = raw.label()
                if not 0 <= label < num_classes:
                    raise ShardFormatError(f"{raw.shard}: sample '{raw.key}' has label {label}, outside "
                                           f"[0, num_classes={num_classes}) of dataset.json")
                try:
                    if raw.image_ext is None:
                        raise ValueError("no image member (jpg/jpeg/png/webp)")
                    files.fetch(raw)
                    img = _decode(raw.image)
                except Exception as e:  # PIL raises many types on corrupt data
                    _log.warning("%s: skipping corrupt sample '%s' (id %d): %s: %s",
                                 raw.shard, raw.key, sid, type(e).__name__, e)
                    corrupt += 1
                    continue
                raw.image = None  # free the bytes early
                images.append(self.transform(img))
                labels.append(label)
                ids.append(sid)
            partners: list[torch.Tensor] = []
            partner_ids: list[int] = []
            if self.partners is not None:
                ids, labels, images, partners, partner_ids, lost = self._partners(ids, labels, images, epoch, j)
                corrupt += lost
            batch: dict[str, Any] = {
                "image": torch.stack(images) if images else self._empty(),
                "label": torch.tensor(labels, dtype=torch.int64),
                "index": torch.tensor(ids, dtype=torch.int64),
            }
            if self.partners is not None:
                batch["partner"] = torch.stack(partners) if partners else self._empty()
                batch["partner_index"] = torch.tensor(partner_ids, dtype=torch.int64)
        batch["num_corrupt"] = corrupt
        return batch

    def _partners(self, ids: list[int], labels: list[int], images: list[torch.Tensor], epoch: int,
                  j: int) -> tuple[list[int], list[int], list[torch.Tensor], list[torch.Tensor], list[int], int]:
        """A same-class partner per anchor (uniform over the class, with replacement), read by
        random access; a corrupt partner is redrawn, an anchor without a readable one dropped."""
        gen = np.random.default_rng(_seed(self.seed, epoch, self.rank, j, _PARTNER))
        picks = self.partners.draw(np.asarray(labels, dtype=np.int64), gen, ids) if labels else []
        keep_ids, keep_labels, keep_images, partners, partner_ids, lost = [], [], [], [], [], 0
        for sid, label, image, pid in zip(ids, labels, images, picks):
            img = None
            for attempt in range(_PARTNER_TRIES):
                if attempt:
                    pid = int(self.partners.draw(np.array([label]), gen, [sid])[0])
                try:
                    img = _decode(self.index.read_image_bytes(int(pid)))
                    break
                except ShardFormatError:
                    raise
                except Exception as e:
                    _log.warning("partner sample id %d is corrupt (%s: %s); drawing another", pid,
                                 type(e).__name__, e)
            if img is None:
                lost += 1
                continue
            keep_ids.append(sid), keep_labels.append(label), keep_images.append(image)
            partners.append(self.transform(img))
            partner_ids.append(int(pid))
        return keep_ids, keep_labels, keep_images, partners, partner_ids, lost

    def _empty(self) -> torch.Tensor:
        """A 0-sample image tensor of the transform's output shape (a batch whose samples were all
        corrupt still has to be yielded, or ranks would see different batch counts)."""
        from PIL import Image
        shape = self.transform(Image.new("RGB", (64, 64))).shape
        return torch.zeros((0, *shape), dtype=torch.float32)


class _Files:
    """Shard file descriptors of one worker, for reading image bytes by offset."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fetch(self, raw: RawSample) -> None:
        if raw.image is not None or raw.image_ext is None:
            return
        fd = self.fds.get(raw.path)
        if fd is None:
            fd = self.fds[raw.path] = os.open(raw.path, os.O_RDONLY)
        data = os.pread(fd, raw.image_size, raw.image_offset)
        if len(data) != raw.image_size:
            raise ShardFormatError(f"{raw.shard}: file ends inside sample '{raw.key}'")
        raw.image = data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _shuffle(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """webdataset's shuffle: fill a buffer, then emit a random element for each new one."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) < bufsize:
            continue
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf


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

    def __init__(self, source: _ShardSource, plan: EpochPlan, start_batch: int) -> None:
        self.source, self.plan, self.start_batch = source, plan, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.plan.workers):
            raise RuntimeError(f"planned for {len(self.plan.workers)} workers, running on {workers}")
        # The DataLoader asks physical worker 0 first; after skipping k batches the next batch is
        # k, owned by logical worker k % W, so physical worker p runs logical worker (p + k) % W.
        logical = (physical + self.start_batch) % workers
        return self.source.iter_worker(self.plan.workers[logical], self.plan.epoch, self.start_batch)


# ---------------------------------------------------------------------------- the loader
class ShardLoader:
    """Batches of one rank over one epoch at a time: dicts of CPU tensors ``image`` float
    ``[B,3,H,W]``, ``label`` int64 ``[B]``, ``index`` int64 ``[B]`` (global sample id), and with
    ``with_partner`` also ``partner`` ``[B,3,H,W]`` and ``partner_index`` int64 ``[B]``.

    ``set_epoch(e)`` selects the epoch (a new epoch starts at batch 0); ``state_dict()`` is
    ``{"epoch", "batches"}`` (batches yielded so far in that epoch); after ``load_state_dict`` the
    next ``iter()`` continues right after those batches, with the same samples and augmentation
    as the uninterrupted run. Every ``iter()`` without a pending resume starts the epoch over.
    """

    def __init__(self, source: _ShardSource, *, batch_size: int, world_size: int, num_workers: int,
                 drop_last: bool, pin_memory: bool, prefetch_factor: int | None) -> None:
        self._source = source
        self.info = source.info
        self.batch_size, self.world_size, self.num_workers = batch_size, world_size, num_workers
        self.rank, self.train, self.drop_last = source.rank, source.train, drop_last
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.num_corrupt = 0
        """Corrupt samples skipped so far (summed over the batches this process received)."""
        self._epoch, self._position, self._resume = 0, 0, False
        self._len = self.plan().num_batches

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return plan_epoch([s.num_samples for s in self.info.shards], epoch=self._epoch if epoch is None else epoch,
                          seed=self._source.seed, rank=self.rank, world_size=self.world_size,
                          batch_size=self.batch_size, num_workers=self.num_workers, train=self.train,
                          drop_last=self.drop_last)

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._position, self._resume = epoch, 0, False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if not 0 <= batches <= self._len:  # e.g. resumed with another number of processes
            _log.warning("loader state %s: %d batches per epoch now; continuing at the end of epoch %d",
                         state, self._len, epoch)
            batches = min(max(batches, 0), self._len)
        self._epoch, self._position, self._resume = epoch, batches, True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self._position if self._resume else 0
        self._resume, self._position = False, start
        plan = self.plan()
        if start >= plan.num_batches:
            return
        dataset = _EpochDataset(self._source, plan, start)
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            kwargs = {} if self.prefetch_factor is None else {"prefetch_factor": self.prefetch_factor}
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=False, **kwargs))
        try:
            for batch in batches:
                self.num_corrupt += int(batch.pop("num_corrupt"))
                self._position += 1
                yield batch
        finally:
            del batches  # shuts the workers down when the loop is left early


def create_loader(shard_dir: str | Path, *, train: bool, batch_size: int, transform: Callable,
                  seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                  shuffle_buffer: int = 1000, drop_last: bool | None = None, with_partner: bool = False,
                  exclude_self_pair: bool = False,
                  pin_memory: bool | None = None, prefetch_factor: int | None = None) -> ShardLoader:
    """A ``ShardLoader`` over the shards of ``shard_dir`` (``dataset.json`` + tars [+ samples.npz]).

    ``batch_size`` is per process; ``transform`` maps a PIL RGB image to a ``[3,H,W]`` tensor and
    must pickle for worker processes. ``drop_last`` defaults to ``train``. ``with_partner`` adds a
    CS-KD partner image per anchor (needs ``samples.npz``), never the anchor itself with
    ``exclude_self_pair`` (the official sampler allows it). Raises ``FileNotFoundError`` naming
    every shard listed in ``dataset.json`` that is missing.
    """
    directory = Path(shard_dir)
    info = DatasetInfo.load(directory)
    missing = [s.name for s in info.shards if not (directory / s.name).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{directory / 'dataset.json'} lists shards that do not exist: "
                                f"{', '.join(missing[:5])}{more}")
    if info.num_samples == 0:
        raise ValueError(f"{directory / 'dataset.json'}: the dataset has no samples")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    index = SampleIndex.load(directory, info) if SampleIndex.exists(directory) else None
    partners = None
    if with_partner:
        if index is None:
            raise FileNotFoundError(f"{directory}: with_partner needs samples.npz (random access to any "
                                    f"sample); write it with `skd shard --index-only {directory}`")
        partners = PartnerSampler(np.asarray(index.labels), info.num_classes, exclude_self_pair)
    drop_last = train if drop_last is None else drop_last
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    source = _ShardSource(directory, info, index, transform, seed, rank, train, shuffle_buffer, partners)
    return ShardLoader(source, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
                       drop_last=drop_last, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
