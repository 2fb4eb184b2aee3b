"""Run by ``tests/test_distributed.py`` under torchrun with two CPU processes (gloo): DLB and BYOT
on the digits, each trained uninterrupted, then again from a mid-epoch checkpoint of that run on
the same two processes. Every rank writes, per run, what its DLB saw: the share of its repeated
samples that found their logits of the step before, in the last epoch.

    python -m torch.distributed.run --nproc_per_node 2 tests/two_process_dlb_byot.py OUT_DIR
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

from skd.checkpoint import list_checkpoints, load_checkpoint
from skd.config import load_config
from skd.train import Trainer

ARGS = ["model.name=test_resnet", "data.img_size=16", "data.batch_size=128", "data.num_workers=1",
        "log_with=[]", "log_every=5", "checkpoint_every=5", "keep_checkpoints=0", "sched.warmup_epochs=0"]
RUNS = {"dlb": (2, 15), "byot": (1, 5)}
"""Method: (epochs, the step the resumed run starts from); 12 steps an epoch (719 samples a rank)."""


def fit(args: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, args))
    trainer.fit()
    return trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    # Every run of this script shares the one process group: fit()'s end_training would destroy it.
    PartialState.destroy_process_group = lambda self, group=None: None
    for method, (epochs, resume_step) in RUNS.items():
        args = [*ARGS, f"method.name={method}", f"epochs={epochs}"]
        full, resumed = out / f"{method}-full", out / f"{method}-resumed"
        seen = {"full": fit([*args, f"output_dir={full}"]).unwrapped.epoch_stats()}
        if dist.get_rank() == 0:  # the run as a kill right after step `resume_step` would leave it
            shutil.copytree(full, resumed)
            for path in list_checkpoints(resumed):
                if load_checkpoint(path)["step"] > resume_step:
                    path.unlink()
        dist.barrier()
        seen["resumed"] = fit([*args, f"output_dir={resumed}", "resume=auto"]).unwrapped.epoch_stats()
        (out / f"{method}-rank{dist.get_rank()}.json").write_text(json.dumps(seen))
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.destroy_process_group()
