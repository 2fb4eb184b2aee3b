"""Two CPU processes (gloo) under torchrun: one synchronised DDP run, PS-KD memory rows of both ranks."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from skd.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_pskd_run(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "skd", "train", "model.name=resnet8_cifar", "method.name=pskd", "method.memory_dtype=float32",
           "epochs=2", "data.batch_size=64", "data.num_workers=1", "log_with=[]", "log_every=5"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # one timestamped run directory shared by both ranks
    assert "2 processes, 32 images per process per step" in proc.stdout + proc.stderr

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 360  # each val sample counted once across the two ranks
    state = load_checkpoint(latest_checkpoint(run))
    assert len(state["rng"]) == 2  # both ranks took part in the checkpoint
    assert state["step"] == 2 * 23  # ceil(1437 / 2) = 719 samples per rank: 22 batches of 32 and one of 15
    table = state["method"]["memory._extra_state"]["table"][:-1]
    written = table.sum(1) > 0
    # Without drop_last every sample is seen every epoch, so every row holds a softmax.
    assert written.all()
    assert torch.allclose(table.sum(1), torch.ones(len(table)), atol=1e-5)
