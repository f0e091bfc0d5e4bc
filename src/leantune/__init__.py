"""leantune: parameter-efficient fine-tuning, measured head to head.

    import leantune
    method = leantune.apply(model, "lora", r=16)      # or apply(model, LoraConfig(r=16))
    ...                                               # your own loop, or leantune.train(...)
    leantune.save(model, "out/adapter")
    leantune.load(fresh_base, "out/adapter")
    leantune.merge(model)
"""

from __future__ import annotations

from . import train as _train_package  # noqa: E402,F401  loaded now: a later import would replace train() below
from .api import apply, load, load_peft, merge, remove, save, unmerge  # noqa: E402
from .files import __version__  # noqa: E402
from .methods import Method, MethodConfig, get_method, list_methods, make_config, register  # noqa: E402
from .models import load_model  # noqa: E402


def train(*args, **kwargs):
    """Fine-tune a model with leantune's loop; see :func:`leantune.train.loop.train`."""
    from .train.loop import train as _train

    return _train(*args, **kwargs)


__all__ = [
    "Method",
    "MethodConfig",
    "__version__",
    "apply",
    "get_method",
    "list_methods",
    "load",
    "load_model",
    "load_peft",
    "make_config",
    "merge",
    "register",
    "remove",
    "save",
    "train",
    "unmerge",
]
