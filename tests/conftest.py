"""Shared pytest set-up: the Triton interpreter on machines without a GPU, a seed per test,
``@pytest.mark.gpu`` tests skipped where CUDA is missing, and one real run of the demo."""
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

# Before anything imports a @triton.jit kernel: Triton chooses compiled or interpreted at
# decoration time. Without a GPU the kernels then run on CPU tensors through the interpreter; with
# one they are compiled, unless TRITON_INTERPRET is set by the caller.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import random

import numpy as np
import pytest
import torch

SEED = 0


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # also seeds every CUDA device
    yield


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and far faster than on two when the machine's two
    cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


DEMO_COMMAND = "skd train output_dir=runs/demo"
"""README's demo command, exactly as written there (tests/test_docs.py checks that it is)."""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> SimpleNamespace:
    """README's demo command (the embedded demo, shard creation included), run once in a fresh
    folder with its own data cache: ``folder/runs/demo`` holds the run, ``stdout`` what it printed,
    ``env`` the environment it ran in (for commands that read the run and its data)."""
    folder = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "SKD_CACHE": str(folder / "cache")}
    done = subprocess.run([sys.executable, "-m", *shlex.split(DEMO_COMMAND)], cwd=folder,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(folder=folder, run=folder / "runs" / "demo", stdout=done.stdout, env=env)
