"""Where a run starts: its run directory and the checkpoint it resumes, checked before anything
is written.

- A new run (no ``resume``) into a directory that already holds checkpoints is refused: pruning
  and ``resume=auto`` would otherwise mix two experiments.
- ``resume=auto`` takes the newest checkpoint that loads; a damaged newer one is reported and
  moved into ``checkpoints/damaged/``, so that neither pruning nor the next resume trips on it.
- The resumed checkpoint's config is compared with the new one: any difference in what defines
  the experiment (model, method, data, seed, schedule, ...) stops the resume with every
  difference listed, unless ``resume_allow_changes`` names it. The number of processes, loader
  workers and the shuffle window may change: the loader continues the epoch from the position
  it reached (``skd.data.epoch_plan``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from skd.checkpoint import (BEST_NAME, CHECKPOINT_DIR, LAST_GOOD_NAME, SUPERSEDED_DIR, checkpoint_step, keep_as,
                            list_checkpoints, load_checkpoint, read_field, read_run_id, set_aside)
from skd.config import TrainConfig, config_to_dict, flat_fields, in_sections
from skd.config_gates import applies
from skd.errors import CheckpointError, CheckpointUnreadable, ConfigError

__all__ = ["check_output_dir", "select_checkpoint", "check_resume_config", "config_differences",
           "set_aside_newer", "OPERATIONAL_KEYS"]

_log = logging.getLogger("skd.resume")

OPERATIONAL_KEYS = ("output_dir", "resume", "resume_allow_changes", "log_every", "log_with",
                    "checkpoint_every", "keep_checkpoints", "data.eval_batch_size", "data.num_workers",
                    "data.shuffle_buffer", "save_probs", "reference", "divergence_factor")
"""Config keys that never have to match the checkpoint: where and how often a run reports, and
how the loader reads (a mid-epoch change of the shuffle window applies from the next epoch)."""


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def check_output_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot be created or written (``ConfigError`` naming it)."""
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise ConfigError(f"output_dir {run_dir}: {existing} is a file, not a directory")
    if existing == run_dir and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {run_dir}: {existing} is not writable")
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.exists() and not checkpoints.is_dir():
        raise ConfigError(f"output_dir {run_dir}: {checkpoints} is a file, not a directory")


def select_checkpoint(run_dir: Path, resume: str) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume and its loaded state; ``(None, None)`` for a fresh start.

    ``resume`` empty: a fresh run, refused if ``run_dir`` already holds checkpoints. ``auto``:
    the newest checkpoint in ``run_dir`` that loads; newer ones that do not are moved into
    ``checkpoints/damaged/`` (with their per-rank parts) and named in a warning. None at all is a
    fresh start; none that loads is an error, and nothing is moved. Otherwise a checkpoint path,
    which must load. Runs on the main process only: it alone moves files.
    """
    found = list_checkpoints(run_dir)
    if not resume:
        if found:
            raise ConfigError(f"output_dir {run_dir} already holds checkpoints of a run ({found[-1].name}, "
                              f"...); continue it with resume=auto, or choose another output_dir")
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"config key 'resume' = {resume!r}: no such checkpoint file")
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise ConfigError(f"config key 'resume' = {resume!r}: {e}") from None
        others = [p for p in found if read_run_id(p) != state.get("run_id")]
        if others:  # its saves would replace files of the run that owns run_dir
            raise ConfigError(f"output_dir {run_dir} holds checkpoints of another run ({others[-1].name}) than "
                              f"resume={resume}; continue that one with resume=auto, or choose another output_dir")
        return path, state
    damaged: list[tuple[Path, CheckpointError]] = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointUnreadable as e:  # not known to be damaged: neither moved nor skipped
            raise ConfigError(f"resume=auto: {e}; resolve that, or resume from another checkpoint with "
                              f"resume=PATH") from None
        except CheckpointError as e:
            damaged.append((path, e))
            continue
        for bad, error in damaged:
            _log.warning("resume=auto: %s; moved it to %s and resuming from %s", error, set_aside(bad), path.name)
        return path, state
    if found:
        raise ConfigError(f"resume=auto: none of the {len(found)} checkpoints in {run_dir / CHECKPOINT_DIR} "
                          f"loads; the newest: {damaged[0][1]}")
    return None, None


def set_aside_newer(run_dir: Path, state: dict[str, Any]) -> list[Path]:
    """A run gone back to an older checkpoint of its own (``resume=PATH``, e.g. ``last_good.pt``
    after a divergence): move its newer checkpoints into ``checkpoints/superseded/``, so neither
    ``resume=auto`` nor pruning takes them for the run's newest, and so do ``best.pt`` and
    ``last_good.pt`` when they are newer. ``best.pt`` then goes back to the checkpoint of the
    resumed run's best epoch; if that one was pruned, ``state["best"]`` is cleared (best-epoch
    tracking starts again) rather than naming weights the run no longer has. Main process, after
    ``select_checkpoint`` (every checkpoint in ``run_dir`` is this run's); returns where they went."""
    folder = run_dir / CHECKPOINT_DIR
    newer = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > state["step"]]
    newer += [folder / name for name in (BEST_NAME, LAST_GOOD_NAME)
              if (folder / name).is_file() and (read_field(folder / name, "step") or 0) > state["step"]]
    moved = [set_aside(p, SUPERSEDED_DIR) for p in newer]
    if moved:
        _log.warning("resuming from step %d: moved the run's %d newer checkpoints (%s) to %s", state["step"],
                     len(moved), ", ".join(p.name for p in moved), moved[0].parent)
    if folder / BEST_NAME in newer and state.get("best") is not None:
        # The resumed state's best epoch ended with a checkpoint whose loader starts the next epoch.
        want = {"epoch": state["best"]["epoch"] + 1, "batches": 0}
        found = [p for p in list_checkpoints(run_dir) if read_field(p, "loader") == want]
        if found:
            keep_as(found[-1], BEST_NAME)
        else:
            _log.warning("the checkpoint of the best epoch so far (epoch %d) was pruned: the best epoch is "
                         "chosen again from the epochs trained from here", state["best"]["epoch"])
            state["best"] = None
    return moved


def config_differences(old: dict[str, Any], new: dict[str, Any],
                       allowed: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every key in which the config dicts ``old`` and
    ``new`` define different experiments: ``OPERATIONAL_KEYS`` and ``allowed`` (keys or sections)
    may differ, and so may a key that applies to neither config (``skd.config_gates``: e.g.
    ``optim.momentum`` of two AdamW runs). A key on one side only is a difference inside ``method``
    (another method's fields); elsewhere it is a config key this version added or dropped since
    ``old`` was written."""
    old, new = flat_fields(old), flat_fields(new)
    keys = sorted((old.keys() & new.keys()) | {k for k in old.keys() ^ new.keys() if k.startswith("method.")})
    return [(key, old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in keys
            if old.get(key, _ABSENT) != new.get(key, _ABSENT) and not in_sections(key, OPERATIONAL_KEYS + allowed)
            and (applies(key, old) or applies(key, new))]


def check_resume_config(state: dict[str, Any], cfg: TrainConfig) -> None:
    """Stop (``ConfigError``) if ``cfg`` differs from the checkpoint's config in a way the resume
    cannot honour; the message lists every difference."""
    changed = config_differences(state["config"], config_to_dict(cfg), tuple(cfg.resume_allow_changes))
    if changed:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
        raise ConfigError(f"resume: the config differs from the checkpoint's in {lines}. Resume with the "
                          f"checkpoint's values, or list the keys you mean to change in "
                          f"resume_allow_changes (e.g. resume_allow_changes=[{changed[0][0]}])")
