"""Adapter folders: ``leantune.json`` (method, config, base fingerprint, file checksum) + ``adapter.safetensors``.

Weights only ever travel as safetensors; nothing a user hands us is unpickled. Files are written atomically
(temporary file + rename), the JSON last, so a folder with a ``leantune.json`` is always complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .files import (  # noqa: F401  re-exported: io's public names before files.py existed
    AdapterError,
    __version__,
    atomic_save_tensors,
    atomic_write_text,
    check_fingerprint,
    fingerprint,
    sha256_file,
)
from .methods.base import get_method

FORMAT_VERSION = 1
CONFIG_NAME = "leantune.json"
WEIGHTS_NAME = "adapter.safetensors"


# -- save / load --------------------------------------------------------------------------------------------


def save(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None,
         state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the fine-tune carried by ``model`` (see ``leantune.apply``) to ``directory``. ``state``: the method's
    tensors when already gathered (sharded training), else ``method.state()``."""
    method = getattr(model, "leantune_method", None)
    if method is None:
        raise ValueError("this model carries no leantune method: call leantune.apply(model, ...) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = method.state() if state is None else state
    if method.peft_native:  # PEFT's own files; leantune.json (written last) names and checksums the weights
        weights = directory / method.write_peft_files(directory, tensors)
    else:
        weights = directory / WEIGHTS_NAME
        atomic_save_tensors(tensors, weights, metadata={"format": "pt", "leantune_method": method.name})
    from .models import model_name

    meta = {
        "format_version": FORMAT_VERSION,
        "leantune_version": __version__,
        "method": method.name,
        "config": method.config.to_dict(),
        "capabilities": method.capabilities.to_dict(),
        "trainable_params": method.num_trainable(),
        "changed_params": method.num_changed(),
        "base": {"name": model_name(model), "dtype": _float_dtype(model), "fingerprint": method.base_fingerprint,
                 **_quantization(model)},
        "weights": {"file": weights.name, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)},
    }
    if extra:
        meta.update(extra)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return directory


def _quantization(model: nn.Module) -> dict:
    """``{"quantization": {...}}`` for a quantized base (eval, generate and export load it the same way)."""
    from .quant import quantization_of

    q = quantization_of(model)
    return {"quantization": q.to_dict()} if q is not None else {}


def _float_dtype(model: nn.Module) -> str | None:
    """The dtype the base was loaded in (``--base-dtype``), as eval and export load it again by default."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if p is None else str(p.dtype).removeprefix("torch.")


def read_meta(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    cfg = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterError(f"adapter folder {str(directory)!r} does not exist")
    if not cfg.exists():
        if (directory / "adapter_config.json").exists():
            raise AdapterError(
                f"{str(directory)!r} is a Hugging Face PEFT adapter folder (adapter_config.json), not a leantune "
                "one; import it with leantune.load(model, dir) or leantune.load_peft(model, dir)"
            )
        raise AdapterError(f"{str(directory)!r} has no {CONFIG_NAME}: not a leantune adapter folder (or incomplete)")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg}: corrupt JSON ({e}); the adapter folder is damaged") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(
            f"{cfg}: format_version {version!r} is not one this leantune ({__version__}) reads (up to "
            f"{FORMAT_VERSION}); upgrade leantune"
        )
    for key in ("method", "config", "weights"):
        if key not in meta:
            raise AdapterError(f"{cfg}: field {key!r} is missing; the adapter folder is damaged")
    return meta


def read_weights(directory: str | os.PathLike, meta: dict) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    info = meta["weights"]
    path = directory / Path(info.get("file", WEIGHTS_NAME)).name  # a name, never a path from the file
    if not path.exists():
        raise AdapterError(f"{path}: missing; the adapter folder is incomplete")
    size = path.stat().st_size
    if "bytes" in info and size != info["bytes"]:
        raise AdapterError(f"{path}: {size} bytes, expected {info['bytes']}: the file is truncated or was replaced")
    if "sha256" in info and sha256_file(path) != info["sha256"]:
        raise AdapterError(f"{path}: checksum mismatch: the file is corrupt or was changed after saving")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None


def load(model: nn.Module, directory: str | os.PathLike, strict_base: bool = True, trainable: bool = False):
    """Apply the adapter in ``directory`` to a fresh base ``model`` (in place); returns the method.

    ``trainable=True`` leaves its parameters trainable (to continue training)."""
    meta = read_meta(directory)
    source = str(directory)
    base = meta.get("base") or {}
    if base.get("fingerprint"):
        try:
            check_fingerprint(base["fingerprint"], model, source, base.get("name"))
        except AdapterError:
            if strict_base:
                raise
            import warnings

            warnings.warn(f"{source}: loading onto a base model that differs from the one it was made for", stacklevel=2)
    try:
        cls = get_method(meta["method"])
    except KeyError as e:
        raise AdapterError(f"{source}: {e.args[0]}") from None
    config = cls.config_cls.from_dict(meta["config"], method=meta["method"])
    state = read_weights(directory, meta)
    method = cls(config).apply(model)
    method.load_state(state)
    if not trainable:
        for _, p in method.trainable_parameters():
            p.requires_grad_(False)
    return method
