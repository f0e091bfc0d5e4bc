"""Methods register themselves by name (``@register``); this package imports the built-in ones on demand."""

from __future__ import annotations

import importlib

from .base import (
    Capabilities,
    ConfigError,
    Method,
    MethodConfig,
    get_method,
    list_methods,
    make_config,
    register,
)

_BUILTIN = ("selective", "lora")
_loaded = False


def _load_builtin_methods() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN:
            importlib.import_module(f"{__name__}.{mod}")


__all__ = [
    "Capabilities",
    "ConfigError",
    "Method",
    "MethodConfig",
    "get_method",
    "list_methods",
    "make_config",
    "register",
]
