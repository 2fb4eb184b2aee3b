"""``skd sweep``: the plan of a real table, the SLURM array (dry run, the task with a fake ``srun``,
``scancel`` and ``scontrol``, submission with a fake ``sbatch`` and ``squeue``), the SLURM scripts'
time-limit trap, and the local executor: GPU slots, signals passed on (also to a run whose start
a signal interrupts), and the demo table end to end (a killed run resumed, a failed run reported
and retried, a second invocation that skips everything, a run folder of another config refused,
the paper report)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from skd.config import config_to_dict, load_config
from skd.paper_report import find_runs, paper_results
from skd.presets import get_preset, list_presets
from skd.report import main as report_main
from skd.sweep.cli import main as sweep_main
from skd.sweep.plan import SweepRequest, plan_sweep
from skd.sweep.runs import CONFIG_FILE, STATE_FILE, Sweep, SweepError, read_status
from skd.sweep.slurm import _PER_NODE, task_command

ROOT = Path(__file__).resolve().parents[1]

# A job step that ends when the fake scancel signals it (writes step.signalled), not on a SIGTERM
# of its own: real srun answers one by killing the step's tasks. It gives up after 30 s.
FAKE_SRUN = ('printf "%s\\n" "$@" > "$FAKE_LOG/srun.args"\nenv > "$FAKE_LOG/srun.env"\n'
             'trap \'echo "srun got SIGTERM" >> "$FAKE_LOG/calls"\' TERM\n'
             'touch "$FAKE_LOG/srun.started"\n'
             'for i in $(seq 600); do\n'
             '  if [ -e "$FAKE_LOG/step.signalled" ]; then echo "srun: step ended" >> "$FAKE_LOG/calls"; exit 143; fi\n'
             '  sleep 0.05\n'
             'done\n')
FAKE_SCANCEL = 'echo "scancel $*" >> "$FAKE_LOG/calls"\ntouch "$FAKE_LOG/step.signalled"\n'
# The second host name comes late, as from a long node list: a reader that stops after the first
# line (head -n 1) makes it fail with SIGPIPE.
FAKE_SCONTROL = ('echo "scontrol $*" >> "$FAKE_LOG/calls"\n'
                 '[ "$1" = show ] && echo node7 && sleep 0.2 && echo node8\nexit 0\n')


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    """Until ``condition()`` holds; fails (instead of hanging) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def _fake_bin(folder: Path, **scripts: str) -> dict[str, str]:
    """Executables named after the keywords; returns an environment that finds them first."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(folder)}


def test_plan_of_the_pskd_cifar100_table_as_a_slurm_array(tmp_path, capsys):
    shards = tmp_path / "cifar100"
    (shards / "train").mkdir(parents=True)
    (shards / "test").mkdir()
    out = tmp_path / "sweep"
    argv = ["pskd-cifar100", "--seeds", "0", "1", "2", "--out", str(out), "--data", f"cifar100={shards}",
            "data.num_workers=6", "--executor", "slurm", "--dry-run", "--throttle", "8", "--partition", "gpu",
            "--account", "lab", "--nodes", "2", "--gpus-per-node", "4", "--time", "12:00:00"]
    assert sweep_main(argv) == 0
    sweep = Sweep.load(out)
    presets = list_presets("pskd-cifar100")
    assert len(presets) == 25 and len(sweep.runs) == 75
    assert [r.index for r in sweep.runs] == list(range(75))
    assert {r.run_dir for r in sweep.runs} == {f"{p.name}/seed{s}" for p in presets for s in (0, 1, 2)}
    for run in sweep.runs:
        # The planned config is the preset with the sweep's overrides, nothing else.
        expected = config_to_dict(load_config(get_preset(run.preset).path, [
            f"data.train={shards / 'train'}", f"data.val={shards / 'test'}", "data.num_workers=6", f"seed={run.seed}"]))
        assert run.config == expected
        assert (run.table_id, run.row, run.column) == (run.config["reference"]["table_id"],
                                                      run.config["reference"]["row"], run.config["reference"]["column"])

    script = out / "slurm" / "sweep-1.sbatch"
    lines = script.read_text().splitlines()
    for option in ("--array=0-74%8", "--partition=gpu", "--account=lab", "--nodes=2", "--gpus-per-node=4",
                   "--cpus-per-task=32", "--time=12:00:00", "--signal=B:TERM@180", "--requeue"):
        assert f"#SBATCH {option}" in lines
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}" in lines  # 8 CPUs per GPU by default
    assert lines[-1].endswith(f"-m skd.sweep.slurm {out.resolve()}")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not any(out.glob(f"**/{STATE_FILE}")), "a dry run marks no run as queued"
    assert "a job array of 75 tasks" in capsys.readouterr().out

    # Planning another seed keeps every index (the array task ids) and appends; the CPUs as asked.
    assert sweep_main([argv[0], "--seeds", "3", *argv[5:], "--cpus-per-task", "12"]) == 0
    again = Sweep.load(out)
    assert [r.run_dir for r in again.runs[:75]] == [r.run_dir for r in sweep.runs] and len(again.runs) == 100
    assert {r.seed for r in again.runs[75:]} == {3}
    lines = (out / "slurm" / "sweep-2.sbatch").read_text().splitlines()
    assert {"#SBATCH --array=75-99%8", "#SBATCH --cpus-per-task=12", "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}"} \
        <= set(lines)


def test_teachers_and_data_are_wired_per_run_or_named_when_missing(tmp_path, monkeypatch):
    from skd.sweep.runs import SweepError

    shards = tmp_path / "cifar100"
    for split in ("train", "test"):
        (shards / split).mkdir(parents=True)
    teacher = tmp_path / "resnet56.safetensors"
    targets = ["cifar100_repdistiller/kd_resnet20_from_resnet56", "cifar100_repdistiller/vanilla_resnet20"]
    request = SweepRequest(targets, [0], [], {"cifar100": "cifar100"}, {"resnet56_cifar": str(teacher)})
    monkeypatch.chdir(tmp_path)  # relative paths are made absolute
    _, (kd, vanilla), lacking = plan_sweep(tmp_path / "a", request)
    assert lacking == [] and kd.config["method"]["teacher_checkpoint"] == str(teacher)
    assert (kd.config["data"]["train"], vanilla.config["data"]["val"]) == (str(shards / "train"), str(shards / "test"))
    assert "teacher_checkpoint" not in vanilla.config["method"]

    bare = SweepRequest(targets, [0], [], {}, {})
    with pytest.raises(SweepError, match=r"2 runs have no data.train/data.val: pass --data NAME=DIR for cifar100"
                                         r".*need a teacher checkpoint: resnet56_cifar \(1 runs\)"):
        plan_sweep(tmp_path / "b", bare)
    assert len(plan_sweep(tmp_path / "b", bare, complete=False)[2]) == 2  # a dry run plans them, with warnings


def test_seeds_end_where_overrides_begin(tmp_path, capsys):
    """``--seeds 0 1 key=value``: the override is not a seed (argparse alone would take it as one).
    A seed or preset named twice is one run."""
    assert sweep_main(["demo", "digits/resnet8_ls", "--seeds", "1", "0", "1", "data.num_workers=0", "--dry-run",
                       "--out", str(tmp_path)]) == 0
    assert "plan: 6 runs (3 presets x 2 seeds)" in capsys.readouterr().out
    runs = Sweep.load(tmp_path).runs
    assert [(r.preset, r.seed) for r in runs] == [(f"digits/resnet8_{m}", s) for m in ("ce", "ls", "pskd") for s in (1, 0)]
    assert {r.config["data"]["num_workers"] for r in runs} == {0}
    _, planned, _ = plan_sweep(tmp_path, SweepRequest(["digits/resnet8_ce", "digits/resnet8_ce"], [2, 2], [], {}, {}))
    assert [(r.preset, r.seed) for r in planned] == [("digits/resnet8_ce", 2)]


def test_array_task_resumes_requeues_and_submission_skips_queued_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    sweep, runs, _ = plan_sweep(out, SweepRequest(["digits/resnet8_ce"], [0, 1], ["log_with=[]"], {}, {}))
    sweep.save()
    log = tmp_path / "bin"
    env = _fake_bin(log, args='printf "%s\\n" "$@"\n', srun=FAKE_SRUN, scancel=FAKE_SCANCEL, scontrol=FAKE_SCONTROL)
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="777", SLURM_JOB_ID="781", SLURM_JOB_NODELIST="node[7-8]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    task = subprocess.Popen([sys.executable, "-m", "skd.sweep.slurm", str(out)], env=env)
    run_dir = runs[1].path(out)
    _wait_for(lambda: read_status(run_dir).status == "running" or task.poll() is not None, "the task to start srun")
    assert task.poll() is None and read_status(run_dir).where == "777_1"
    # The time limit: the task sends SIGTERM to its step through SLURM (not to srun), waits for srun
    # to end, then requeues itself.
    task.send_signal(signal.SIGTERM)
    assert task.wait(timeout=120) == 143
    assert (log / "calls").read_text().splitlines() == [
        "scontrol show hostnames node[7-8]", "scancel --signal=TERM 781", "srun: step ended", "scontrol requeue 777_1"]
    assert read_status(run_dir).status == "queued"

    args = (log / "srun.args").read_text().splitlines()
    assert args[:5] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "bash", "-c", _PER_NODE]
    assert args[6:] == ["--config", str(run_dir.resolve() / CONFIG_FILE), f"output_dir={run_dir.resolve()}",
                        "resume=auto"]
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text()) == runs[1].config
    srun_env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
    assert (srun_env["MASTER_ADDR"], srun_env["MASTER_PORT"], srun_env["GPUS_PER_NODE"]) == ("node7", "20781", "4")
    assert srun_env["SRUN_CPUS_PER_TASK"] == "16"  # srun does not inherit the job's --cpus-per-task
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_LOG", env["FAKE_LOG"])
    monkeypatch.delenv("SRUN_CPUS_PER_TASK", raising=False)
    _, extra = task_command(runs[1], out, {k: v for k, v in env.items() if k != "SLURM_CPUS_PER_TASK"})
    assert "SRUN_CPUS_PER_TASK" not in extra  # without --cpus-per-task srun takes SLURM's default
    # What srun runs on each node: one accelerate launch with this node's rank, the run's arguments intact.
    node = subprocess.run(["bash", "-c", _PER_NODE, str(log / "args"), "--config", "a b.yaml", "data.scale=[0.08, 1.0]"],
                          env={**srun_env, "SLURM_NODEID": "1"}, capture_output=True, text=True).stdout.splitlines()
    assert node[:2] == ["-m", "accelerate.commands.launch"] and node[node.index("--num_processes") + 1] == "8"
    assert node[node.index("--machine_rank") + 1] == "1" and node[node.index("--main_process_ip") + 1] == "node7"
    assert node[-5:] == ["skd", "train", "--config", "a b.yaml", "data.scale=[0.08, 1.0]"]
    # A requeued task whose run has finished exits at once.
    (run_dir / "metrics.json").write_text("{}")
    (log / "srun.started").unlink()
    assert subprocess.run([sys.executable, "-m", "skd.sweep.slurm", str(out)], env=env, timeout=120).returncode == 0
    assert not (log / "srun.started").exists()

    # Submission. Run 0 is being trained by a local sweep on another host (its state names a
    # process, no SLURM job): left alone, and squeue is not asked about it. Run 1's task starts
    # before sbatch has returned: its running state is not turned back into queued.
    (run_dir / "metrics.json").unlink()
    (run_dir / STATE_FILE).unlink()
    runs[0].path(out).mkdir(parents=True)
    (runs[0].path(out) / STATE_FILE).write_text(json.dumps({"status": "running", "host": "another-host", "pid": 4321}))
    _fake_bin(log, sbatch='n=$(( $(cat "$FAKE_LOG/job" 2>/dev/null || echo 4241) + 1 )); echo $n > "$FAKE_LOG/job"\n'
                          'if [ -e "$FAKE_LOG/start_at_once" ]; then rm "$FAKE_LOG/start_at_once"\n'
                          '  echo "{\\"status\\": \\"running\\", \\"host\\": \\"node9\\", \\"pid\\": 1, '
                          '\\"slurm_job\\": \\"${n}_1\\"}" > "$RUN1_STATE"; fi\n'
                          'echo "$n;cluster"\n',
              squeue='echo "$*" >> "$FAKE_LOG/squeue.calls"\ncat "$FAKE_LOG/queue"\n')
    monkeypatch.setenv("RUN1_STATE", str(run_dir / STATE_FILE))
    (log / "start_at_once").touch()
    (log / "queue").write_text("4242_1\n")
    argv = ["digits/resnet8_ce", "--seeds", "0", "1", "--out", str(out), "log_with=[]", "--executor", "slurm"]
    assert sweep_main(argv) == 0
    assert "1 running in a local sweep" in capsys.readouterr().out
    assert "#SBATCH --array=1" in (out / "slurm" / "sweep-1.sbatch").read_text().splitlines()
    assert not (log / "squeue.calls").exists()
    assert read_status(runs[0].path(out)).where == "another-host pid 4321"
    assert (read_status(run_dir).status, read_status(run_dir).where) == ("running", "4242_1")
    # Again: squeue still lists task 1, so nothing is submitted.
    assert sweep_main(argv) == 0 and "nothing to submit" in capsys.readouterr().out
    assert len((log / "squeue.calls").read_text().splitlines()) == 1
    # Task 1 left the queue without finishing: it is submitted again, and marked queued.
    (log / "queue").write_text("")
    assert sweep_main(argv) == 0
    assert "#SBATCH --array=1" in (out / "slurm" / "sweep-2.sbatch").read_text().splitlines()
    assert (read_status(run_dir).status, read_status(run_dir).where) == ("queued", "4243_1")
    assert read_status(runs[0].path(out)).status == "running"


@pytest.mark.parametrize("script, cpus", [("multinode.sbatch", "16"), ("1node.sbatch", None)])
def test_the_slurm_scripts_signal_the_step_through_slurm_then_requeue(tmp_path, script, cpus):
    """SIGTERM before the time limit reaches the batch script; its trap signals the training step
    with scancel (srun itself never gets it), waits for srun and requeues the job."""
    log = tmp_path / "bin"
    env = _fake_bin(log, srun=FAKE_SRUN, scancel=FAKE_SCANCEL, scontrol=FAKE_SCONTROL)
    env.update(SLURM_JOB_ID="781", SLURM_JOB_NAME="skd", SLURM_JOB_NODELIST="node[7-8]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4", RUN_DIR=str(tmp_path / "run"))
    env.pop("SRUN_CPUS_PER_TASK", None)
    env.pop("SLURM_CPUS_PER_TASK", None)
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    batch = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / script), "configs/demo.yaml", "epochs=1"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _wait_for(lambda: (log / "srun.started").exists() or batch.poll() is not None, "the script to start srun")
    assert batch.poll() is None
    batch.send_signal(signal.SIGTERM)
    assert batch.wait(timeout=120) == 143
    calls = (log / "calls").read_text().splitlines()
    assert calls[-3:] == ["scancel --signal=TERM 781", "srun: step ended", "scontrol requeue 781"], calls
    assert "srun got SIGTERM" not in calls
    args = (log / "srun.args").read_text().splitlines()
    assert args[-2:] == ["resume=auto", "epochs=1"] if script == "1node.sbatch" else args[-2:] == ["configs/demo.yaml", "epochs=1"]
    srun_env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_env.get("SRUN_CPUS_PER_TASK") == cpus


KILLED_AFTER_FIRST_CHECKPOINT = """
import os, re, signal, sys
_replace = os.replace
def replace(src, dst, *args, **kwargs):  # a checkpoint is renamed into place: then SIGKILL, mid-epoch
    _replace(src, dst, *args, **kwargs)
    if re.fullmatch(r"step-[0-9]+[.]pt", os.path.basename(os.fspath(dst))):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from skd.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""
"""``skd train ARGS`` that kills itself with SIGKILL (as the OOM killer would) as soon as its first
checkpoint is in place: always mid-epoch, whatever the machine's speed."""


@pytest.mark.slow
def test_local_sweep_of_the_demo_table_end_to_end(tmp_path, capsys, monkeypatch):
    """The demo table's baseline cell, three seeds of one epoch: one run killed mid-epoch and
    resumed, one that cannot start (failed, retried only when asked), a second invocation that
    skips everything, a run folder of another config refused, the paper report."""
    import skd.sweep.local as local

    out = tmp_path / "demo"
    args = ["digits/resnet8_ce", "--seeds", "0", "1", "2", "--out", str(out), "epochs=1", "log_with=[]",
            "data.num_workers=0", "checkpoint_every=3"]
    killed, done, broken = (out / "digits" / "resnet8_ce" / f"seed{s}" for s in (0, 1, 2))
    broken.mkdir(parents=True)
    (broken / "checkpoints").write_text("not a folder")  # skd train refuses this folder: exit 2

    train_command = local.train_command

    def killed_after_first_checkpoint(train_args: list[str], processes: int, port: int) -> list[str]:
        if f"output_dir={killed.resolve()}" in train_args:
            return [sys.executable, "-c", KILLED_AFTER_FIRST_CHECKPOINT, *train_args]
        return train_command(train_args, processes, port)

    with monkeypatch.context() as patch:  # the first sweep only
        patch.setattr(local, "train_command", killed_after_first_checkpoint)
        assert sweep_main([*args, "--parallel", "2"]) == 1
    output = capsys.readouterr().out
    assert "stopped  digits/resnet8_ce seed 0 (signal SIGKILL)" in output
    assert "FAILED   digits/resnet8_ce seed 2 (exit 2: bad input" in output and "is a file" in output
    assert [read_status(p).status for p in (killed, done, broken)] == ["stopped", "done", "failed"]
    assert [p.name for p in (killed / "checkpoints").glob("step-*.pt")] == ["step-000000003.pt"]

    # Again, with --retry-failed: the killed run resumes from its checkpoint, the failed one is tried
    # again (and still cannot start).
    assert sweep_main([*args, "--retry-failed", "--parallel", "2"]) == 1
    assert "2 to run, 1 done, 0 failed before" in capsys.readouterr().out
    assert read_status(killed).status == "done" and "resumed from step" in (killed / "sweep.log").read_text()
    assert [json.loads(line)["epoch"] for line in (killed / "history.jsonl").read_text().splitlines()] == [0]
    assert json.loads((broken / STATE_FILE).read_text())["attempts"] == 2

    # A different recipe into the same folders is refused before anything runs.
    assert sweep_main([*args, "epochs=2"]) == 2  # the later override wins
    assert "trained with another config" in capsys.readouterr().err

    # Without --retry-failed nothing runs: the done runs are skipped, the failed one left alone.
    assert sweep_main(args) == 1
    assert "0 to run, 2 done, 1 failed before" in capsys.readouterr().out
    assert sweep_main(["--status", str(out)]) == 0
    assert "3 runs: 2 done, 1 failed" in capsys.readouterr().out

    # The paper report: the cell is the mean of its two finished runs' last-epoch top-1 (compare: last).
    assert report_main([str(out), "--paper"]) == 0
    assert "· +1 unfinished · ‡" in capsys.readouterr().out
    (results,), _ = paper_results(find_runs([out]))
    assert [(r.n, r.unfinished) for r in results] == [(2, 1), (0, 0), (0, 0)]  # Baseline; LS and PS-KD: no run
    values = [json.loads((p / "metrics.json").read_text())["top1"] for p in (killed, done)]
    assert results[0].mean == pytest.approx(sum(values) / 2, abs=1e-9) and results[0].differs == ["epochs=1"]
    assert (out / "report" / "paper-demo.png").is_file()


def test_parallel_runs_split_the_visible_gpus(monkeypatch):
    from skd.sweep.local import LAUNCH_DIR, _slots, train_command
    from skd.sweep.runs import SweepError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert _slots(2, None) == [["4", "5"], ["6", "7"]]
    assert _slots(3, 1) == [["4"], ["5"], ["6"]]
    with pytest.raises(SweepError, match="needs 6 GPUs; 4 are visible"):
        _slots(3, 2)
    single = train_command(["--config", "c.yaml"], 1, 29500)
    assert single == [sys.executable, "-m", "skd", "train", "--config", "c.yaml"]
    multi = train_command(["--config", "c.yaml"], 2, 29501)
    assert multi[1:3] == ["-m", "accelerate.commands.launch"] and multi[-5:] == ["-m", "skd", "train", "--config", "c.yaml"]
    assert multi[multi.index("--num_processes") + 1] == "2" and multi[multi.index("--main_process_port") + 1] == "29501"
    assert Path(multi[multi.index("--config_file") + 1]) == LAUNCH_DIR / "accelerate" / "1node_8gpu.yaml"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _slots(2, None) == [[], []]  # no GPU: the runs share the CPU


def test_a_signal_to_the_sweep_reaches_each_run_once(tmp_path, monkeypatch):
    """SIGTERM to a local sweep, arriving while its second run is being started (after the process
    exists, before the sweep has registered it): every running run hears it once (its own process
    group), the one being started too, stops, is marked stopped; no new run starts; the sweep
    returns 128 + 15 and puts its handlers back."""
    import skd.sweep.local as local

    out = tmp_path / "sweep"
    sweep, runs, _ = plan_sweep(out, SweepRequest(["digits/resnet8_ce"], [0, 1, 2], [], {}, {}))
    fake = tmp_path / "fake_train.sh"  # stops on SIGTERM; ends by itself after 30 s, as a failure
    fake.write_text('for a in "$@"; do case "$a" in output_dir=*) dir="${a#output_dir=}";; esac; done\n'
                    'trap \'echo TERM >> "$dir/terms"; exit 143\' TERM INT\n'
                    'touch "$dir/started"\nfor i in $(seq 600); do sleep 0.05; done\nexit 2\n')
    monkeypatch.setattr(local, "train_command", lambda args, processes, port: ["bash", str(fake), *args])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    started = [r.path(out) / "started" for r in runs]
    real_popen = local.Popen

    def popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        if all(p.exists() for p in started[:1]) and not started[1].exists():  # the second run
            _wait_for(started[1].exists, "the second run's trap")
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, before the sweep knows the run
        else:
            _wait_for(started[0].exists, "the first run's trap")
        return process

    monkeypatch.setattr(local, "Popen", popen)
    handler = signal.getsignal(signal.SIGTERM)
    assert local.run_local(sweep, runs, parallel=2, echo=lambda line: None) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler
    assert [(r.path(out) / "terms").read_text() for r in runs[:2]] == ["TERM\n", "TERM\n"]
    assert [read_status(r.path(out)).status for r in runs] == ["stopped", "stopped", "pending"]


def test_a_run_folder_with_an_empty_or_damaged_config_is_refused_by_name(tmp_path):
    """An empty config.yaml is not 'never trained': the plan stops, naming the file."""
    request = SweepRequest(["digits/resnet8_ce"], [0], [], {}, {})
    _, runs, _ = plan_sweep(tmp_path, request)
    config = runs[0].path(tmp_path) / "config.yaml"
    config.parent.mkdir(parents=True)
    for text in ("", "[1, 2]\n", "a: [\n"):
        config.write_text(text)
        with pytest.raises(SweepError, match=rf"config file {re.escape(str(config))} .*; move that run folder away"):
            plan_sweep(tmp_path, request)
