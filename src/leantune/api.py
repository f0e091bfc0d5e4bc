"""The one obvious way to use any method with your own model and loop."""

from __future__ import annotations

from torch import nn

from . import io
from .methods.base import Method, MethodConfig, get_method


def apply(model: nn.Module, method: str | MethodConfig | Method, **options) -> Method:
    """Freeze ``model`` and attach a method, in place. ``method`` is a name (options as keywords), a config or a
    method object. Returns the method; it is also ``model.leantune_method``."""
    if isinstance(method, Method):
        if options:
            raise TypeError("pass options in the method's config, not as keywords, when giving a Method object")
        return method.apply(model)
    if isinstance(method, MethodConfig):
        if options:
            method = method.replace(**options)
        cls = next((c for c in _methods() if isinstance(method, c.config_cls) and type(method) is c.config_cls), None)
        if cls is None:
            raise TypeError(f"no registered method takes a {type(method).__name__}")
        return cls(method).apply(model)
    cls = get_method(method)
    return cls(cls.config_cls.from_dict(options, method=method)).apply(model)


def _methods():
    from .methods.base import list_methods

    return list_methods()


def method_of(model: nn.Module) -> Method:
    m = getattr(model, "leantune_method", None)
    if m is None:
        raise ValueError("this model carries no leantune method: call leantune.apply(model, ...) first")
    return m


def save(model: nn.Module, directory, **extra):
    return io.save(model, directory, extra or None)


def load(model: nn.Module, directory, strict_base: bool = True, trainable: bool = False) -> Method:
    """A leantune adapter folder, or a Hugging Face PEFT LoRA folder (imported as leantune LoRA)."""
    from .interop.peft import is_peft_folder

    if is_peft_folder(directory):
        return load_peft(model, directory, trainable=trainable)
    return io.load(model, directory, strict_base=strict_base, trainable=trainable)


def load_peft(model: nn.Module, directory, trainable: bool = False) -> Method:
    """Import a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) onto a fresh base."""
    from .interop.peft import load_peft as _load_peft

    return _load_peft(model, directory, trainable=trainable)


def merge(model: nn.Module) -> nn.Module:
    method_of(model).merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    method_of(model).unmerge()
    return model


def remove(model: nn.Module) -> nn.Module:
    return method_of(model).remove()
