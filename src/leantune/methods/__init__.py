"""Methods register themselves by name (``@register``); ``base`` imports the built-in ones on demand."""

from __future__ import annotations

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
