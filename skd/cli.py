"""The ``skd`` command: ``skd train``, ``skd eval``, ``skd shard``."""
from __future__ import annotations

import sys

USAGE = """usage: skd {train,eval,shard} ...

  skd train [--config FILE] [key=value ...]   train (no config: the embedded CPU demo)
  skd eval RUN_DIR|CHECKPOINT [key=value ...]  evaluate a run, checkpoint or exported model
  skd shard IMAGE_FOLDER OUT_DIR [options]      write WebDataset shards + dataset.json
  skd shard --index-only SHARD_DIR              index shards made elsewhere

Run `skd COMMAND --help` for the options of a command."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from skd.train import main as run
    elif command == "eval":
        from skd.evaluate import main as run
    elif command == "shard":
        from skd.data.shard_cmd import main as run
    else:
        print(f"skd: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
