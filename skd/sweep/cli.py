"""``skd sweep``: plan and run a paper's table (or any presets) × seeds, on this machine or as a
SLURM job array; ``--status`` shows every run, ``--list`` every table."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from skd.columns import align_columns
from skd.errors import run_command
from skd.sweep.runs import Sweep, SweepError, format_status

__all__ = ["main", "format_tables"]

_EPILOG = """examples:
  skd sweep --list
  skd sweep demo --seeds 0 1 --out runs/demo-table data.num_workers=0
  skd sweep pskd-cifar100 --seeds 0 1 2 --data cifar100=/shards/cifar100 --executor slurm \\
      --partition gpu --gpus-per-node 1 --throttle 20
  skd sweep --status runs/demo-table
  skd report runs/demo-table --paper

Running the same command again skips finished runs and resumes stopped ones (failed ones with
--retry-failed). See docs/tables.md."""


def format_tables() -> str:
    """Every table: id, size, cells with a preset (their own or shared), cells without, title."""
    from skd.presets import list_presets
    from skd.tables import list_tables

    head = ("table", "cells", "presets", "missing", "title")
    rows, total = [], [0, 0]
    for table in list_tables():
        cells = table.cells()
        covered = sum(c.preset is not None for c in cells)
        total[0], total[1] = total[0] + len(cells), total[1] + covered
        rows.append((table.table_id, f"{len(table.rows)}x{len(table.columns)}={len(cells)}", str(covered),
                     str(len(cells) - covered), table.title))
    return "\n".join(align_columns(head, rows) + [f"{len(rows)} tables, {total[0]} cells, {total[1]} with a preset; "
                              f"{len(list_presets())} presets (`skd presets --table TABLE` lists them)"])


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SweepError(f"{option} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _default_out(targets: list[str]) -> Path:
    return Path("sweeps") / "+".join(re.sub(r"[^A-Za-z0-9._-]+", "_", t.removesuffix(".yaml")) for t in targets)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skd sweep", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        usage="skd sweep TABLE|PRESET... [--seeds S ...] [--out DIR] [key=value ...] [options]\n"
              "       skd sweep --status DIR\n       skd sweep --list",
        description="One run per preset x seed of a paper's table (or of the presets named), planned into "
                    "DIR/sweep.json and run locally or as one SLURM job array; every run trains with "
                    "resume=auto in DIR/<preset>/seed<k>.")
    parser.add_argument("items", nargs="*", metavar="TABLE|PRESET|key=value",
                        help="table ids (`skd sweep --list`), preset names or patterns (`skd presets`) or "
                             "files, and key=value overrides applied to every run")
    parser.add_argument("--list", action="store_true", help="list the tables and how many cells have presets")
    parser.add_argument("--status", metavar="DIR", help="show every run of the sweep in DIR and exit")
    parser.add_argument("--seeds", nargs="+", default=["0"], metavar="S", help="seeds (default: 0)")
    parser.add_argument("--out", metavar="DIR", help="the sweep folder (default: sweeps/<targets>)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=DIR",
                        help="shards of a dataset for the presets whose reference.dataset is NAME: DIR holding "
                             "train/ and val/ or test/, or TRAIN_DIR,VAL_DIR (repeat for several datasets)")
    parser.add_argument("--teacher", action="append", default=[], metavar="MODEL=FILE",
                        help="teacher checkpoint for every run whose teacher is the timm model MODEL")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again (they resume)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the plan (and the SLURM script) without running or submitting")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    local = parser.add_argument_group("local executor")
    local.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once (default 1)")
    local.add_argument("--gpus-per-run", type=int, metavar="G",
                       help="GPUs per run (default: the visible GPUs divided among the parallel runs)")
    slurm = parser.add_argument_group("SLURM executor (other sbatch options: its SBATCH_* variables)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1)")
    slurm.add_argument("--cpus-per-task", type=int, metavar="C",
                       help="CPUs per node for the run's processes, their loader workers and threads "
                            "(default: 8 per GPU of a node)")
    slurm.add_argument("--time", default="24:00:00", help="time limit per task; a task that reaches it "
                       "checkpoints and is requeued (default 24:00:00)")
    slurm.add_argument("--throttle", type=int, metavar="N", help="at most N tasks at once (--array=...%%N)")
    slurm.add_argument("--job-name", default="skd-sweep")
    return parser


def _sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from skd.sweep.plan import SweepRequest, plan_sweep

    # --seeds takes every word after it: the integers are seeds, the rest targets and overrides.
    # A seed given twice is one run.
    seeds = list(dict.fromkeys(int(w) for w in args.seeds if w.isdigit()))
    items = args.items + [w for w in args.seeds if not w.isdigit()]
    targets = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if not targets:
        raise SweepError("name a table or presets to sweep (`skd sweep --list`, `skd presets`)")
    out = Path(args.out) if args.out else _default_out(targets)
    request = SweepRequest(targets, seeds, overrides, _pairs(args.data, "--data"),
                           _pairs(args.teacher, "--teacher"))
    sweep, runs, lacking = plan_sweep(out, request, command=["skd", "sweep", *argv], complete=not args.dry_run)
    sweep.save()
    print(f"plan: {len(runs)} runs ({len({r.preset for r in runs})} presets x {len(seeds)} seeds) "
          f"in {out / 'sweep.json'}")
    for lack in lacking:  # a dry run plans them anyway; a real one refuses (plan_sweep)
        print(f"warning: {lack}")
    if args.executor == "local":
        if args.dry_run:
            print(format_status(sweep, runs))
            return 0
        from skd.sweep.local import run_local

        code = run_local(sweep, runs, parallel=args.parallel, gpus_per_run=args.gpus_per_run,
                         retry_failed=args.retry_failed)
        print(f"status: skd sweep --status {out}; compare with the paper: skd report {out} --paper")
        return code
    from skd.sweep.slurm import SlurmOptions, select_for_submission, submit, write_submission

    chosen, notes = select_for_submission(sweep, runs, args.retry_failed)
    if notes:
        print("not submitted: " + ", ".join(notes))
    if not chosen:
        print("nothing to submit")
        return 0
    options = SlurmOptions(args.partition, args.account, args.nodes, args.gpus_per_node, args.cpus_per_task,
                           args.time, args.throttle, args.job_name)
    script = write_submission(sweep, chosen, options)
    if args.dry_run:
        print(f"wrote {script}: a job array of {len(chosen)} tasks; submit it with `sbatch {script}`")
        return 0
    job = submit(sweep, script, chosen)
    print(f"submitted job array {job} ({script}): {len(chosen)} tasks; follow them with "
          f"`skd sweep --status {out}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_intermixed_args(argv)

    def body() -> int:
        if args.list:
            print(format_tables())
            return 0
        if args.status:
            print(format_status(Sweep.load(args.status)))
            return 0
        return _sweep(args, argv)

    return run_command("skd sweep", body)
