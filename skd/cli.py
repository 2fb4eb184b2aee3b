"""The ``skd`` command: ``train``, ``eval``, ``config``, ``report``, ``sweep``, ``presets``, ``shard``,
``convert``."""
from __future__ import annotations

import importlib
import os
import sys

USAGE = """usage: skd {train,eval,config,report,sweep,presets,shard,convert} ...

  skd train [--config FILE] [key=value ...]   train (no config: the embedded CPU demo);
                                                `skd train --help` lists every config key
  skd eval RUN_DIR|CHECKPOINT [key=value ...]  evaluate a run, checkpoint or exported model
  skd config [--config FILE] [key=value ...]   print the resolved configuration as YAML
  skd report RUN_DIR... [--out DIR] [--group-by seed]
                                                compare runs: table (Markdown, CSV), PNG figures
  skd report DIR... --paper [--out DIR]         runs (a sweep) laid out as their paper's table, beside
                                                the paper's numbers: Markdown, CSV, figure
  skd sweep TABLE|PRESET... [--seeds S...] [--out DIR] [key=value ...] [--executor local|slurm]
                                                one run per preset x seed, resumable; --status DIR, --list
  skd presets [--table TABLE_ID]                list the presets with their table cell and paper number
  skd shard INPUT OUT_DIR [options]             write WebDataset shards + dataset.json from an image
                                                folder, a CIFAR binary archive or TinyImageNet
  skd shard --index-only SHARD_DIR              index shards made elsewhere
  skd convert mmcls IN_FILE OUT.safetensors --model TIMM_NAME
                                                mmcls / mmpretrain checkpoint -> timm names

Run `skd COMMAND --help` for the options of a command."""


COMMANDS = {"train": "skd.train", "eval": "skd.evaluate", "config": "skd.config_docs",
            "shard": "skd.data.shard_cmd", "convert": "skd.convert", "report": "skd.report",
            "sweep": "skd.sweep.cli", "presets": "skd.presets"}
"""Each command is the ``main(argv) -> int`` of its module, imported only when it runs."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"skd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    status = importlib.import_module(COMMANDS[command]).main(rest)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(status)
    return status


def _exit_now(status: int) -> None:
    """End one process of a multi-process run once its command has finished: leave the process
    group, flush, and exit without interpreter teardown, where gloo's threads can abort a process
    whose work is done (SIGABRT, "terminate called without an active exception"), turning a
    finished run's exit status into a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
