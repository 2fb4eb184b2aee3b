"""The epoch plan: which sample every rank reads in every batch, from ``dataset.json`` alone.

Training. The epoch's *stream* is an order of the N sample ids, seeded by ``(seed, epoch)``: the
shards in a random order, the result rotated by a random offset (so what wraps around differs
every epoch), then shuffled inside consecutive windows of ``window`` positions. Ranks walk the
stream in *global steps*: step g of a plan covers ``world · b_g`` consecutive positions and rank r
takes the r-th ``b_g`` of them. After k full steps the samples read are therefore exactly the
stream's positions ``[start, start + k·world·B)``, whatever the number of processes: a run
resumed with another number of processes, workers or per-process batch plans the rest of the
epoch from that position, and every sample is still read once.

Each rank gets ``ceil((N − start) / world)`` samples (positions past N wrap around to the
stream's beginning: fewer than ``world`` samples are read twice), or with ``drop_last``
``floor((N − start) / (world·B))`` full batches: every rank has the same number of batches.

Evaluation. No shuffle: rank r takes a contiguous range of the ``dataset.json`` order, so every
sample is evaluated exactly once over all ranks (ranks may differ by one batch).

The batch before. DLB repeats, in every batch, the samples its rank read in the batch before
(``previous_batch_ids``): batch ``j − 1`` of the plan; for the first batch of a fresh epoch, the
last batch of the previous epoch's plan; for the first batch of a plan that continues an epoch
from ``start > 0`` (an elastic resume), this rank's share of the global step just before
``start`` under the new layout, which with an unchanged global batch is exactly the last step the
saved run took (its positions ``[start − world·B, start)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Stream", "EpochPlan", "plan_epoch", "previous_batch_ids", "derive_seed"]

# Seed-stream tags: the same (seed, epoch, ...) gives independent streams per purpose.
PLAN, WINDOW, AUGMENT, PARTNER, WORKERS, REPEAT = 0, 1, 2, 3, 4, 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (any sign): distinct tuples give independent seeds. Each part
    is two fixed 32-bit words and the count comes first (numpy's SeedSequence alone would treat
    ``(1, 2)`` and ``(1, 2, 0)`` alike)."""
    words = [len(parts)]
    for p in parts:
        v = int(p) % (1 << 64)
        words += [v >> 32, v & 0xFFFFFFFF]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


@dataclass
class Stream:
    """The order of the samples in one epoch: ``ids(positions)`` maps stream positions to global
    sample ids (positions ≥ N wrap around)."""

    shard_counts: np.ndarray
    """int64 ``[S]``: samples per shard, in ``dataset.json`` order."""
    order: np.ndarray
    """The shards in stream order (indices into ``shard_counts``)."""
    rotation: int
    """The stream starts at this position of the shard-ordered sequence."""
    window: int
    """Positions ``[w·window, (w+1)·window)`` are shuffled among themselves; 0 or 1: none."""
    seed: int = 0
    epoch: int = 0
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def for_epoch(cls, shard_counts: list[int], *, seed: int, epoch: int, window: int, train: bool) -> Stream:
        counts = np.asarray(shard_counts, dtype=np.int64)
        if int(counts.sum()) == 0:
            raise ValueError("the dataset has no samples")
        if not train:
            return cls(counts, np.arange(len(counts)), 0, 0, seed, epoch)
        rng = np.random.default_rng(derive_seed(seed, epoch, PLAN))
        order = rng.permutation(len(counts))
        return cls(counts, order, int(rng.integers(int(counts.sum()))), window, seed, epoch)

    @property
    def num_samples(self) -> int:
        return int(self.shard_counts.sum())

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Global sample ids (int64) at stream ``positions``."""
        n = self.num_samples
        pos = np.asarray(positions, dtype=np.int64) % n
        if self.window > 1:
            pos = self._shuffled(pos, n)
        pos = (pos + self.rotation) % n
        ordered_counts = self.shard_counts[self.order]
        ends = np.cumsum(ordered_counts)
        k = np.searchsorted(ends, pos, side="right")  # k-th shard of the stream
        inside = pos - (ends[k] - ordered_counts[k])
        shard_offsets = np.concatenate([[0], np.cumsum(self.shard_counts)[:-1]])
        return shard_offsets[self.order[k]] + inside

    def _shuffled(self, pos: np.ndarray, n: int) -> np.ndarray:
        window = pos // self.window
        out = pos.copy()
        for w in np.unique(window):
            mask = window == w
            out[mask] = w * self.window + self._perm(int(w), n)[pos[mask] - w * self.window]
        return out

    def _perm(self, w: int, n: int) -> np.ndarray:
        perm = self._perms.get(w)
        if perm is None:
            if len(self._perms) > 8:  # a reader moves through the windows in order
                self._perms.clear()
            length = min(self.window, n - w * self.window)
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, w, WINDOW))
            perm = self._perms[w] = rng.permutation(length)
        return perm


@dataclass
class EpochPlan:
    """One rank's batches of one epoch (or of the rest of an epoch, from ``start``)."""

    stream: Stream
    rank: int
    world_size: int
    batch_size: int
    start: int
    """Stream position where this plan begins (0 for a fresh epoch)."""
    batch_sizes: list[int]
    train: bool
    lo: int = 0
    """Evaluation: the first position of this rank's contiguous range."""

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    def positions(self, j: int) -> np.ndarray:
        """Stream positions of this rank's batch ``j``."""
        size = self.batch_sizes[j]
        if self.train:  # global step j: world × size positions after j full steps
            first = self.start + j * self.world_size * self.batch_size + self.rank * size
        else:
            first = self.lo + j * self.batch_size
        return np.arange(first, first + size, dtype=np.int64)

    def sample_ids(self, j: int) -> np.ndarray:
        return self.stream.ids(self.positions(j))

    def position_after(self, k: int) -> int:
        """Training: the stream position reached when every rank has read ``k`` batches of this
        plan (``k`` below ``num_batches``; after the last batch the epoch is over)."""
        return self.start + k * self.world_size * self.batch_size


def plan_epoch(shard_counts: list[int], *, epoch: int, seed: int, rank: int, world_size: int,
               batch_size: int, train: bool, drop_last: bool = False, window: int = 0,
               start: int = 0) -> EpochPlan:
    """The batches rank ``rank`` reads in ``epoch``, from stream position ``start`` on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stream = Stream.for_epoch(shard_counts, seed=seed, epoch=epoch, window=window, train=train)
    n = stream.num_samples
    lo = 0
    if train:
        remaining = max(n - start, 0)
        per_rank = (remaining // (world_size * batch_size)) * batch_size if drop_last else -(-remaining // world_size)
    else:
        lo = rank * n // world_size
        per_rank = (rank + 1) * n // world_size - lo
    sizes = [min(batch_size, per_rank - j * batch_size) for j in range(-(-per_rank // batch_size))]
    return EpochPlan(stream, rank, world_size, batch_size, start, sizes, train, lo)


def previous_batch_ids(plan: EpochPlan, j: int, previous_epoch: EpochPlan | None = None) -> np.ndarray:
    """Training: the sample ids (int64) that rank ``plan.rank`` read in the batch before its batch
    ``j`` of ``plan`` (see the module docstring). ``previous_epoch`` is the plan of the epoch
    before, from its start and with this plan's layout; None (or the first batch of the first
    epoch) gives no ids."""
    if j > 0:
        return plan.sample_ids(j - 1)
    if plan.start > 0:
        step = plan.world_size * plan.batch_size
        first = plan.start - step + plan.rank * plan.batch_size
        positions = np.arange(max(first, 0), max(first + plan.batch_size, 0), dtype=np.int64)
        return plan.stream.ids(positions)
    if previous_epoch is not None and previous_epoch.num_batches:
        return previous_epoch.sample_ids(previous_epoch.num_batches - 1)
    return np.zeros(0, dtype=np.int64)
