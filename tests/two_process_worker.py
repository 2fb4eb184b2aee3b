"""A training process for the two-process tests (tests/test_distributed.py), started once per
rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, on the CPU over gloo. No launcher
agent watches the processes, so a rank left waiting in a collective would hang the test.

    python tests/two_process_worker.py MODE [skd train key=value ...]

MODE ``train``: train, after checking that the frozen teacher (if any) is outside the DDP wrapper.
MODE ``fail-on-main``: train, with the main process's first link of a checkpoint (``keep_as``) raising a
``RuntimeError`` (a bug, not bad input).
"""
import os
import sys
import traceback

os.environ.setdefault("ACCELERATE_USE_CPU", "1")

import torch  # noqa: E402

import skd.train  # noqa: E402
from skd.config import load_config  # noqa: E402


def main() -> int:
    mode, overrides = sys.argv[1], sys.argv[2:]
    trainer = skd.train.Trainer(load_config(None, overrides))
    assert trainer.accelerator.num_processes == int(os.environ["WORLD_SIZE"]) == 2
    ddp = trainer.method
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
    frozen = {id(t) for m in trainer.unwrapped.frozen_modules() for t in [*m.parameters(), *m.buffers()]}
    synced = {id(t) for t in [*ddp.module.parameters(), *ddp.module.buffers()]}
    assert not frozen & synced, "a frozen module's tensors are in the DDP wrapper"
    print(f"rank {trainer.accelerator.process_index}: {len(frozen)} frozen tensors outside DDP, "
          f"{len(synced)} inside", flush=True)
    if mode == "fail-on-main" and trainer.accelerator.is_main_process:
        def fail(*args, **kwargs):
            raise RuntimeError("injected failure while linking a checkpoint")
        skd.train.keep_as = fail
    # Leave without interpreter teardown after the last collective: gloo can abort there (SIGABRT),
    # which would hide the exit status under test.
    try:
        trainer.fit()
    except Exception:  # noqa: BLE001  reported as Python would, with its traceback and status 1
        traceback.print_exc()
        status = 1
    else:
        status = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
