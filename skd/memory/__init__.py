"""Per-sample memories of the training set: PS-KD's past predictions, CRD's embeddings.

A memory holds named rows, one per training sample (``Fields``: a name → row width and dtype),
in one of two placements behind one interface (``fetch`` the rows of a batch before the forward,
``write_rows`` after the optimizer step, checkpoint state):

- ``ReplicatedRows`` (and ``SoftTargetMemory``, its one-table form): every process holds every
  row; a write all-gathers the rows of every rank.
- ``ShardedRows``: process r holds the contiguous block of rows ``shard_bounds(N, world)[r:r+2]``;
  rows travel to and from their owners with all-to-all.

Both resolve repeated ids in one write with the same rule (``last_write_wins``).
"""
from skd.memory.replicated import ReplicatedRows, SoftTargetMemory
from skd.memory.rows import Fields, FetchedRows, last_write_wins
from skd.memory.sharded import ShardedRows, shard_bounds

__all__ = ["Fields", "FetchedRows", "ReplicatedRows", "ShardedRows", "SoftTargetMemory",
           "last_write_wins", "shard_bounds"]
