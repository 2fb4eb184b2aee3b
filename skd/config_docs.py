"""Every config key with its type, default, rule and one-line doc, read from the dataclasses;
and ``skd config``, which prints a resolved configuration.

A field's doc is the string literal right below it in the class body (the convention of
``skd/config.py`` and every method's ``Config``); it is read from the source with ``ast``, so the
text ``skd train --help`` prints is the text a reader of the code sees.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from typing import Any

import yaml

from skd.config import DEMO_OVERRIDES, TrainConfig, config_to_dict, flat_dict, load_config
from skd.config_checks import describe_rule
from skd.errors import run_command
from skd.methods import MethodConfig, get_method_config_class, list_methods

__all__ = ["ConfigKey", "config_keys", "format_config_keys", "format_defaults_note", "main"]


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    key: str
    """Dotted key, e.g. ``data.batch_size``; method fields as ``method.FIELD``."""
    type: str
    default: Any
    rule: str
    """Allowed values or bounds, in words; empty when any value of the type is allowed."""
    doc: str
    methods: tuple[str, ...] = ()
    """For ``method.*`` keys: the methods that have the field (empty: every method)."""


@lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """``{field: first paragraph of its docstring}`` for ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (e.g. a frozen build): keys without docs
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split("\n\n")[0].split())
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _keys_of(cls: type, prefix: str) -> list[ConfigKey]:
    hints, docs, keys = typing.get_type_hints(cls), _field_docs(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or hints[f.name] is MethodConfig:
            continue
        keys.append(ConfigKey(prefix + f.name, _type_name(hints[f.name]), _default(f), describe_rule(f),
                              docs.get(f.name, "")))
    return keys


def config_keys() -> list[ConfigKey]:
    """Every key of ``TrainConfig`` and its sections, then the ``method.*`` fields of each
    registered method (``methods`` names the method: defaults differ between methods)."""
    keys = _keys_of(TrainConfig, "")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(hints[f.name]) and hints[f.name] is not MethodConfig:  # below
            keys += _keys_of(hints[f.name], f.name + ".")
    keys.append(ConfigKey("method.name", "str", "ce", "one of " + ", ".join(list_methods()),
                          _field_docs(MethodConfig)["name"]))
    for name in list_methods():
        keys += [dataclasses.replace(k, methods=(name,))
                 for k in _keys_of(get_method_config_class(name), "method.") if k.key != "method.name"]
    return keys


def format_defaults_note(width: int = 100) -> str:
    """Which defaults ``format_config_keys`` shows, and the values the demo (``skd train``
    without ``--config``) sets instead."""
    demo = " ".join(f"{k}={v}" for k, v in flat_dict(DEMO_OVERRIDES).items())
    text = (f"The defaults below are the dataclasses' own, the starting point of every --config preset. "
            f"Without --config, skd train runs the demo (configs/demo.yaml), which sets: {demo}.")
    return "\n".join(textwrap.wrap(text, width=width, break_on_hyphens=False))


def format_config_keys(width: int = 100) -> str:
    """The keys as plain text for ``--help``: ``key (type = default; rule)`` and the doc below,
    the method fields grouped by method."""
    lines, method = [], None
    for k in config_keys():
        if k.methods and k.methods[0] != method:
            method = k.methods[0]
            lines.append(f"\n fields of method.name={method}:")
        lines.append(f"  {k.key}  ({k.type} = {k.default!r}{'; ' + k.rule if k.rule else ''})")
        if k.doc:
            lines += textwrap.wrap(k.doc, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``skd config [--config FILE] [key=value ...]``: the resolved configuration as YAML (a valid
    ``--config`` file that resolves to the same configuration)."""
    parser = argparse.ArgumentParser(
        prog="skd config", description="Print the configuration that `skd train` with the same arguments "
        "would use, as YAML (give it back with --config). `skd train --help` lists every key.")
    parser.add_argument("--config", help="YAML preset (see configs/); without it, the embedded demo")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)

    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0

    return run_command("skd config", run)
