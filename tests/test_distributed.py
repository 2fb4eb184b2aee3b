"""Two CPU processes (gloo). Two simulated nodes of one process each, started by
launch/local_multinode.sh as SLURM starts real nodes: one synchronised DDP run of PS-KD with its
memory sharded over the two ranks, then the run resumed mid-epoch on one process (the memory
re-sharded, the epoch continued); what that run reports equals `skd eval` of what it saved. Two
processes started without a launcher: a KD teacher outside DDP, and a failure on one process
stops both. DLB and BYOT under
torchrun: resumed exactly on two processes, DLB also continued on one. Zipf's LS and BAKE trained
and resumed on two spawned processes, and BAKE's global batch."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import assert_same_final_state, copy_run_until

from skd.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_parts
from skd.config import load_config
from skd.data import DatasetInfo, plan_epoch, resolve_shard_dir
from skd.train import main as train_main
from skd.train import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model.name=resnet8_cifar", "method.name=pskd", "method.memory=sharded", "method.memory_dtype=float32",
        "epochs=2", "data.batch_size=64", "log_with=[]", "log_every=5", "checkpoint_every=10",
        "keep_checkpoints=0", "ema.enabled=true", "ema.decay=0.8"]


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
    _reported_metrics_equal_skd_eval(run, metrics, tmp_path)

    # Resume mid-epoch 0 (step 10, 640 samples in) on one process: the memory is re-sharded onto
    # it and the loader continues the epoch from sample 640, so at the end of epoch 0 every
    # sample has been trained on once: every row of the memory is written.
    single = tmp_path / "single"
    copy_run_until(run, single, step=10)
    assert train_main([*ARGS, "data.num_workers=0", f"output_dir={single}", "resume=auto"]) == 0
    end_of_epoch_0 = [p for p in list_checkpoints(single) if load_checkpoint(p)["loader"]["epoch"] == 1
                      and load_checkpoint(p)["loader"]["batches"] == 0]
    state = load_checkpoint(end_of_epoch_0[0])
    assert state["rank_parts"] == 1 and state["step"] == 10 + (1437 - 640 + 63) // 64
    table = _memory(end_of_epoch_0[0])
    assert torch.allclose(table.sum(1), torch.ones(1437), atol=1e-5)
    assert json.loads((single / "metrics.json").read_text())["num_samples"] == 360


# ------------------------------------------------------------------------- processes without a launcher
def _two_processes(args: list[str], cwd: Path, timeout: float = 300) -> list[tuple[int, str, str]]:
    """``tests/two_process_worker.py`` as ranks 0 and 1 (return code, stdout, stderr of each).
    Started directly, not by a launcher that would stop the other rank when one fails: a rank
    left waiting in a collective runs into the timeout."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "two_process_worker.py"), *args], cwd=cwd,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def _teacher_file(folder: Path) -> Path:
    """A randomly initialised resnet8_cifar, recorded as trained on the digits' inputs."""
    import timm
    from safetensors.torch import save_file

    import skd.models  # noqa: F401
    from skd.config import DataConfig
    from skd.teacher import safetensors_metadata

    torch.manual_seed(1)
    teacher = timm.create_model("resnet8_cifar", num_classes=10)
    path = folder / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path),
              metadata=safetensors_metadata("resnet8_cifar", DataConfig().mean, DataConfig().std, 32))
    return path


def _reported_metrics_equal_skd_eval(run: Path, metrics: dict, tmp_path: Path) -> None:
    """What a two-process run reports for its last epoch, its best epoch and its EMA equals
    ``skd eval`` of the weights it saved, on one process and on two: BatchNorm statistics are made
    equal across ranks before each evaluation and checkpoint (``dist_bn``)."""
    from skd.evaluate import evaluate_target

    metrics = dict(metrics)
    best, ema = metrics.pop("best"), metrics.pop("ema")
    best.pop("epoch")
    for target, reported in (("", metrics), ("model_best.safetensors", best), ("model_ema.safetensors", ema)):
        assert evaluate_target(run / target, ["data.num_workers=0"]) == pytest.approx(reported, rel=1e-5, abs=1e-6), target
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "skd", "eval", str(run / "model_best.safetensors"),
                           "data.num_workers=0", "--json", str(tmp_path / "two.json")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text()) == pytest.approx(best, rel=1e-5, abs=1e-6)


def test_a_failure_on_one_process_stops_every_process(tmp_path):
    """KD on two processes: the frozen teacher is outside the DDP wrapper (checked by the worker).
    Then a bug (a RuntimeError) on the main process while it writes for everyone: it exits with its
    own traceback, and the other process does not wait for it in a collective but stops too."""
    args = ["model.name=resnet8_cifar", "method.name=kd", "method.teacher=resnet8_cifar",
            f"method.teacher_checkpoint={_teacher_file(tmp_path)}", "epochs=1", "data.batch_size=256",
            "data.num_workers=0", "log_with=[]", f"output_dir={tmp_path / 'run'}"]
    (code0, out0, err0), (code1, out1, err1) = _two_processes(["fail-on-main", *args], tmp_path, timeout=240)
    assert "frozen tensors outside DDP" in out0 and "frozen tensors outside DDP" in out1
    assert code0 == 1 and "RuntimeError: injected failure while linking a checkpoint" in err0
    assert code1 == 1 and "RankFailed: another process failed: RuntimeError: injected failure" in err1


def test_dlb_and_byot_on_two_processes_resume_exactly_and_dlb_continues_on_one(tmp_path):
    """DLB and BYOT on two processes (``two_process_dlb_byot.py``), each resumed mid-epoch on the
    same two processes: the final weights are the uninterrupted run's. Every DLB rank found the
    logits of each sample it repeated, and its checkpoint part holds its own last batch. Then DLB
    resumed from its mid-epoch checkpoint on one process: the first batch repeats the two ranks'
    last global step, whose logits come from both parts."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "tests" / "two_process_dlb_byot.py"), str(tmp_path)]
    # The losses' kernels are tested elsewhere: here their PyTorch reference (no interpreter) is enough.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("dlb", "byot"):
        full = load_file(tmp_path / f"{method}-full" / "model.safetensors")
        resumed = load_file(tmp_path / f"{method}-resumed" / "model.safetensors")
        assert all(torch.equal(full[k], resumed[k]) for k in full), method
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"dlb-rank{rank}.json").read_text())
        assert seen == {"full": {"dlb_targets_found": 1.0}, "resumed": {"dlb_targets_found": 1.0}}

    # The step-15 checkpoint (epoch 1, batch 3): each rank's part is the batch it read last.
    (checkpoint,) = [p for p in list_checkpoints(tmp_path / "dlb-full") if load_checkpoint(p)["step"] == 15]
    state = load_checkpoint(checkpoint)
    loader = state["loader"]
    assert (loader["epoch"], loader["batches"], loader["world_size"], loader["batch_size"]) == (1, 3, 2, 64)
    parts = load_parts(checkpoint, state["rank_parts"])
    info = DatasetInfo.load(resolve_shard_dir("digits", "train", "data.train"))
    for rank, part in enumerate(parts):
        plan = plan_epoch([s.num_samples for s in info.shards], epoch=1, seed=state["config"]["seed"], rank=rank,
                          world_size=2, batch_size=64, train=True, window=loader["window"])
        assert part["previous_index"].tolist() == plan.sample_ids(2).tolist()
        assert part["previous_logits"].shape == (64, 10)

    single = tmp_path / "dlb-single"
    shutil.copytree(tmp_path / "dlb-full", single)
    for p in list_checkpoints(single):
        if load_checkpoint(p)["step"] > 15:
            p.unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, ["model.name=test_resnet", "data.img_size=16", "data.batch_size=128",
                                 "data.num_workers=0", "log_with=[]", "sched.warmup_epochs=0", "method.name=dlb",
                                 "epochs=2", "checkpoint_every=5", "keep_checkpoints=0", f"output_dir={single}",
                                 "resume=auto"]))
    finally:
        torch.set_num_threads(threads)
    last = [json.loads(line) for line in (single / "history.jsonl").read_text().splitlines()][-1]
    assert last["epoch"] == 1 and last["dlb_targets_found"] == 1.0


# ------------------------------------------------------------------------------------------------
# Zipf's LS and BAKE on two processes: one spawn for all of it (start-up is the expensive part)
# ------------------------------------------------------------------------------------------------
SELF_KD = {"zipf_ls": ["method.dense_upsample=bilinear"], "bake": []}
SELF_KD_ARGS = ["model.name=resnet8_cifar", "data.img_size=8", "epochs=1", "data.batch_size=128",
                "data.num_workers=0", "log_with=[]", "log_every=4", "checkpoint_every=4",
                "keep_checkpoints=0", "sched.warmup_epochs=0"]
BAKE_ROWS = (5, 3)  # rank 1's batch is short: padded to rank 0's for the gather


def _bake_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=g), 3 * torch.randn(rows, 10, generator=g)


def _self_kd_worker(rank: int, ports: list[int], root: str) -> None:
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    from skd.config import load_config
    from skd.methods import DataSpec, create_method, get_method_config_class
    from skd.train import train

    os.environ.update(ACCELERATE_USE_CPU="1", MASTER_ADDR="127.0.0.1", WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    # BAKE's soft targets over the global batch: each rank its own rows of it.
    dist.init_process_group("gloo", rank=rank, world_size=2)
    bake = create_method(get_method_config_class("bake")(name="bake", intra_imgs=0),
                         torch.nn.Linear(6, 10), DataSpec(10, 100, max(BAKE_ROWS)))
    features, logits = _bake_batch(BAKE_ROWS[rank], seed=rank)
    torch.save(bake.soft_targets(features, logits), os.path.join(root, f"bake_targets_{rank}.pt"))
    dist.destroy_process_group()

    # Each method trained for an epoch, then again from the checkpoint of step 8.
    for i, (method, extra) in enumerate(SELF_KD.items()):
        full, resumed = os.path.join(root, method), os.path.join(root, f"{method}_resumed")
        args = [*SELF_KD_ARGS, f"method.name={method}", *extra]
        for port, out, more in ((ports[1 + 2 * i], full, []), (ports[2 + 2 * i], resumed, ["resume=auto"])):
            if more and rank == 0:  # the other rank waits in the next rendezvous
                copy_run_until(Path(full), Path(resumed), step=8)
            os.environ["MASTER_PORT"] = str(port)
            train(load_config(None, [*args, f"output_dir={out}", *more]))
            # A new process group for the next run (train() destroys its own at the end).
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    sys.stdout.flush()
    os._exit(0)  # skips an exit-time abort of gloo after the last collective


def test_zipf_ls_and_bake_on_two_processes_resume_exactly(tmp_path):
    import torch.multiprocessing as mp

    from skd import losses

    mp.spawn(_self_kd_worker, args=([_free_port() for _ in range(5)], str(tmp_path)), nprocs=2, join=True)

    # BAKE: two processes with their batches give the targets of one process with both batches.
    (f0, z0), (f1, z1) = (_bake_batch(rows, seed=r) for r, rows in enumerate(BAKE_ROWS))
    together = losses.bake_soft_targets(torch.cat([f0, f1]), torch.cat([z0, z1]))
    split = torch.cat([torch.load(tmp_path / f"bake_targets_{r}.pt", weights_only=True) for r in range(2)])
    torch.testing.assert_close(split, together, rtol=1e-6, atol=1e-7)

    for method in SELF_KD:
        full, resumed = tmp_path / method, tmp_path / f"{method}_resumed"
        state = load_checkpoint(latest_checkpoint(full))
        assert state["step"] == 12 and len(state["rng"]) == 2  # ceil(719 / 64) steps on both ranks
        history = [json.loads(line) for line in (full / "history.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k.startswith("train_"))
        assert_same_final_state(resumed, full)  # resumed from step 8 on two processes
