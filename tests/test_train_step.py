"""One training step for the trainer and the benchmarks: ``skd.train_step.train_step``. The same
config, seed and batches give the same weights, EMA and PS-KD memory through the trainer's loop and
through the benchmark's ``TrainStep``, with gradient clipping, EMA, accumulation and a per-step
lr schedule on."""
from __future__ import annotations

import pytest
import torch

from skd.bench._steps import StepSizes, StepSpec, TrainStep
from skd.config import load_config
from skd.train import Trainer
from test_hardening import _ListLoader

FAST = ["model.name=resnet8_cifar", "log_with=[]", "data.num_workers=0", "log_every=1000"]


@pytest.mark.parametrize("method", ["pskd", "cskd"])
def test_the_benchmark_steps_through_the_trainers_step(tmp_path, method):
    cfg = load_config(None, FAST + [f"method.name={method}", "data.batch_size=16", "grad_accum_steps=2",
                                    "optim.clip_grad=0.5", "ema.enabled=true", "ema.decay=0.5",
                                    "sched.sched=cosine", "sched.step_on_epochs=false", "sched.warmup_epochs=0",
                                    "epochs=10", f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    info = trainer.train_loader.info
    sizes = StepSizes(batch_size=8, img_size=32, num_classes=info.num_classes, num_samples=info.num_samples)
    bench = TrainStep(trainer.accelerator, StepSpec("resnet8_cifar", method), sizes, work_dir=tmp_path,
                      cfg=cfg, epoch=1, steps_per_epoch=trainer.steps_per_epoch)
    # The benchmark's batch, four times: two optimizer steps of two micro-batches in the trainer.
    trainer.train_loader = _ListLoader([dict(bench.batch)] * 4, info)
    before = {k: v.clone() for k, v in trainer.unwrapped.model.state_dict().items()}
    trainer.train_one_epoch(1)
    bench()
    bench()

    assert trainer.step == bench.step == 2
    ours, theirs = trainer.unwrapped.state_dict(), bench.parts.unwrapped.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:  # weights, BN statistics, the PS-KD memory (a dict of tensors)
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    for (key, a), b in zip(trainer.ema.state_dict().items(), bench.parts.ema.state_dict().values()):
        assert torch.equal(a, b), key
    assert trainer.optimizer.param_groups[0]["lr"] == bench.parts.optimizer.param_groups[0]["lr"]
    # Not trivially equal: the steps changed the weights.
    after = trainer.unwrapped.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
