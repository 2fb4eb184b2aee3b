"""The PS-KD soft-target memory: indexed writes, the all-gather across ranks, state round trip."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skd.memory import SoftTargetMemory


def test_write_single_process_and_state_round_trip():
    mem = SoftTargetMemory(6, 3, torch.float32)
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    mem.write(torch.tensor([4, 1]), probs, capacity=2)
    assert torch.equal(mem.rows[4], probs[0]) and torch.equal(mem.rows[1], probs[1])
    assert mem.rows[[0, 2, 3, 5]].abs().sum() == 0
    other = SoftTargetMemory(6, 3, torch.float32)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.rows, mem.rows)


def test_fp16_storage_rounds_to_half():
    mem = SoftTargetMemory(2, 2)  # default dtype
    assert mem.table.dtype == torch.float16
    mem.write(torch.tensor([0]), torch.tensor([[1 / 3, 2 / 3]]), capacity=1)
    assert torch.equal(mem.rows[0], torch.tensor([1 / 3, 2 / 3]).half())


def _two_ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mem = SoftTargetMemory(10, 4, torch.float32)
    # Rank 0 writes ids 0..3, rank 1 writes 7, 8 (a short batch, padded to the capacity of 4).
    index = torch.tensor([0, 1, 2, 3]) if rank == 0 else torch.tensor([7, 8])
    probs = torch.softmax(torch.arange(len(index) * 4, dtype=torch.float32).view(-1, 4) + 10 * rank, 1)
    mem.write(index, probs, capacity=4)
    torch.save({"rows": mem.rows, "index": index, "probs": probs}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_write_gathers_rows_of_every_rank_with_uneven_batches():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_two_ranks, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"{r}.pt")) for r in (0, 1))
    assert torch.equal(r0["rows"], r1["rows"])  # replicas stay identical
    expected = torch.zeros(10, 4)
    for r in (r0, r1):
        expected[r["index"]] = r["probs"]
    assert torch.equal(r0["rows"], expected)  # padding rows went to the scratch row only
