"""The epoch plan: exact per-rank splits, the stream order, and elastic continuation of an epoch."""
from collections import Counter

import numpy as np
import pytest

from skd.data.epoch_plan import Stream, plan_epoch

SHARDS = [7, 23, 11, 19, 40]  # N = 100, shards of unequal size


def _epoch_ids(world, batch, *, start=0, steps=None, drop_last=False, window=16, epoch=0):
    """Ids read by all ranks from `start`, for `steps` global steps (None: to the epoch's end)."""
    plans = [plan_epoch(SHARDS, epoch=epoch, seed=3, rank=r, world_size=world, batch_size=batch, train=True,
                        drop_last=drop_last, window=window, start=start) for r in range(world)]
    assert len({p.num_batches for p in plans}) == 1  # every rank the same number of batches
    n = plans[0].num_batches if steps is None else steps
    return [int(i) for j in range(n) for p in plans for i in p.sample_ids(j)], plans[0]


def test_stream_is_a_permutation_shuffled_within_windows():
    stream = Stream.for_epoch(SHARDS, seed=3, epoch=0, window=16, train=True)
    ids = stream.ids(np.arange(100))
    assert sorted(ids.tolist()) == list(range(100))
    plain = Stream.for_epoch(SHARDS, seed=3, epoch=0, window=0, train=True).ids(np.arange(100))
    for w in range(0, 100, 16):  # a window holds the same samples, in another order
        assert sorted(ids[w:w + 16].tolist()) == sorted(plain[w:w + 16].tolist())
    assert not np.array_equal(ids, plain)
    # Without windows, the stream is the shards in some order, rotated: runs of consecutive ids.
    assert np.count_nonzero(np.diff(plain) != 1) <= len(SHARDS)
    other_epoch = Stream.for_epoch(SHARDS, seed=3, epoch=1, window=16, train=True).ids(np.arange(100))
    assert not np.array_equal(ids, other_epoch)
    np.testing.assert_array_equal(stream.ids(np.arange(100, 103)), ids[:3])  # wrap-around


@pytest.mark.parametrize("world, batch", [(1, 8), (2, 8), (3, 7), (4, 30)])
def test_every_sample_once_per_epoch_with_fewer_than_world_repeats(world, batch):
    ids, plan = _epoch_ids(world, batch)
    counts = Counter(ids)
    assert set(counts) == set(range(100))
    assert sum(c - 1 for c in counts.values()) == -(-100 // world) * world - 100 < world


def test_drop_last_gives_full_batches_only():
    ids, plan = _epoch_ids(3, 8, drop_last=True)
    assert plan.batch_sizes == [8] * 4 and len(set(ids)) == len(ids) == 96


@pytest.mark.parametrize("before, after", [((2, 20), (1, 20)), ((1, 10), (3, 10)), ((2, 20), (2, 10)),
                                           ((3, 4), (2, 9))])
def test_an_epoch_continues_elastically_from_the_stream_position(before, after):
    """k steps with (world, batch) = before, then the rest of the epoch with `after`: every sample
    is read once, plus fewer than `after`'s world wrap-around repeats."""
    (w0, b0), (w1, b1) = before, after
    first, plan = _epoch_ids(w0, b0, steps=2)
    position = plan.position_after(2)
    assert first == [int(i) for i in plan.stream.ids(np.arange(position))]  # a prefix of the stream
    rest, _ = _epoch_ids(w1, b1, start=position)
    counts = Counter(first + rest)
    assert set(counts) == set(range(100))
    assert sum(c - 1 for c in counts.values()) < w1


def test_evaluation_ranks_take_contiguous_parts_in_order():
    parts = []
    for r in range(3):
        plan = plan_epoch(SHARDS, epoch=5, seed=1, rank=r, world_size=3, batch_size=8, train=False)
        parts += [int(i) for j in range(plan.num_batches) for i in plan.sample_ids(j)]
    assert parts == list(range(100))
