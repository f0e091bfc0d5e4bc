"""The method contract and the open registry.

Every method answers the same questions, so the trainer, the bench, the serializer and the server treat them
alike: a JSON config with a format version, ``apply`` (freeze the base, add or select what trains, in place),
trainable and *changed* parameter counts, ``state()`` (the tensors that are the fine-tune), ``merge`` /
``unmerge`` and capability flags. A new method is one file with ``@register("name")``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import re
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..anatomy import Anatomy, anatomy
from ..files import fingerprint
from ..precision import MasterWeights
from ..quant import quantization_of

FAMILIES = ("additive", "selective", "reparametrization", "hybrid", "full", "pruning")
OVERHEADS = ("none", "extra_ffn", "extra_input", "gating")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Capabilities:
    mergeable: bool = False  # merge() folds the change into the base weights: no inference overhead after
    restores_base: bool = False  # unmerge()/remove() gives the base back bitwise
    mixed_batch: bool = False  # several adapters serve one batch side by side (bank_terms() gives their form)
    prunable: bool = False  # Light-PEFT can prune it
    needs_schedule: bool = False  # the training loop must call its schedule hook
    schedule_ends: bool = False  # the schedule finishes partway (estimate, then prune); its steady state is after
    inference_overhead: str = "none"  # before merge: none / extra_ffn / extra_input / gating
    changes_trainable: bool = False  # what trains changes during the run (data parallelism cannot fix it at wrap)
    fsdp: bool = True  # trains under FSDP2 (train/parallel.py); when not, fsdp_refusal says why
    fsdp_refusal: str = ""
    identity_at_init: bool = True  # the model computes what the base computes right after apply (soft prompts do not)
    quantized_base: bool = False  # trains on a bitsandbytes-quantized base (leantune.quant); else quantized_refusal
    quantized_refusal: str = "it has not been made to work on a quantized base"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MethodConfig:
    """Base of every method config: a plain dataclass with a JSON round trip and a format version.

    ``from_dict`` refuses unknown keys and versions newer than this release knows, with a message that says what
    to do; values given as strings (from the CLI) are coerced to the field's type."""

    FORMAT_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["format_version"] = self.FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict, method: str | None = None) -> MethodConfig:
        d = dict(d)
        version = d.pop("format_version", cls.FORMAT_VERSION)
        where = f"method {method!r}" if method else cls.__name__
        if not isinstance(version, int) or version > cls.FORMAT_VERSION:
            raise ConfigError(
                f"{where}: config format_version {version!r} is newer than this leantune understands "
                f"(up to {cls.FORMAT_VERSION}); upgrade leantune to read it"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown}; known options: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: coerce(v, hints[k], f"{where} option {k!r}") for k, v in d.items()}
        cfg = cls(**kwargs)
        cfg.check(method)
        return cfg

    def check(self, method: str | None = None) -> None:
        """The checks every config gets (a value of the declared type: no bool for a number, no NaN or
        infinity), then the method's own :meth:`validate`."""
        where = f"method {method!r}" if method else type(self).__name__
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_value(getattr(self, f.name), hints[f.name], f"{where} option {f.name!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on values that make no sense. Subclasses extend."""

    def replace(self, **changes) -> MethodConfig:
        merged = {**self.to_dict(), **changes}
        return type(self).from_dict(merged)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def check_value(value: Any, tp, where: str) -> None:
    """A config value already of its field's type: a bool is no number, and a number is finite."""
    tp, _ = _strip_optional(tp)
    if value is None:
        return
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected {'an int' if tp is int else 'a float'}, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number; give a finite {tp.__name__}")
    elif tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r} ({type(value).__name__})")
    elif typing.get_origin(tp) in (list, tuple) and isinstance(value, (list, tuple)):
        (inner, *_) = typing.get_args(tp) or (str,)
        for v in value:
            check_value(v, inner, where)


def coerce(value: Any, tp, where: str) -> Any:
    """Turn CLI strings and JSON values into the declared type; clear error otherwise."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None:
            return None
    origin = typing.get_origin(tp)
    try:
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError  # JSON true/false is not a count or a rate
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            out = float(value)
            if not math.isfinite(out):
                raise ConfigError(f"{where}: {value!r} is not a finite number; give a finite float")
            return out
        if tp is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
        if origin in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [coerce(v, inner, where) for v in value]
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ValueError
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


_REGISTRY: dict[str, type[Method]] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str):
    """Class decorator: ``@register("lora")``. Names are lowercase snake_case and unique."""

    def deco(cls: type[Method]) -> type[Method]:
        if not _NAME_RE.match(name):
            raise ValueError(f"method name {name!r} must be lowercase snake_case")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if cls.family not in FAMILIES:
            raise ValueError(f"method {name!r}: family {cls.family!r} is not one of {FAMILIES}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


_loaded = False


def _load_builtin_methods() -> None:
    """Import every module of the methods package once: each registers its methods (by name, through importlib,
    so this module imports none of them)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if info.name != "base" and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))} (see `leantune methods`)")
    return _REGISTRY[name]


def list_methods() -> list[type[Method]]:
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def make_config(name: str, options: dict | None = None) -> MethodConfig:
    cls = get_method(name)
    return cls.config_cls.from_dict(options or {}, method=name)


class Method:
    """One fine-tuning method applied to one model.

    Subclasses set ``name`` (by ``@register``), ``family``, ``description``, ``config_cls`` and implement
    ``_apply``, ``trainable_parameters`` and ``state``/``load_state``; mergeable methods implement ``merge`` /
    ``unmerge``. The method object is attached to the model as ``model.leantune_method``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 1e-4
    # The adapter folder holds PEFT's own files, written by write_peft_files (the PEFT bridge), not adapter.safetensors
    peft_native: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise ConfigError(f"method {self.name!r} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config.check(self.name)
        self.model: nn.Module | None = None
        self.anatomy: Anatomy | None = None
        self.merged = False
        self.base_fingerprint: dict | None = None
        self.masters = MasterWeights()  # float32 copies of low-precision base tensors trained in place (precision.py)

    # -- capabilities ---------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    # -- apply ----------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, anat: Anatomy | None = None) -> Method:
        if getattr(model, "leantune_method", None) is not None:
            raise RuntimeError(
                f"this model already carries method {model.leantune_method.name!r}; load a fresh base model"
            )
        anat = anat or anatomy(model)
        self.check_model(anat)  # a refusal leaves the model as it was
        self.check_quantized(model)
        self.base_fingerprint = fingerprint(model)
        self.model = model
        self.anatomy = anat
        for p in model.parameters():
            p.requires_grad_(False)
        before = {id(m) for m in model.modules()}
        self._apply(model, self.anatomy)
        for m in model.modules():  # what the method added follows the model's mode (no dropout in eval mode)
            if id(m) not in before:
                m.train(model.training)
        model.__dict__["leantune_method"] = self  # plain attribute: not a submodule, not in state_dict
        return self

    def check_model(self, anat: Anatomy) -> None:
        """Refuse, before anything changes, a model whose family or layout this method (with this config) cannot
        handle: raise ``ConfigError`` naming what is missing. The default takes every model."""

    def check_quantized(self, model: nn.Module) -> None:
        """Refuse a quantized base (``--quantize``) unless the capabilities say ``quantized_base``."""
        quant = quantization_of(model)
        caps = self.capabilities
        if quant is not None and not caps.quantized_base:
            raise ConfigError(f"method {self.name!r} cannot train on a {quant.type}-quantized base: "
                              f"{caps.quantized_refusal}. Load the base without --quantize, or use a method that "
                              "supports it (lora, dora, krona, ia3, the adapters, bitfit, ln_tuning, s2ft, lisa, "
                              "the soft prompts)")

    def _apply(self, model: nn.Module, anat: Anatomy) -> None:
        raise NotImplementedError

    # -- what trains ----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that the optimizer should see."""
        for n, p in self._model().named_parameters():
            if p.requires_grad:
                yield n, p

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def rebind_parameters(self, mapping: dict[int, nn.Parameter]) -> None:
        """The model's parameters were replaced (FSDP's sharding puts new parameter objects in): ``mapping`` takes
        ``id(old)`` to the new one. A method that keeps references to parameters updates them here; the masters
        follow. Methods that reach their tensors through modules (LoRA, S²FT) need nothing."""
        self.masters.rebind(mapping)

    def optimizer_options(self) -> dict[str, dict[str, float]]:
        """Per-parameter optimizer settings that differ from the run's, by the names ``trainable_parameters``
        yields: ``{"lr_scale": x}`` multiplies the scheduled learning rate, ``{"weight_decay": y}`` replaces the
        run's. Parameters not named here use the run's settings (the default: none are named)."""
        return {}

    def num_changed(self) -> int:
        """Entries of the base model that differ after training and merge (the survey's 'changed')."""
        raise NotImplementedError

    # -- the fine-tune as tensors ---------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to resume training exactly; ``state()`` unless the method trains tensors that
        its saved form folds away (prefix tuning's reparametrization)."""
        return self.state()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state(state)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state()
        check_state_keys(self.name, expected, state)
        with torch.no_grad():
            for k, v in state.items():
                expected[k].copy_(v.to(expected[k].dtype))

    # -- merge ----------------------------------------------------------------------------------------------
    def merge(self) -> None:
        if not self.capabilities.mergeable:
            raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights")
        self.merged = True

    def unmerge(self) -> None:
        if not self.capabilities.mergeable:
            raise NotImplementedError(f"method {self.name!r} cannot be merged or unmerged")
        self.merged = False

    def remove(self) -> nn.Module:
        """Take the method off the model and give the base back (bitwise where ``restores_base``)."""
        raise NotImplementedError(f"method {self.name!r} cannot be removed; reload the base model")

    def merge_and_unload(self) -> nn.Module:
        """Fold the change into the base weights and take the method off: a plain model of the base architecture
        (its config adjusted where needed) that behaves like base + adapter. What a merged export saves."""
        if not self.capabilities.mergeable:
            raise NotImplementedError(f"method {self.name!r} cannot be merged into the base weights; export the adapter")
        if type(self).unload is Method.unload:  # checked before merge() so a refusal leaves the model untouched
            raise NotImplementedError(
                f"method {self.name!r} does not implement unload() yet, so it has no merged export; save the adapter"
            )
        self.merge()
        return self.unload()

    def unload(self) -> nn.Module:
        """After ``merge()``: take the method's modules, hooks and state off the model, keeping the merged weights,
        and return the model. Mergeable methods override it (``merge_and_unload`` calls it)."""
        raise NotImplementedError(f"method {self.name!r} cannot be unloaded")

    def merged_export_refusal(self) -> str | None:
        """Why this fine-tune cannot become a plain model of the base architecture, or None when it can: asked
        before training when a merged export is wanted, so a run does not fail at its end."""
        return None

    def save_merged(self, directory, tokenizer=None) -> dict | None:
        """Write the merged model yourself, for a method that changes the architecture (Light-PEFT's pruned
        shapes): return ``{"kind": ..., "reason": ...}``. None (the default): the generic merged export applies
        (``merge_and_unload`` + ``save_pretrained``)."""
        return None

    def lora_factors(self) -> dict | None:
        """The fine-tune as exact LoRA factors, for a PEFT export (``interop.peft.save_peft_lora(dir, **factors)``),
        or None when it has none: ``{"modules": {qualified module name: (A (r x in), B (out x r))}, "alpha": float,
        {name: float} or None (None: scale 1), "use_rslora": bool, "magnitudes": {name: (out,)} or None (DoRA),
        "dropout": float}``."""
        return None

    def peft_adapter(self) -> dict | None:
        """The fine-tune as another PEFT adapter type (not LoRA), for a PEFT export, or None: ``{"config": {PEFT
        config fields, "peft_type" included, without the model's name, task or targets}, "weights": {qualified
        module name: {PEFT tensor name: tensor}}, "module_fields": {config field: [qualified module names]}}`` (the
        exporter names those modules the way it names the targets). Raises ValueError (saying why) where this model's layers
        have no PEFT equivalent."""
        return None

    def bank_terms(self) -> dict[str, list] | None:
        """The fine-tune as bank terms (``methods/terms.py``: low-rank, column / row blocks, scales, biases) by
        qualified module name, for an adapter bank that computes many adapters in one batch (``serve/bank.py``);
        None where it has no such form. A method that returns terms says ``mixed_batch`` in its capabilities. The
        bank calls it on the method applied to its base and loaded (never merged), then calls ``remove()``, which
        must give that base back bitwise."""
        return None

    def write_peft_files(self, directory: Path, state: dict[str, torch.Tensor]) -> str:
        """Where ``peft_native``: write ``state`` as PEFT's adapter_config.json + adapter_model.safetensors into
        ``directory`` and return the weights file's name (io.save and the PEFT export call it)."""
        raise NotImplementedError(f"method {self.name!r} does not write PEFT's files itself")

    def schedule(self):
        """A hook object for the training loop (see leantune.hooks), or None."""
        return None

    def _release(self) -> nn.Module:
        """The common end of remove()/unload(): the model trainable again and free of this method."""
        model = self._model()
        for p in model.parameters():
            if p.is_floating_point():  # a quantized base's packed weights take no gradient
                p.requires_grad_(True)
        model.__dict__.pop("leantune_method", None)
        self.model = None
        return model

    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"method {self.name!r} is not applied to a model yet: call apply(model) first")
        return self.model

    @classmethod
    def describe(cls) -> dict:
        caps = cls().capabilities
        return {
            "name": cls.name,
            "family": cls.family,
            "description": cls.description,
            "capabilities": caps.to_dict(),
            "default_lr": cls.default_lr,
            "options": {k: v for k, v in cls.config_cls().to_dict().items() if k != "format_version"},
        }


def check_state_keys(method: str, expected: dict, given: dict) -> None:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(
            f"adapter tensors do not match method {method!r} on this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}. "
            "Was the adapter saved with a different method config or for another base model?"
        )
    for k, v in given.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"adapter tensor {k!r} has shape {tuple(v.shape)}, this model needs {tuple(expected[k].shape)}; "
                "the adapter was made for a different base model or config"
            )
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise ValueError(
                f"adapter tensor {k!r} is {str(v.dtype).removeprefix('torch.')}, where method {method!r} stores "
                "floating-point values; the file was not written by leantune or was altered"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(
                f"adapter tensor {k!r} holds {bad} NaN/inf value(s) of {v.numel()}: the run that wrote it diverged "
                "(lower the learning rate) or the file is damaged; use an earlier checkpoint"
            )


def unique_parameters(params) -> list[nn.Parameter]:
    """Tied weights (embedding = LM head) counted once."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)
