"""The local executor: a sweep's runs on this machine, one after another or ``parallel`` at once,
each on its own GPUs (``CUDA_VISIBLE_DEVICES``; several GPUs per run through ``accelerate
launch``), always with ``resume=auto`` into its own folder.

- Finished runs are skipped, stopped ones resumed, failed ones retried only when asked; runs
  another executor is running (or SLURM has queued) are left alone.
- Each run is its own process group: SIGINT/SIGTERM to the sweep are passed on once to every
  running run, which checkpoints and stops (then the sweep exits with 128 + the signal); a run
  ended by a signal is ``stopped`` (resumed next time), one that exits 1 or 2 is ``failed``. The
  handler only records a signal; the sweep's loop passes it on right after any start, so a signal
  that arrives while a run is being started reaches that run too.
- One local sweep per folder at a time (a lock file); the runs' output goes to their
  ``sweep.log``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen, STDOUT
from typing import Callable, Iterator, TextIO

from skd.sweep.runs import (LOG_FILE, PlannedRun, Sweep, SweepError, exit_meaning, exit_outcome, mark_state,
                            read_status)

__all__ = ["LAUNCH_DIR", "visible_gpus", "train_command", "run_local"]

LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"
"""The accelerate and SLURM files of the source checkout."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries, else every device."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def train_command(args: list[str], processes: int, port: int) -> list[str]:
    """``skd train ARGS`` in one process, or ``accelerate launch`` with ``processes`` processes
    (one node; the repository's accelerate config, so no user default config leaks in)."""
    if processes <= 1:
        return [sys.executable, "-m", "skd", "train", *args]
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(LAUNCH_DIR / "accelerate" / "1node_8gpu.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(port), "-m", "skd", "train", *args]


@dataclass
class _Active:
    run: PlannedRun
    process: Popen
    log: TextIO
    started: float
    signalled: int = 0
    """How many of the sweep's signals this run has been sent."""


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "sweep.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another local sweep is running in {root}; wait for it, or stop it") from None
        yield


@contextlib.contextmanager
def _catch_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``on_signal``; the previous handlers come back afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: on_signal(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _slots(parallel: int, gpus_per_run: int | None) -> list[list[str]]:
    """The GPUs of each of the ``parallel`` slots (empty lists on a machine without GPUs)."""
    gpus = visible_gpus()
    if not gpus:
        if gpus_per_run:
            raise SweepError(f"--gpus-per-run {gpus_per_run}: this machine has no GPU")
        return [[] for _ in range(parallel)]
    per_run = gpus_per_run or max(1, len(gpus) // parallel)
    if per_run * parallel > len(gpus):
        raise SweepError(f"--parallel {parallel} x --gpus-per-run {per_run} needs {per_run * parallel} GPUs; "
                         f"{len(gpus)} are visible ({','.join(gpus)})")
    return [gpus[i * per_run:(i + 1) * per_run] for i in range(parallel)]


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def run_local(sweep: Sweep, runs: list[PlannedRun], *, parallel: int = 1, gpus_per_run: int | None = None,
              retry_failed: bool = False, echo: Callable[[str], None] = print) -> int:
    """Run ``runs`` of ``sweep``; returns the sweep's exit status: 0 when no run failed or stopped
    (every run is done, except those running or queued elsewhere, which are left alone), 1 when
    one failed or stopped (or failed before and was not retried), 128 + signal when the sweep
    itself was interrupted."""
    if parallel < 1:
        raise SweepError(f"--parallel {parallel}: must be at least 1")
    to_run, skipped = [], {"done": 0, "failed": 0, "elsewhere": 0}
    for run in runs:
        status = read_status(run.path(sweep.root)).status
        if status == "done":
            skipped["done"] += 1
        elif status == "failed" and not retry_failed:
            skipped["failed"] += 1
        elif status in ("running", "queued"):
            skipped["elsewhere"] += 1
        else:
            to_run.append(run)
    echo(f"{len(runs)} runs: {len(to_run)} to run, {skipped['done']} done, {skipped['failed']} failed before "
         f"(not retried without --retry-failed), {skipped['elsewhere']} running or queued elsewhere")
    slots = _slots(parallel, gpus_per_run)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // parallel))
    active: dict[int, _Active] = {}
    stop: list[int] = []
    outcome = {"done": 0, "failed": 0, "stopped": 0}

    def pass_signals_on() -> None:
        """Send every run the sweep's signals it has not had yet: each run is its own process
        group, so it hears each signal once."""
        for a in active.values():
            while a.signalled < len(stop):
                a.signalled += 1
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(a.process.pid, stop[a.signalled - 1])

    def start(run: PlannedRun, slot: int) -> None:
        run_dir = run.path(sweep.root)
        run.write_config(sweep.root)
        gpus = slots[slot]
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        log = open(run_dir / LOG_FILE, "a")
        process = Popen(train_command(run.train_args(sweep.root), len(gpus), 29500 + os.getpid() % 1000 + slot),
                        stdout=log, stderr=STDOUT, env=env, start_new_session=True)
        mark_state(run_dir, "running", host=socket.gethostname(), pid=process.pid, gpus=",".join(gpus))
        active[slot] = _Active(run, process, log, time.time())
        where = f" on GPUs {','.join(gpus)}" if gpus else ""
        echo(f"started  {run.label}{where}: {run_dir / LOG_FILE}")

    def finish(a: _Active, code: int) -> None:
        a.log.close()
        run_dir = a.run.path(sweep.root)
        minutes = (time.time() - a.started) / 60
        status = exit_outcome(code, run_dir)
        mark_state(run_dir, status, exit_status=code)
        outcome[status] += 1
        if status == "done":
            top1 = read_status(run_dir).top1
            echo(f"done     {a.run.label} in {minutes:.1f} min" + (f": top-1 {top1:.2f}" if top1 is not None else ""))
        elif status == "stopped":
            echo(f"stopped  {a.run.label} ({exit_meaning(code)}); the next sweep resumes it")
        else:
            echo(f"FAILED   {a.run.label} ({exit_meaning(code)}): {_last_line(run_dir / LOG_FILE)}")

    with _exclusive(sweep.root), _catch_signals(stop.append):
        queue = list(to_run)
        while queue or active:
            for slot in range(len(slots)):
                if queue and slot not in active and not stop:
                    start(queue.pop(0), slot)
            pass_signals_on()  # also to a run whose start a signal interrupted
            for slot, a in list(active.items()):
                code = a.process.poll()
                if code is not None:
                    del active[slot]
                    finish(a, code)
            if stop and not active:
                break
            time.sleep(0.2)
    echo(f"sweep {sweep.root}: {skipped['done'] + outcome['done']} of {len(runs)} runs done, {outcome['stopped']} "
         f"stopped, {skipped['failed'] + outcome['failed']} failed" + (f", {len(queue)} not started" if stop and queue else ""))
    if stop:
        return 128 + stop[0]
    return 1 if outcome["failed"] or outcome["stopped"] or skipped["failed"] else 0
