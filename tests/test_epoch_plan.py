"""The epoch plan: exact per-rank splits, the stream order, and elastic continuation of an epoch."""
from collections import Counter

import numpy as np
import pytest

from skd.data.epoch_plan import Stream, plan_epoch, previous_batch_ids

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


def test_previous_batch_ids_step_back_one_batch_across_epochs_and_elastic_starts():
    """DLB's repeated samples: batch j − 1 of the plan; at a fresh epoch the previous epoch's last
    batch; at an elastic continuation this rank's share of the global step before its start."""
    def plans(world, batch, epoch=1, start=0):
        return [plan_epoch(SHARDS, epoch=epoch, seed=3, rank=r, world_size=world, batch_size=batch, train=True,
                           window=16, start=start) for r in range(world)]

    before, now = plans(2, 8, epoch=0), plans(2, 8)
    for old, new in zip(before, now):
        assert previous_batch_ids(old, 0).size == 0  # the first batch of the run repeats nothing
        assert np.array_equal(previous_batch_ids(new, 0, old), old.sample_ids(old.num_batches - 1))
        for j in range(1, new.num_batches):
            assert np.array_equal(previous_batch_ids(new, j), new.sample_ids(j - 1))
    # Two global steps on 2 ranks x 8, then one rank x 16: its first batch repeats both ranks' step 1 ...
    (alone,) = plans(1, 16, start=now[0].position_after(2))
    assert previous_batch_ids(alone, 0).tolist() == now[0].sample_ids(1).tolist() + now[1].sample_ids(1).tolist()
    # ... and back on 2 ranks x 8 after 3 steps of 16, each rank repeats its half of that step.
    for rank, plan in enumerate(plans(2, 8, start=alone.position_after(3))):
        assert np.array_equal(previous_batch_ids(plan, 0), alone.sample_ids(2)[8 * rank:8 * (rank + 1)])
