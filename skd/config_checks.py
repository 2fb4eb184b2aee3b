"""Declarative checks of config fields: numeric bounds and allowed values, stated beside the field.

``bounded(0.8, ge=0, le=1)``, ``one_of("reg", ("reg", "self"))`` and ``per_channel(None)`` are ``dataclasses.field``s
that carry their rule as metadata. ``check_fields`` checks every such field of a config section;
``skd.config`` runs it on each section while building a config, so a bad value is reported with
its full key before any work starts, and ``skd train --help`` can print the rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from skd.errors import ConfigError

__all__ = ["bounded", "one_of", "per_channel", "check_fields", "describe_rule"]


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A numeric field with bounds (``ge``: ≥, ``gt``: >, ``le``: ≤, ``lt``: <); None passes."""
    return dataclasses.field(default=default, metadata={"bounds": (ge, gt, le, lt)})


def one_of(default: Any, choices: Sequence[Any]) -> Any:
    """A field whose value must be one of ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def per_channel(default: Any, *, positive: bool = False) -> Any:
    """A per-channel list (a mean or standard deviation): 3 values (RGB), all > 0 with
    ``positive``; None passes."""
    return dataclasses.field(default=default, metadata={"per_channel": positive})


def describe_rule(f: dataclasses.Field) -> str:
    """The rule of a field in words (empty when it has none), e.g. ``>= 0 and <= 1``."""
    if "choices" in f.metadata:
        return "one of " + ", ".join(str(c) for c in f.metadata["choices"])
    if "per_channel" in f.metadata:
        return "3 values (RGB)" + (", all positive" if f.metadata["per_channel"] else "")
    if "bounds" in f.metadata:
        ge, gt, le, lt = f.metadata["bounds"]
        parts = [f"{op} {v:g}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if v is not None]
        return " and ".join(parts)
    return ""


def _violates(f: dataclasses.Field, value: Any) -> bool:
    if value is None:
        return False
    if "choices" in f.metadata:
        return value not in f.metadata["choices"]
    if "per_channel" in f.metadata:
        return len(value) != 3 or (f.metadata["per_channel"] and not min(value) > 0)
    if "bounds" in f.metadata:
        ge, gt, le, lt = f.metadata["bounds"]
        return ((ge is not None and not value >= ge) or (gt is not None and not value > gt)
                or (le is not None and not value <= le) or (lt is not None and not value < lt))
    return False


def check_fields(section: Any, prefix: str = "") -> None:
    """Raise ``ConfigError`` naming the first field of ``section`` that breaks its rule (NaN breaks
    every bound)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if _violates(f, value):
            verb = "hold" if "per_channel" in f.metadata else "be"
            raise ConfigError(f"config key '{prefix}{f.name}' = {value!r}: must {verb} {describe_rule(f)}")
