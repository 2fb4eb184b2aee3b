"""The per-sample memories: the duplicate-write rule, replicated and sharded placements agreeing bit
for bit under PS-KD (dense and top-k, 2 and 3 gloo processes, short batches, repeated ids), and a
sharded memory saved on one world size and loaded on another."""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from skd.memory import ReplicatedRows, ShardedRows, SoftTargetMemory, last_write_wins, shard_bounds
from skd.methods import DataSpec, create_method, get_method_config_class

N, C, K, CAP = 23, 10, 3, 4  # samples, classes, top-k, per-rank batch
LAYOUTS = ("replicated", "sharded", "topk", "sharded_topk")
FIELDS = {"dense": {"table": (C, torch.float32)},
          "topk": {"values": (K, torch.float32), "ids": (K, torch.int32)}}


def test_last_write_wins_keeps_the_last_occurrence_of_each_id():
    index = torch.tensor([5, 2, 5, 7, 2, 5, 0])
    assert last_write_wins(index, scratch=9).tolist() == [9, 9, 9, 7, 2, 5, 0]
    assert last_write_wins(torch.tensor([], dtype=torch.long), scratch=9).numel() == 0


def test_write_single_process_later_position_wins_and_state_round_trip():
    mem = SoftTargetMemory(6, 3, torch.float32)
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    mem.write(torch.tensor([4, 1, 4]), probs, capacity=3)
    assert torch.equal(mem.rows[4], probs[2]) and torch.equal(mem.rows[1], probs[1])
    assert mem.rows[[0, 2, 3, 5]].abs().sum() == 0
    other = SoftTargetMemory(6, 3, torch.float32)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.rows, mem.rows)
    with pytest.raises(ValueError, match="memory in checkpoint holds"):
        ReplicatedRows(6, FIELDS["topk"]).load_state_dict(mem.state_dict())


def test_fp16_storage_rounds_to_half():
    mem = SoftTargetMemory(2, 2)  # default dtype
    assert mem.table.dtype == torch.float16
    mem.write(torch.tensor([0]), torch.tensor([[1 / 3, 2 / 3]]), capacity=1)
    assert torch.equal(mem.rows[0], torch.tensor([1 / 3, 2 / 3]).half())


def _filled_shards(world_size, fields, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = {name: (torch.rand(N, w, generator=g) * 100).to(dt) for name, (w, dt) in fields.items()}
    shards = []
    for rank in range(world_size):
        shard = ShardedRows(N, fields, rank=rank, world_size=world_size)
        for name, t in shard.tensors_on().items():
            t[:-1] = full[name][shard.start:shard.stop]
        shards.append(shard)
    return full, shards


def _assemble(parts, fields, world_size):
    """The rows of ``world_size`` new shards loaded from ``parts``, concatenated in rank order."""
    shards = [ShardedRows(N, fields, rank=r, world_size=world_size) for r in range(world_size)]
    for shard in shards:
        shard.load_rank_states(parts)
    return {name: torch.cat([s.rank_state()[name] for s in shards]) for name in fields}


def test_sharded_state_reshards_on_any_world_size(tmp_path):
    """Parts saved by 2 ranks load on 3 ranks and on 1, read back memory-mapped: same rows."""
    assert shard_bounds(N, 3) == [0, 7, 15, 23]
    full, shards = _filled_shards(2, FIELDS["topk"])
    for rank, shard in enumerate(shards):
        torch.save(shard.rank_state(), tmp_path / f"part{rank}.pt")
    parts = [torch.load(tmp_path / f"part{r}.pt", mmap=True, weights_only=True) for r in range(2)]
    for world_size in (3, 1):
        rows = _assemble(parts, FIELDS["topk"], world_size)
        assert all(torch.equal(rows[name], full[name]) for name in full)
    with pytest.raises(ValueError, match="do not tile"):
        ShardedRows(N, FIELDS["topk"], rank=0, world_size=3).load_rank_states(parts[1:])
    with pytest.raises(ValueError, match="holds"):
        ShardedRows(N, FIELDS["dense"], rank=0, world_size=3).load_rank_states(parts)


# ------------------------------------------------------------------------------------------------
# PS-KD on 2 and 3 gloo processes: every layout, the same batches
# ------------------------------------------------------------------------------------------------
def _schedule(world_size):
    """Per step, per rank: (ids, features, labels). Step 0 fills the memory (α = 0). Ids repeat
    within a batch (step 1, rank 0) and across ranks (id 11 in every batch of step 2); the last
    step's batches are short and uneven (CAP − 1 − rank rows, at least 1)."""
    g = torch.Generator().manual_seed(world_size)
    steps = []
    for step in range(5):
        batches = []
        for rank in range(world_size):
            size = CAP if step < 4 else max(1, CAP - 1 - rank)
            ids = torch.randint(0, N, (size,), generator=g)
            if step == 1 and rank == 0:
                ids[2] = ids[0]
            if step == 2:
                ids[-1] = 11
            features = torch.randn(size, 6, generator=g)
            batches.append((ids, features, torch.randint(0, C, (size,), generator=g)))
        steps.append(batches)
    return steps


def _pskd_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    methods, optims = {}, {}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        cfg = get_method_config_class("pskd")(name="pskd", memory=layout, memory_k=K,
                                              memory_dtype="float32")
        methods[layout] = create_method(cfg, nn.Linear(6, C), DataSpec(C, N, CAP))
        optims[layout] = torch.optim.SGD(methods[layout].parameters(), lr=0.5)
    losses = {layout: [] for layout in LAYOUTS}
    writes = {layout: [] for layout in ("replicated", "topk")}
    for step, batches in enumerate(_schedule(world_size)):
        ids, x, y = batches[rank]
        batch = {"image": x, "label": y, "index": ids}
        for layout, method in methods.items():
            method.start_epoch(0 if step == 0 else 1, 2)
            out = method(batch)
            out["loss"].backward()
            optims[layout].step()
            optims[layout].zero_grad()
            method.after_step(batch, out)
            losses[layout].append(out["loss"].detach())
            if layout in writes:
                writes[layout].append((ids, {k: v.clone() for k, v in out["memory_rows"].items()}))
    torch.save({"losses": {k: torch.stack(v) for k, v in losses.items()}, "writes": writes,
                "replicated": methods["replicated"].memory.tensors_on(),
                "topk": methods["topk"].memory.tensors_on(),
                "sharded": methods["sharded"].rank_state(),
                "sharded_topk": methods["sharded_topk"].rank_state()},
               os.path.join(out_dir, f"{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # skips an exit-time abort of gloo after the last collective


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_memory_matches_replicated_bitwise(world_size):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_pskd_worker, args=(world_size, os.path.join(tmp, "init"), tmp), nprocs=world_size,
                 join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(world_size)]
    for r in ranks:  # every step's loss, bit for bit
        assert torch.equal(r["losses"]["replicated"], r["losses"]["sharded"])
        assert torch.equal(r["losses"]["topk"], r["losses"]["sharded_topk"])
        assert not torch.equal(r["losses"]["replicated"], r["losses"]["topk"])  # k < C matters
    other_world = 3 if world_size == 2 else 2
    for dense, sharded in (("replicated", "sharded"), ("topk", "sharded_topk")):
        fields = FIELDS["dense" if dense == "replicated" else "topk"]
        replica = {name: t[:N] for name, t in ranks[0][dense].items()}
        assert all(torch.equal(r[dense][name], ranks[0][dense][name]) for r in ranks for name in fields)
        # The writes replayed in order, rank by rank, row by row: the highest rank, then the later
        # position, wins; nothing else (padding included) lands in a real row.
        expected = {name: torch.zeros(N, w, dtype=dt) for name, (w, dt) in fields.items()}
        for step in range(len(ranks[0]["writes"][dense])):
            for r in ranks:
                ids, rows = r["writes"][dense][step]
                for i, row_id in enumerate(ids.tolist()):
                    for name in fields:
                        expected[name][row_id] = rows[name][i].to(expected[name].dtype)
        assert all(torch.equal(replica[name], expected[name]) for name in fields)
        parts = [{k.removeprefix("memory."): v for k, v in r[sharded].items()} for r in ranks]
        for w in (1, other_world):
            rows = _assemble(parts, fields, w)
            assert all(torch.equal(rows[name], replica[name]) for name in fields)


def _pskd(memory, **kw):
    cfg = get_method_config_class("pskd")(name="pskd", memory=memory, **kw)
    return create_method(cfg, nn.Linear(6, C), DataSpec(C, N, CAP))


def test_pskd_rank_state_only_for_a_sharded_memory():
    assert _pskd("replicated").rank_state() == {} and _pskd("topk", memory_k=K).rank_state() == {}
    _pskd("topk", memory_k=K).load_rank_states([{}, {}])
    parts = [_pskd("sharded_topk", memory_k=K).rank_state()]
    assert set(parts[0]) == {"memory.row_start", "memory.num_samples", "memory.values", "memory.ids"}
    with pytest.raises(ValueError, match="keeps no per-rank state"):
        _pskd("replicated").load_rank_states(parts)
    with pytest.raises(ValueError, match="method.memory_k' = 11: must be at most"):
        _pskd("topk", memory_k=11)


@pytest.mark.gpu
def test_duplicate_writes_on_cuda_store_what_the_cpu_stores():
    """Thousands of writes to 8 rows in one step: the same rows on CUDA (every run) as on the CPU."""
    index = torch.randint(0, 8, (4096,))
    rows = torch.randn(4096, 64)
    results = []
    for device in ("cpu", "cuda", "cuda", "cuda"):
        for memory in (SoftTargetMemory(8, 64, torch.float32),
                       ShardedRows(8, {"table": (64, torch.float32)}, rank=0, world_size=1)):
            memory.write_rows(index.to(device), {"table": rows.to(device)}, capacity=4096)
            results.append(memory.tensors_on()["table"][:8].cpu())
    assert all(torch.equal(r, results[0]) for r in results)


def test_a_write_beyond_capacity_or_of_another_batch_is_refused():
    """Padding to a per-rank capacity would silently drop the rows past it; a sharded write must
    follow its own batch's fetch, whose route says where the rows live."""
    mem = SoftTargetMemory(6, 3, torch.float32)
    with pytest.raises(ValueError, match="write of 3 rows, more than the capacity 2"):
        mem.write(torch.tensor([0, 1, 2]), torch.rand(3, 3), capacity=2)
    shard = ShardedRows(N, FIELDS["dense"], rank=0, world_size=1)
    fetched = torch.tensor([0, 9])
    shard.fetch(fetched).wait()
    with pytest.raises(RuntimeError, match="write_rows of another batch than the last fetch"):
        shard.write_rows(torch.tensor([1, 2]), {"table": torch.rand(2, C)})
    shard.fetch(fetched).wait()
    shard.write_rows(fetched, {"table": torch.ones(2, C)})
    assert shard.rank_state()["table"][[0, 9]].eq(1).all()
