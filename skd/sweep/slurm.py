"""The SLURM executor: one job array per submission, one array task per run, built on SLURM's own
job arrays.

``skd sweep ... --executor slurm`` writes ``DIR/slurm/sweep-N.sbatch`` (``#SBATCH --array`` lists
the runs' indices in ``sweep.json``, ``%N`` throttles them) and submits it with ``sbatch``. Each
task runs ``python -m skd.sweep.slurm DIR``, which reads its run from ``sweep.json`` by
``SLURM_ARRAY_TASK_ID`` and starts it as ``launch/slurm/multinode.sbatch`` does: one ``accelerate
launch`` per node through ``srun`` (``launch/accelerate/multinode.yaml``, a rendezvous port per
job), ``skd train --config RUN/sweep_config.yaml output_dir=RUN resume=auto``. SLURM sends
SIGTERM to the task (the batch step) 180 s before the time limit (``--signal=B:TERM@180``); the
task sends it to the processes of its job step through SLURM (``scancel --signal=TERM
$SLURM_JOB_ID``: every process of the step, not the batch step, and not ``srun`` itself, which
would answer a SIGTERM by killing the step), skd writes a checkpoint and stops, the task waits for
``srun`` to end and requeues itself (``scontrol requeue``): the requeued task resumes from that
checkpoint. A preempted task is requeued by SLURM (``--requeue``) and resumes the same way. A
task whose run is already done exits at once.

Each task asks for ``--cpus-per-task`` CPUs (default ``CPUS_PER_GPU`` per GPU of a node) for the
node's training processes, their loader workers and threads; ``srun`` is given them through
``SRUN_CPUS_PER_TASK``.

A resubmission sends only what is not done: a run whose state names a SLURM job and is ``queued``
or ``running`` under a job that ``squeue`` still lists is left alone (every such run when
``squeue`` cannot be asked); a run a local sweep is running (its state names a host and process,
never a SLURM job) is left alone too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from skd.errors import run_command
from skd.sweep.local import LAUNCH_DIR
from skd.sweep.runs import LOG_FILE, PlannedRun, Sweep, SweepError, exit_outcome, mark_state, read_status

__all__ = ["CPUS_PER_GPU", "SlurmOptions", "array_spec", "sbatch_script", "select_for_submission", "write_submission",
           "submit", "task_command", "run_task", "main"]


CPUS_PER_GPU = 8
"""The default ``--cpus-per-task`` per GPU of a node: its training process, loader workers and threads."""


@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int | None = None
    """CPUs per node for the run's processes; None: ``CPUS_PER_GPU`` per GPU of the node."""
    time: str = "24:00:00"
    throttle: int | None = None
    """At most this many tasks of the array at once (``--array=...%N``)."""
    job_name: str = "skd-sweep"

    @property
    def cpus(self) -> int:
        """The ``--cpus-per-task`` the array asks for."""
        return self.cpus_per_task or CPUS_PER_GPU * max(1, self.gpus_per_node)

    @property
    def threads(self) -> int:
        """The default ``OMP_NUM_THREADS`` of a training process: the node's CPUs per GPU."""
        return max(1, self.cpus // max(1, self.gpus_per_node))


def array_spec(indices: list[int], throttle: int | None = None) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``0-2,5,7-8`` (``%N`` appended with a throttle)."""
    if not indices:
        raise SweepError("no run to submit")
    parts, ordered = [], sorted(set(indices))
    start = prev = ordered[0]
    for i in ordered[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{throttle}" if throttle else "")


def sbatch_script(sweep: Sweep, indices: list[int], options: SlurmOptions) -> str:
    """The array job: one task per index of ``sweep.json``, started in this folder (where relative
    paths in the overrides were meant)."""
    root = sweep.root.resolve()
    sbatch = [f"--job-name={options.job_name}", f"--array={array_spec(indices, options.throttle)}",
              f"--nodes={options.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={options.gpus_per_node}"]
    sbatch += [f"--cpus-per-task={options.cpus}", f"--time={options.time}"]
    sbatch += [f"--partition={options.partition}"] if options.partition else []
    sbatch += [f"--account={options.account}"] if options.account else []
    sbatch += ["--signal=B:TERM@180", "--requeue", "--open-mode=append", f"--chdir={Path.cwd()}",
               f"--output={root / 'slurm' / 'logs' / '%x-%A_%a.out'}"]
    return "\n".join([
        "#!/bin/bash",
        f"# skd sweep {root}: one array task per run of sweep.json (task id = run index).",
        "# Each task starts its run with resume=auto. SIGTERM 180 s before the time limit: the task sends it to",
        "# its step's processes (scancel --signal=TERM $SLURM_JOB_ID), skd checkpoints and stops, the task waits",
        "# for srun and requeues itself (scontrol requeue).",
        *[f"#SBATCH {shlex.quote(o)}" for o in sbatch],
        "",
        "set -euo pipefail",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{options.threads}}}",
        f"exec \"${{SKD_PYTHON:-{sys.executable}}}\" -m skd.sweep.slurm {shlex.quote(str(root))}",
        "",
    ])


def _live_tasks() -> set[str] | None:
    """``JOB_TASK`` ids that SLURM still lists (pending or running) for this user; None when
    ``squeue`` cannot be asked."""
    try:
        done = subprocess.run(["squeue", "--noheader", "--array", "--me", "--format=%i"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.split()) if done.returncode == 0 else None


def select_for_submission(sweep: Sweep, runs: list[PlannedRun], retry_failed: bool) -> tuple[list[PlannedRun], list[str]]:
    """The runs to submit, and one note per kind of run left out. ``squeue`` is asked only about
    runs whose state names a SLURM job; a run a local sweep is running is left alone."""
    live: set[str] | None = None
    asked = False
    chosen = []
    left = {"done": 0, "failed (not retried without --retry-failed)": 0, "queued or running in SLURM": 0,
            "running in a local sweep": 0}
    for run in runs:
        status = read_status(run.path(sweep.root))
        if status.status == "done":
            left["done"] += 1
        elif status.status == "failed" and not retry_failed:
            left["failed (not retried without --retry-failed)"] += 1
        elif status.status in ("queued", "running") and status.slurm_job is None:
            left["running in a local sweep"] += 1  # its host and process: squeue knows nothing of it
        elif status.status in ("queued", "running"):
            if not asked:
                live, asked = _live_tasks(), True
            if live is None or status.slurm_job in live:
                left["queued or running in SLURM"] += 1
            else:
                chosen.append(run)  # its job is gone (cancelled, or the node died before a requeue)
        else:
            chosen.append(run)
    notes = [f"{n} {what}" for what, n in left.items() if n]
    if asked and live is None:
        notes.append("squeue could not be asked, so no queued or running run was resubmitted")
    return chosen, notes


def write_submission(sweep: Sweep, runs: list[PlannedRun], options: SlurmOptions) -> Path:
    """Write the array script for ``runs`` into ``DIR/slurm/`` (the next free ``sweep-N.sbatch``)."""
    folder = sweep.root / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.stem.split("-")[-1]) for p in folder.glob("sweep-*.sbatch")
                      if p.stem.split("-")[-1].isdigit()), default=0)
    path = folder / f"sweep-{number}.sbatch"
    path.write_text(sbatch_script(sweep, [r.index for r in runs], options))
    path.chmod(0o755)
    return path


def submit(sweep: Sweep, script: Path, runs: list[PlannedRun]) -> str:
    """``sbatch`` the script; the runs are marked ``queued`` under the array's job id, except
    those whose task has already written its own state (started, or even finished)."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise SweepError(f"cannot run sbatch ({e}): submit from a SLURM login node, or use --dry-run and "
                         f"`sbatch {script}` there") from None
    if done.returncode != 0:
        raise SweepError(f"sbatch {script} failed: {done.stderr.strip() or done.stdout.strip()}")
    job = done.stdout.strip().split(";")[0]
    for run in runs:
        task = f"{job}_{run.index}"
        if read_status(run.path(sweep.root)).slurm_job != task:  # the task's own state is newer
            mark_state(run.path(sweep.root), "queued", slurm_job=task)
    with open(sweep.root / "slurm" / "submissions.jsonl", "a") as f:
        f.write(json.dumps({"time": datetime.now().isoformat(timespec="seconds"), "job": job,
                            "script": script.name, "runs": [r.index for r in runs]}) + "\n")
    return job


# ----------------------------------------------------------------------------- the array task
_PER_NODE = ('exec "$0" -m accelerate.commands.launch --config_file "$SKD_ACCELERATE_CONFIG" '
             '--num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" '
             '--machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" '
             '-m skd train "$@"')
"""What ``srun`` runs on each node; single quotes in the shell: ``SLURM_NODEID`` expands there,
and the ``skd train`` arguments pass as arguments (values with spaces or brackets stay whole)."""


def task_command(run: PlannedRun, root: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command of ``run``'s task and the environment it adds, as ``multinode.sbatch`` does."""
    nodelist = env.get("SLURM_JOB_NODELIST", "")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout.split()
    job = int(env.get("SLURM_JOB_ID", "0"))
    extra = {"GPUS_PER_NODE": env.get("SLURM_GPUS_ON_NODE") or env.get("GPUS_PER_NODE") or "8",
             "MASTER_ADDR": hosts[0] if hosts else socket.gethostname(),
             "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),  # a port per job
             "SKD_ACCELERATE_CONFIG": str(LAUNCH_DIR / "accelerate" / "multinode.yaml")}
    if env.get("SLURM_CPUS_PER_TASK"):  # Slurm >= 22.05: srun does not inherit --cpus-per-task
        extra["SRUN_CPUS_PER_TASK"] = env["SLURM_CPUS_PER_TASK"]
    argv = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "bash", "-c", _PER_NODE,
            env.get("SKD_PYTHON", sys.executable), *run.train_args(root)]
    return argv, extra


def _signal_step(job_id: str | None, signum: int) -> None:
    """Send ``signum`` to every process of the job's steps through SLURM (not to the batch step,
    and not to ``srun``, which would answer SIGTERM by killing the step's tasks)."""
    if not job_id:
        print(f"{signal.Signals(signum).name}: SLURM_JOB_ID is not set, so the run's step cannot be signalled",
              flush=True)
        return
    argv = ["scancel", f"--signal={signal.Signals(signum).name.removeprefix('SIG')}", job_id]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"{shlex.join(argv)} failed: {e}", flush=True)
        return
    if done.returncode != 0:
        print(f"{shlex.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}", flush=True)


def run_task(root: Path, index: int, env: dict[str, str] | None = None) -> int:
    """Run the sweep's run ``index`` as this array task; returns the task's exit status.

    SIGTERM/SIGINT to the task (the batch step) are recorded by the handler and passed on, each
    once, by the loop that waits for ``srun`` (``_signal_step``), so one that arrives while
    ``srun`` starts is passed on as soon as it has started; once ``srun`` has ended the task
    requeues itself. One that arrives before ``srun`` would start requeues the task at once."""
    signals: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: signals.append(signum))
    env = dict(os.environ if env is None else env)
    sweep = Sweep.load(root)
    run = sweep.run(index)
    run_dir = run.path(sweep.root)
    job = f"{env.get('SLURM_ARRAY_JOB_ID', env.get('SLURM_JOB_ID', '?'))}_{index}"
    if read_status(run_dir).status == "done":
        print(f"{run.label}: already done ({run_dir})", flush=True)
        return 0
    run.write_config(sweep.root)
    argv, extra = task_command(run, sweep.root, env)
    code: int | None = None
    if not signals:
        print(f"{run.label} -> {run_dir} (log {run_dir / LOG_FILE}): {shlex.join(argv)}", flush=True)
        with open(run_dir / LOG_FILE, "a") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**env, **extra})
            mark_state(run_dir, "running", host=socket.gethostname(), pid=os.getpid(), slurm_job=job)
            passed = 0
            while code is None:
                while passed < len(signals):
                    passed += 1
                    _signal_step(env.get("SLURM_JOB_ID"), signals[passed - 1])
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = process.wait(timeout=0.2)
    if code is not None and exit_outcome(code, run_dir) == "done":
        mark_state(run_dir, "done", exit_status=0, slurm_job=job)
        return 0
    if signals:  # the time limit, or a preemption's signal: continue in a requeued task
        requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        status = "queued" if requeued.returncode == 0 else "stopped"
        code = 128 + signals[0] if code is None else code
        mark_state(run_dir, status, exit_status=code, slurm_job=job)
        print(f"{run.label}: stopped by {signal.Signals(signals[0]).name} (exit {code}); "
              f"{'requeued' if status == 'queued' else 'requeue failed: ' + requeued.stderr.strip()}", flush=True)
        return code
    mark_state(run_dir, exit_outcome(code, run_dir), exit_status=code, slurm_job=job)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m skd.sweep.slurm DIR [INDEX]``: the array task (INDEX defaults to
    ``SLURM_ARRAY_TASK_ID``)."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m skd.sweep.slurm SWEEP_DIR [INDEX]", file=sys.stderr)
        return 2
    index = args[1] if len(args) == 2 else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None or not index.isdigit():
        print("skd.sweep.slurm: no run index (SLURM_ARRAY_TASK_ID is not set)", file=sys.stderr)
        return 2
    return run_command("skd.sweep.slurm", lambda: run_task(Path(args[0]), int(index)))


if __name__ == "__main__":
    sys.exit(main())
