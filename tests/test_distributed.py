"""Two simulated nodes of one CPU process each (gloo), started by launch/local_multinode.sh as SLURM
starts real nodes: one synchronised DDP run of PS-KD with its memory sharded over the two ranks,
then the run resumed mid-epoch on one process (the memory re-sharded, the epoch continued)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skd.checkpoint import list_checkpoints, load_checkpoint, load_parts
from skd.train import main as train_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model.name=resnet8_cifar", "method.name=pskd", "method.memory=sharded", "method.memory_dtype=float32",
        "epochs=2", "data.batch_size=64", "log_with=[]", "log_every=5", "checkpoint_every=10",
        "keep_checkpoints=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory(checkpoint: Path) -> torch.Tensor:
    """The whole PS-KD memory of a checkpoint: the rows of every rank's part, in order."""
    parts = load_parts(checkpoint, load_checkpoint(checkpoint)["rank_parts"])
    assert [int(p["memory.row_start"]) for p in parts] == sorted(int(p["memory.row_start"]) for p in parts)
    return torch.cat([p["memory.table"] for p in parts])


def test_two_nodes_sharded_pskd_then_resumed_on_one_process(tmp_path):
    cmd = ["bash", str(ROOT / "launch" / "local_multinode.sh"), "2", "--port", str(_free_port()), "--",
           *ARGS, "data.num_workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # one timestamped run directory shared by both ranks
    assert "2 processes, 32 images per process per micro-batch" in proc.stdout + proc.stderr

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 360  # each val sample counted once across the two ranks
    checkpoints = list_checkpoints(run)
    state = load_checkpoint(checkpoints[-1])
    assert len(state["rng"]) == 2  # both ranks took part in the checkpoint
    assert state["step"] == 2 * 23  # ceil(1437 / 2) = 719 samples per rank: 22 batches of 32 and one of 15
    assert state["rank_parts"] == 2 and "memory._extra_state" not in state["method"]
    # Each rank saved only its own block of rows; together they are the whole memory, and without
    # drop_last every sample is seen every epoch, so every row holds a softmax.
    table = _memory(checkpoints[-1])
    assert table.shape == (1437, 10)
    assert torch.allclose(table.sum(1), torch.ones(1437), atol=1e-5)

    # Resume mid-epoch 0 (step 10, 640 samples in) on one process: the memory is re-sharded onto
    # it and the loader continues the epoch from sample 640, so at the end of epoch 0 every
    # sample has been trained on once: every row of the memory is written.
    single = tmp_path / "single"
    shutil.copytree(run, single)
    for p in list_checkpoints(single):
        if load_checkpoint(p)["step"] > 10:
            p.unlink()
    assert train_main([*ARGS, "data.num_workers=0", f"output_dir={single}", "resume=auto"]) == 0
    end_of_epoch_0 = [p for p in list_checkpoints(single) if load_checkpoint(p)["loader"]["epoch"] == 1
                      and load_checkpoint(p)["loader"]["batches"] == 0]
    state = load_checkpoint(end_of_epoch_0[0])
    assert state["rank_parts"] == 1 and state["step"] == 10 + (1437 - 640 + 63) // 64
    table = _memory(end_of_epoch_0[0])
    assert torch.allclose(table.sum(1), torch.ones(1437), atol=1e-5)
    assert json.loads((single / "metrics.json").read_text())["num_samples"] == 360
