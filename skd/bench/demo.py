"""``python -m skd.bench demo``: wall time and accuracy of README's demo command (``skd train``, the embedded demo).

Runs the embedded demo (PS-KD on the digits, CPU) ``--runs`` times in fresh processes, the first
with an empty data cache so the one-time shard creation is included, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skd.bench demo", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="demo runs (the first one writes the shards)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SKD_CACHE": str(Path(tmp) / "cache")}
        for k in range(args.runs):
            run = Path(tmp) / f"run{k}"
            tic = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "skd", "train", f"output_dir={run}"], env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - tic
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            top1 = json.loads((run / "metrics.json").read_text())["top1"]
            rows.append((k, "yes" if k == 0 else "no", seconds, top1))
    print(f"skd train (embedded demo), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.now():%Y-%m-%d %H:%M}")
    print(f"{'run':>4} {'writes shards':>14} {'wall s':>8} {'top-1 %':>8}")
    for k, shards, seconds, top1 in rows:
        print(f"{k:>4} {shards:>14} {seconds:>8.1f} {top1:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
