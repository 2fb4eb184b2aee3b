"""skd's own errors, and how every ``skd`` command reports them.

An ``SkdError`` is something the user can act on: a config value, a missing or damaged file, data
outside its contract, a teacher or checkpoint that does not fit, or a run that stopped for a
known reason (a NaN loss, a full disk). The commands print it as one line naming the file, key or
value at fault, and exit with its ``exit_status`` (2 for bad input). Anything else is a bug in
skd (or in a library under it): it keeps its traceback and exits with 1. ``SKD_DEBUG=1`` shows
the traceback of an ``SkdError`` too.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

__all__ = ["SkdError", "ConfigError", "MissingFileError", "DataError", "CheckpointError",
           "CheckpointUnreadable", "one_line", "run_command"]


class SkdError(Exception):
    """Base of every error the user can fix; printed as one line by the commands."""

    exit_status: int = 2


class ConfigError(SkdError, ValueError):
    """A configuration problem, with the offending key or file in its message."""


class MissingFileError(SkdError, FileNotFoundError):
    """A file or directory the user named (or a run needs) does not exist; the message names it."""


class DataError(SkdError, ValueError):
    """Data outside its contract: a damaged shard or index, a label out of range, too many
    corrupt images; the message names the file and sample."""


class CheckpointError(SkdError, ValueError):
    """A checkpoint or weights file that is damaged, is not one skd can load safely, or does not
    fit the model or run it is loaded into; the message names the file."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint that cannot be used now but is not known to be damaged: an I/O error while
    reading it, or a format of a newer skd. ``resume=auto`` stops on it instead of setting it aside."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; for an error re-raised from a DataLoader worker (whose
    message holds the worker's traceback) only the original error's own line."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split()) or type(e).__name__


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's ``body`` and turn an ``SkdError`` into one line on stderr and its exit
    status; any other exception propagates with its traceback (exit status 1)."""
    try:
        return body()
    except SkdError as e:
        if os.environ.get("SKD_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_status
