"""A sweep on disk: its plan ``DIR/sweep.json`` and the state of every run, read from the run
folders alone (so ``skd sweep --status`` works anywhere the folder is visible, while a SLURM
array runs).

Each planned run has its own folder ``DIR/<preset>/seed<k>`` holding, besides what ``skd train``
writes (``config.yaml``, ``history.jsonl``, checkpoints, ``metrics.json``, ...):

- ``sweep_config.yaml``: the resolved config the run trains with (``skd train --config``);
- ``sweep_state.json``: what the executor last knew (``queued``, ``running``, ``stopped``,
  ``failed``, ``done``), where (host and process id, or SLURM job), its exit status and attempts;
- ``sweep.log``: the run's console output, appended by every attempt.

A run's status: ``done`` once ``metrics.json`` exists; else the state file's, except that a
``running`` run whose process is gone from this host counts as ``stopped``; ``pending`` with no
state at all. This module reads and writes JSON and YAML only (no torch), so the status and the
SLURM task start quickly.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from skd.columns import align_columns
from skd.errors import MissingFileError, SkdError

__all__ = ["SWEEP_FILE", "STATE_FILE", "CONFIG_FILE", "LOG_FILE", "SweepError", "PlannedRun", "Sweep",
           "RunStatus", "read_status", "mark_state", "format_status", "exit_outcome", "exit_meaning"]

SWEEP_FILE = "sweep.json"
STATE_FILE = "sweep_state.json"
CONFIG_FILE = "sweep_config.yaml"
LOG_FILE = "sweep.log"


class SweepError(SkdError, ValueError):
    """A sweep that cannot be planned or run as asked: the message says what and how to fix it."""


@dataclass
class PlannedRun:
    index: int
    """Position in ``sweep.json``: the SLURM array task id. Never changes once written."""
    preset: str
    seed: int
    run_dir: str
    """Relative to the sweep folder: ``<preset>/seed<k>``."""
    table_id: str | None
    row: str | None
    column: str | None
    overrides: list[str]
    """The ``key=value`` overrides applied to the preset (data, teacher, the command line's, seed)."""
    config: dict[str, Any]
    """The resolved config, without ``output_dir`` and ``resume`` (the executor adds them)."""

    def path(self, root: Path) -> Path:
        return root / self.run_dir

    @property
    def epochs(self) -> int:
        return int(self.config["epochs"])

    @property
    def label(self) -> str:
        return f"{self.preset} seed {self.seed}"

    def write_config(self, root: Path) -> Path:
        """Write the run's resolved config into its folder; returns the file."""
        path = self.path(root) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True))
        os.replace(tmp, path)
        return path

    def train_args(self, root: Path) -> list[str]:
        """The ``skd train`` arguments: the resolved config, the run folder, ``resume=auto``."""
        path = self.path(root).resolve()
        return ["--config", str(path / CONFIG_FILE), f"output_dir={path}", "resume=auto"]


@dataclass
class Sweep:
    root: Path
    runs: list[PlannedRun] = field(default_factory=list)
    invocations: list[dict[str, Any]] = field(default_factory=list)
    """Every command that planned into this folder, with its time."""

    @classmethod
    def load(cls, root: str | Path, missing_ok: bool = False) -> Sweep:
        root = Path(root)
        path = root / SWEEP_FILE
        if not path.is_file():
            if missing_ok:
                return cls(root)
            raise MissingFileError(f"{root} is not a sweep folder: {path} does not exist")
        try:
            raw = json.loads(path.read_text())
            runs = [PlannedRun(**r) for r in raw["runs"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SweepError(f"{path} is damaged ({type(e).__name__}: {e})") from None
        return cls(root, runs, raw.get("invocations", []))

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / SWEEP_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "invocations": self.invocations,
                                   "runs": [asdict(r) for r in self.runs]}, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    def run(self, index: int) -> PlannedRun:
        if not 0 <= index < len(self.runs):
            raise SweepError(f"{self.root / SWEEP_FILE} has no run {index} (it plans {len(self.runs)})")
        return self.runs[index]


# ------------------------------------------------------------------------------------- state
def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut off by a kill while it was written
        return {}
    return value if isinstance(value, dict) else {}


def mark_state(run_dir: Path, status: str, **info: Any) -> None:
    """Record the executor's view of a run (atomically: a reader sees the old or the new file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_json(run_dir / STATE_FILE)
    state = {"status": status, "time": datetime.now().isoformat(timespec="seconds"),
             "attempts": previous.get("attempts", 0) + (status == "running"), **info}
    path = run_dir / STATE_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, path)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunStatus:
    status: str
    """``pending``, ``queued``, ``running``, ``stopped``, ``failed`` or ``done``."""
    epochs_done: int
    top1: float | None
    """Validation top-1 of the last finished epoch."""
    exit_status: int | None
    where: str
    updated: float | None
    """Newest modification time among the run's files (seconds since the epoch)."""
    slurm_job: str | None = None
    """The SLURM array task (``JOB_TASK``) the state was written for; None for a local run."""


def _last_epoch(run_dir: Path) -> dict[str, Any]:
    try:
        lines = (run_dir / "history.jsonl").read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):  # the last line may be cut off by a kill
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _newest_change(run_dir: Path) -> float | None:
    times = []
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # renamed or removed meanwhile (a checkpoint or state file being replaced)
            continue
    return max(times, default=None)


def read_status(run_dir: Path) -> RunStatus:
    """What the run folder says about the run."""
    state = _read_json(run_dir / STATE_FILE)
    last = _last_epoch(run_dir)
    if (run_dir / "metrics.json").is_file():
        status = "done"
    elif not state:
        status = "stopped" if (run_dir / "config.yaml").is_file() else "pending"
    else:
        status = state.get("status", "pending")
        if status == "done":  # the state was written, metrics.json never was
            status = "stopped"
        if status == "running" and state.get("host") == socket.gethostname() and not _alive(state.get("pid")):
            status = "stopped"
    where = state.get("slurm_job") or (f"{state['host']} pid {state['pid']}" if "host" in state else "")
    return RunStatus(status, int(last["epoch"]) + 1 if "epoch" in last else 0, last.get("top1"),
                     state.get("exit_status"), where, _newest_change(run_dir), state.get("slurm_job"))


def exit_outcome(code: int, run_dir: Path) -> str:
    """What an ended ``skd train`` of ``run_dir`` left: ``done`` (exit 0 and ``metrics.json``),
    ``stopped`` (ended by a signal: a stop checkpoint, or a kill; resumable) or ``failed``."""
    if code == 0 and (run_dir / "metrics.json").is_file():
        return "done"
    return "stopped" if code < 0 or code > 128 else "failed"


def exit_meaning(code: int | None) -> str:
    """An exit status in words: skd train's conventions, and signals."""
    if code is None:
        return ""
    if code < 0 or code > 128:
        number = -code if code < 0 else code - 128
        try:
            return f"signal {signal.Signals(number).name}"
        except ValueError:
            return f"exit {code}"
    return {1: "exit 1: error, see sweep.log", 2: "exit 2: bad input, see sweep.log"}.get(code, f"exit {code}")


def _age(updated: float | None) -> str:
    if updated is None:
        return ""
    seconds = max(0, time.time() - updated)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def format_status(sweep: Sweep, runs: list[PlannedRun] | None = None) -> str:
    """A table of every run (or of ``runs``): cell, seed, status, epoch, last top-1, last change."""
    runs = sweep.runs if runs is None else runs
    head = ("run", "seed", "cell", "status", "epoch", "top-1", "updated", "where")
    rows, counts = [], {}
    for run in runs:
        s = read_status(run.path(sweep.root))
        counts[s.status] = counts.get(s.status, 0) + 1
        cell = f"{run.row} / {run.column}" if run.row else "-"
        status = s.status + (f" ({exit_meaning(s.exit_status)})" if s.status in ("failed", "stopped")
                             and s.exit_status is not None else "")
        rows.append((run.preset, str(run.seed), cell, status, f"{s.epochs_done}/{run.epochs}",
                     "" if s.top1 is None else f"{s.top1:.2f}", _age(s.updated), s.where))
    order = ("done", "running", "queued", "stopped", "failed", "pending")
    summary = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
    return "\n".join(align_columns(head, rows) + [f"{len(runs)} runs: {summary or 'none'}"])
