"""``python -m skd.bench memory-plan``: what each PS-KD memory layout costs per GPU, computed.

For each dataset and GPU count: the memory every GPU holds, the bytes every GPU sends per training
step for the memory (it receives as many, on average), and the time that takes at the given
interconnect bandwidths (transfer time alone: no latency, no overlap with compute). Counted as
``skd.memory`` moves them, per step with a per-GPU batch of B:

- ``replicated`` / ``topk``: an all-gather of each rank's ids (int64) and new rows, padded to B;
  a ring all-gather sends (W − 1)·B·(row + 8) bytes from every GPU.
- ``sharded`` / ``sharded_topk``: the counts exchange (W int64), the ids to their owners and the
  rows back before the forward, the new rows to their owners after the step; with ids spread
  evenly over the owners, (W − 1)/W of them are remote: (W − 1)/W·B·(8 + 2·row) + 8·W bytes.

A dense row is C probabilities (fp16 by default, ``method.memory_dtype``); a top-k row is k fp16
probabilities and k int32 class ids. Every GPU holds N + 1 rows replicated, or ⌈N/W⌉ + 1 sharded
(the + 1 is a scratch row).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from skd.bench._report import markdown_table

DATASETS = {"ImageNet-1k": (1_281_167, 1_000), "ImageNet-21k": (14_197_122, 21_841)}
LAYOUTS = ("replicated", "sharded", "topk", "sharded_topk")
ID_BYTES = 8  # int64 sample ids
TOPK_ENTRY_BYTES = 2 + 4  # fp16 probability + int32 class id


@dataclass(frozen=True)
class PlanRow:
    dataset: str
    gpus: int
    layout: str
    k: int | None
    memory_bytes: int
    """Held by every GPU (the largest shard when sharded)."""
    step_bytes: float
    """Sent by every GPU per training step."""

    def step_ms(self, bandwidth_GBps: float) -> float:
        return self.step_bytes / (bandwidth_GBps * 1e9) * 1e3


def row_bytes(layout: str, num_classes: int, k: int | None, dense_bytes: int) -> int:
    return k * TOPK_ENTRY_BYTES if layout.endswith("topk") else num_classes * dense_bytes


def plan_row(dataset: str, num_samples: int, num_classes: int, gpus: int, layout: str, *,
             batch: int, k: int | None = None, dense_bytes: int = 2) -> PlanRow:
    row = row_bytes(layout, num_classes, k, dense_bytes)
    if layout.startswith("sharded"):
        memory = (math.ceil(num_samples / gpus) + 1) * row
        step = (gpus - 1) / gpus * batch * (ID_BYTES + 2 * row) + ID_BYTES * gpus if gpus > 1 else 0.0
    else:
        memory = (num_samples + 1) * row
        step = float((gpus - 1) * batch * (row + ID_BYTES))
    return PlanRow(dataset, gpus, layout, k if layout.endswith("topk") else None, memory, step)


def make_plan(datasets: dict[str, tuple[int, int]], gpus: list[int], ks: list[int], *, batch: int,
              dense_bytes: int) -> list[PlanRow]:
    rows = []
    for name, (num_samples, num_classes) in datasets.items():
        for w in gpus:
            for layout in LAYOUTS:
                for k in (ks if layout.endswith("topk") else [None]):
                    rows.append(plan_row(name, num_samples, num_classes, w, layout, batch=batch,
                                         k=k, dense_bytes=dense_bytes))
    return rows


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_table(rows: list[PlanRow], bandwidths: list[float], gpu_memory_GB: float) -> str:
    head = (["dataset", "GPUs", "memory", "memory/GPU", f"of {gpu_memory_GB:g} GB", "sent/step/GPU"]
            + [f"ms/step @{b:g} GB/s" for b in bandwidths])
    body = [[r.dataset, str(r.gpus), r.layout + (f" k={r.k}" if r.k else ""), _size(r.memory_bytes),
             f"{100 * r.memory_bytes / (gpu_memory_GB * 1e9):.3g}%", _size(r.step_bytes)]
            + [f"{r.step_ms(b):.3g}" for b in bandwidths] for r in rows]
    return markdown_table(head, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skd.bench memory-plan",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512], help="GPU counts")
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch (default 128)")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32], help="k of the top-k layouts")
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[25.0, 200.0],
                        help="interconnect bandwidth per GPU, GB/s (default 25 200)")
    parser.add_argument("--dense-bytes", type=int, default=2, choices=(2, 4),
                        help="bytes per dense probability: 2 (float16/bfloat16, default) or 4")
    parser.add_argument("--gpu-memory", type=float, default=80.0,
                        help="GPU memory in GB, for the share column (default 80)")
    parser.add_argument("--dataset", action="append", metavar="NAME=N,C", default=None,
                        help="a dataset of N samples and C classes, instead of ImageNet-1k and -21k")
    args = parser.parse_args(argv)
    datasets = DATASETS
    if args.dataset:
        try:
            datasets = {name: tuple(int(v) for v in size.split(","))
                        for name, size in (d.split("=") for d in args.dataset)}
            assert all(len(size) == 2 for size in datasets.values())
        except (ValueError, AssertionError):
            parser.error(f"--dataset takes NAME=N,C (e.g. places365=1803460,365), got {args.dataset}")
    if min(args.gpus + args.k + [args.batch]) < 1:
        parser.error("--gpus, --k and --batch must be at least 1")
    rows = make_plan(datasets, args.gpus, args.k, batch=args.batch, dense_bytes=args.dense_bytes)
    print(f"PS-KD memory per GPU and traffic per training step: per-GPU batch {args.batch}, dense "
          f"rows {args.dense_bytes} B per class, top-k rows {TOPK_ENTRY_BYTES} B per kept class")
    print(format_table(rows, args.bandwidth, args.gpu_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
