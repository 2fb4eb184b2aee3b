"""Planning a sweep: tables and presets × seeds → one resolved config per run, merged into
``DIR/sweep.json``.

- A target is a table id (its cells' presets, shared cells included), a preset name or a shell
  pattern of preset names (``cifar100_repdistiller/teacher_*``), or a preset file.
- A seed or preset named twice (``--seeds 0 0``, a table and one of its presets) is one run;
  order is kept (first appearance first).
- Every run gets ``seed=K`` and the same ``key=value`` overrides; ``--data NAME=...`` sets
  ``data.train``/``data.val`` for the presets whose ``reference.dataset`` is NAME, and
  ``--teacher MODEL=FILE`` the ``method.teacher_checkpoint`` of every run whose teacher is MODEL.
- Run folders are ``DIR/<preset>/seed<k>``. A folder that already holds a run trained with a
  config other than the planned one is refused (``SweepError`` naming the folder and the keys):
  it would otherwise be skipped as done, or resumed into, and mixed into the table.
- ``sweep.json`` only grows: runs keep their index (the SLURM array task id), new runs are
  appended, and a run that has not started yet takes the new plan's config.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from skd.config import ConfigError, config_to_dict, load_config, load_yaml
from skd.errors import one_line
from skd.methods import get_method_class
from skd.methods.teacher import TeacherMethod
from skd.presets import Preset, find_presets
from skd.resume import config_differences
from skd.sweep.runs import PlannedRun, Sweep, SweepError
from skd.tables import TABLES_DIR, load_table

__all__ = ["SweepRequest", "resolve_targets", "data_overrides", "plan_sweep"]

_NOT_OVERRIDES = ("seed", "output_dir", "resume")
"""Set per run by the sweep itself."""


@dataclass
class SweepRequest:
    targets: list[str]
    seeds: list[int]
    overrides: list[str]
    data: dict[str, str]
    """Dataset name → ``ROOT`` (``ROOT/train`` and ``ROOT/val`` or ``ROOT/test``) or ``TRAIN,VAL``."""
    teachers: dict[str, str]
    """Teacher timm model name → checkpoint file."""


def resolve_targets(targets: list[str]) -> list[Preset]:
    """The presets of ``targets`` (tables, preset names, patterns, files), first appearance first."""
    found: dict[str, Preset] = {}
    for target in targets:
        if (TABLES_DIR / f"{target}.yaml").is_file():
            presets = [c.preset for c in load_table(target).cells() if c.preset is not None]
        else:
            presets = find_presets(target)
        for preset in presets:
            found.setdefault(preset.name, preset)
    if not found:
        raise SweepError("nothing to run: name a table (`skd sweep --list`) or presets (`skd presets`)")
    return list(found.values())


def data_overrides(dataset: str | None, data: dict[str, str], preset: str) -> list[str]:
    """``data.train=...`` and ``data.val=...`` for a preset of ``dataset`` from ``--data``."""
    if dataset is None or dataset not in data:
        return []
    spec = data[dataset]
    if "," in spec:  # absolute: a SLURM task or a later sweep may start in another folder
        train, val = (str(Path(s.strip()).resolve()) for s in spec.split(",", 1))
    else:
        root = Path(spec).resolve()
        splits = [s for s in ("val", "test") if (root / s).is_dir()]
        if len(splits) != 1:
            found = "both val/ and test/" if splits else "neither val/ nor test/"
            raise SweepError(f"--data {dataset}={spec} (for {preset}): {root} has {found}; name both folders "
                             f"as --data {dataset}=TRAIN_DIR,VAL_DIR")
        train, val = str(root / "train"), str(root / splits[0])
    return [f"data.train={train}", f"data.val={val}"]


def _teacher_needed(cfg: Any) -> str | None:
    """The timm name of the teacher a run needs but has no checkpoint for, else None."""
    method = get_method_class(cfg.method.name)
    if not (issubclass(method, TeacherMethod) and method.uses_teacher(cfg.method)):
        return None
    return None if cfg.method.teacher_checkpoint else (cfg.method.teacher or cfg.model.name)


def _plan_run(preset: Preset, seed: int, request: SweepRequest) -> tuple[PlannedRun, Any]:
    overrides = [*data_overrides(preset.dataset, request.data, preset.name), *request.overrides, f"seed={seed}"]
    cfg = load_config(preset.path, overrides)
    teacher = _teacher_needed(cfg)
    if teacher in request.teachers:
        checkpoint = Path(request.teachers[teacher]).resolve()
        overrides.insert(len(overrides) - 1, f"method.teacher_checkpoint={checkpoint}")
        cfg = load_config(preset.path, overrides)
    config = config_to_dict(cfg)
    config["output_dir"], config["resume"] = "", ""
    run = PlannedRun(-1, preset.name, seed, f"{preset.name}/seed{seed}", preset.table_id, preset.row,
                     preset.column, overrides, config)
    return run, cfg


def _trained_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_yaml(path)
    except ConfigError as e:  # empty, not YAML, not a mapping: never a run of this plan
        raise SweepError(f"{one_line(e)}; move that run folder away") from None


def plan_sweep(root: str | Path, request: SweepRequest, *, command: list[str] | None = None,
               complete: bool = True) -> tuple[Sweep, list[PlannedRun], list[str]]:
    """Merge the runs ``request`` asks for into the sweep at ``root`` (not yet saved); returns the
    sweep, those runs in plan order, and what they still lack (data folders, teacher checkpoints).
    With ``complete`` (anything but a dry run) a lack is a ``SweepError``."""
    if not request.seeds:
        raise SweepError("--seeds needs at least one seed")
    bad = [o for o in request.overrides if o.partition("=")[0] in _NOT_OVERRIDES]
    if bad:
        raise SweepError(f"{', '.join(bad)}: the sweep sets seed (--seeds), output_dir (--out) and resume "
                         f"itself")
    seeds = list(dict.fromkeys(request.seeds))
    sweep = Sweep.load(root, missing_ok=True)
    known = {r.run_dir: r for r in sweep.runs}
    selected: dict[str, PlannedRun] = {}  # run folder -> run: each run once, in plan order
    mismatched: list[str] = []
    no_data: dict[str, list[str]] = {}  # dataset -> runs
    no_teacher: dict[str, list[str]] = {}  # teacher model -> runs
    for preset in resolve_targets(request.targets):
        for seed in seeds:
            run, cfg = _plan_run(preset, seed, request)
            if not (cfg.data.train and cfg.data.val):
                no_data.setdefault(preset.dataset or f"{preset.name} (no reference.dataset)", []).append(run.label)
            teacher = _teacher_needed(cfg)
            if teacher:
                no_teacher.setdefault(teacher, []).append(run.label)
            trained = _trained_config(run.path(sweep.root))
            differences = config_differences(trained, run.config) if trained is not None else []
            if differences:
                keys = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differences[:4])
                mismatched.append(f"{run.path(sweep.root)} ({keys}{'; ...' if len(differences) > 4 else ''})")
            old = known.get(run.run_dir)
            if old is None:
                run.index = len(sweep.runs)
                sweep.runs.append(run)
                known[run.run_dir] = run
            else:  # keep its index; a run that has not trained yet takes the new config
                if trained is None:
                    old.config, old.overrides = run.config, run.overrides
                run = old
            selected.setdefault(run.run_dir, run)
    if mismatched:
        raise SweepError(f"{len(mismatched)} run folder(s) hold runs trained with another config than this "
                         f"sweep plans, which would mix two experiments in one table: {mismatched[0]}"
                         f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}. "
                         f"Use another --out, or move those folders away")
    lacking = []
    if no_data:
        count = sum(len(r) for r in no_data.values())
        lacking.append(f"{count} runs have no data.train/data.val: pass --data NAME=DIR for {', '.join(no_data)} "
                       f"(DIR holding the train/ and val/ or test/ shards), or data.train=DIR data.val=DIR")
    if no_teacher:
        names = ", ".join(f"{t} ({len(r)} runs)" for t, r in no_teacher.items())
        lacking.append(f"runs need a teacher checkpoint: {names}. Pass --teacher MODEL=FILE for each (train the "
                       f"teachers first, e.g. the table's Teacher row; their model.safetensors will do)")
    if lacking and complete:
        raise SweepError("; ".join(lacking))
    if command is not None:
        sweep.invocations.append({"time": datetime.now().isoformat(timespec="seconds"), "argv": command})
    return sweep, list(selected.values()), lacking
