"""Method registry: ``@register_method`` / ``create_method`` / ``list_methods`` (timm style)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from skd.methods.base import DataSpec, Method, MethodConfig

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = cls
        return cls
    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}") from None


def get_method_config_class(name: str) -> type[MethodConfig]:
    return get_method_class(name).Config


def create_method(cfg: MethodConfig, model: nn.Module, data: DataSpec) -> Method:
    """Build the method named by ``cfg.name`` around ``model``."""
    return get_method_class(cfg.name)(model, cfg, data)
