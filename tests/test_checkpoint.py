"""Atomic checkpoint writes and RNG state round trips."""
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from skd.checkpoint import (BEST_NAME, CHECKPOINT_FORMAT, LAST_GOOD_NAME, checkpoint_path, keep_as,
                            latest_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                            set_rng_state)
from skd.resume import set_aside_newer

SKD = {"format": CHECKPOINT_FORMAT}


def test_save_load_round_trip_and_keep(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({**SKD, "step": step, "w": torch.full((3,), float(step))},
                        checkpoint_path(tmp_path, step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002.pt", "step-000000003.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))


def test_kill_during_write_leaves_only_complete_checkpoints(tmp_path):
    save_checkpoint({**SKD, "step": 1, "w": torch.ones(4)}, checkpoint_path(tmp_path, 1))
    # A child process starts writing step 2 and is SIGKILLed half-way through the write.
    child = textwrap.dedent(f"""
        import os, signal, torch
        from skd.checkpoint import checkpoint_path, save_checkpoint
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        save_checkpoint({{"step": 2, "w": torch.zeros(1 << 20)}}, checkpoint_path({str(tmp_path)!r}, 2))
    """)
    proc = subprocess.run([sys.executable, "-c", child])
    assert proc.returncode == -9
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-000000001.pt"
    assert load_checkpoint(latest)["step"] == 1
    # The next successful save clears the killed write's temporary file.
    save_checkpoint({"step": 3}, checkpoint_path(tmp_path, 3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000001.pt", "step-000000003.pt"]


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({**SKD, "rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected



@pytest.mark.parametrize("pruned", [False, True])
def test_going_back_sets_aside_a_newer_best_and_last_good_and_relinks_best(tmp_path, pruned):
    """Resumed from step 20 of a run whose best.pt and last_good.pt are the step-30 checkpoint:
    both are set aside with it, and best.pt goes back to the checkpoint of the resumed state's best
    epoch; if that one was pruned, the state's best is cleared instead of naming lost weights."""
    for epoch, step in enumerate((10, 20, 30), start=1):
        save_checkpoint({**SKD, "step": step, "loader": {"epoch": epoch, "batches": 0}},
                        checkpoint_path(tmp_path, step), keep=0)
    keep_as(checkpoint_path(tmp_path, 30), BEST_NAME)
    keep_as(checkpoint_path(tmp_path, 30), LAST_GOOD_NAME)
    if pruned:
        checkpoint_path(tmp_path, 10).unlink()
    state = {"step": 20, "best": {"epoch": 0, "metrics": {}}}
    moved = set_aside_newer(tmp_path, state)
    assert sorted(p.name for p in moved) == [BEST_NAME, LAST_GOOD_NAME, "step-000000030.pt"]
    folder = tmp_path / "checkpoints"
    assert not (folder / LAST_GOOD_NAME).exists()
    if pruned:
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000020.pt"]
        assert state["best"] is None and not (folder / BEST_NAME).exists()
    else:
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000010.pt", "step-000000020.pt"]
        assert state["best"] == {"epoch": 0, "metrics": {}}
        assert load_checkpoint(folder / BEST_NAME)["step"] == 10
