"""``python -m skd.bench NAME [options]``: run the benchmark module ``skd.bench.<NAME>``."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import skd.bench


def available() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(skd.bench.__path__)
                  if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m skd.bench {{{','.join(names)}}} [options]\n"
              f"Run `python -m skd.bench NAME --help` for the options of one benchmark.")
        return 0 if argv else 2
    if argv[0] not in names:
        print(f"skd.bench: unknown benchmark {argv[0]!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"skd.bench.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
