"""Methods register themselves by name (``@register``); this package imports the built-in ones on demand."""

from __future__ import annotations

import importlib
import pkgutil

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

_loaded = False


def _load_builtin_methods() -> None:
    """Import every module of this package once: each registers its methods."""
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base" and not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")


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
