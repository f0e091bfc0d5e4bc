"""Adapter folders: ``leantune.json`` (method, config, base fingerprint, file checksum) + ``adapter.safetensors``.

Weights only ever travel as safetensors; nothing a user hands us is unpickled. Files are written atomically
(temporary file + rename), the JSON last, so a folder with a ``leantune.json`` is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .methods.base import get_method

FORMAT_VERSION = 1
CONFIG_NAME = "leantune.json"
WEIGHTS_NAME = "adapter.safetensors"


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, truncated, corrupt, newer, or for another base model."""


# -- atomic files -------------------------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- base-model fingerprint ---------------------------------------------------------------------------------


FINGERPRINT_TENSORS = 8  # matrices sampled, spread over the model
FINGERPRINT_VALUES = 32  # values per sampled matrix
FINGERPRINT_MAX_DIFFERING = 0.25  # share of sampled values allowed to differ at the coarser precision


def fingerprint(model: nn.Module) -> dict:
    """Architecture, parameter shapes and 256 weight values (with their dtype): enough to tell one base model
    from another, also a sibling checkpoint of the same architecture (an instruct tune of the same base).

    Values are stored exactly and compared at the coarser of the two dtypes (:func:`check_fingerprint`), so the
    same base stored in bf16 or fp32 matches while one whose weights moved by 0.5 % does not."""
    params = dict(model.named_parameters(remove_duplicate=True))
    shapes = sorted((n, list(p.shape)) for n, p in params.items())
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    names = sorted(n for n, p in params.items() if p.dim() >= 2) or sorted(params)  # matrices: norms sit at 1.0
    picks = sorted({names[round(i * (len(names) - 1) / max(1, FINGERPRINT_TENSORS - 1))]
                    for i in range(FINGERPRINT_TENSORS)}) if names else []
    sample, dtypes = {}, {}
    for n in picks:
        flat = params[n].detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_VALUES)
        sample[n] = [float(v) for v in flat[::step][:FINGERPRINT_VALUES].double().cpu()]  # exact: fp32 fits a double
        dtypes[n] = str(params[n].dtype).removeprefix("torch.")
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in params.values()),
        "shapes_digest": digest,
        "sample": sample,
        "sample_dtypes": dtypes,
    }


# mantissa bits: the coarser dtype of two is the one with fewer
_MANTISSA = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}


def _coarser(a: str, b: str) -> str:
    return min((a, b), key=lambda d: _MANTISSA.get(d, 23))


def check_fingerprint(expected: dict, model: nn.Module, source: str, base_name: str | None = None) -> None:
    got = fingerprint(model)
    made_for = f" (made for {base_name!r})" if base_name else ""
    for key in ("model_type", "num_parameters", "shapes_digest"):
        if expected.get(key) != got.get(key):
            raise AdapterError(
                f"{source}: adapter is for another base model{made_for}: {key} is {expected.get(key)!r} there, "
                f"{got.get(key)!r} in this model ({got['architecture']}). Load it onto the base it was trained on."
            )
    params = dict(model.named_parameters(remove_duplicate=True))
    old_format = "sample_dtypes" not in expected  # written before 0.1.0's exact samples: a loose tolerance
    differing, total, first = 0, 0, None
    for name, values in expected.get("sample", {}).items():
        if name not in params:
            raise AdapterError(f"{source}: the base model has no tensor {name!r}, which the adapter's base had"
                               f"{made_for}; load it onto the base it was trained on")
        flat = params[name].detach().reshape(-1)
        mine = flat[::max(1, flat.numel() // len(values) if old_format else flat.numel() // FINGERPRINT_VALUES)]
        mine = mine[:len(values)].double().cpu()
        theirs = torch.tensor(values, dtype=torch.float64)
        if old_format:
            bad = (mine - theirs).abs() > 1e-2 * theirs.abs() + 1e-3
            dtype = "a 1 % tolerance"
        else:
            dtype = _coarser(expected["sample_dtypes"][name], str(params[name].dtype).removeprefix("torch."))
            coarse = getattr(torch, dtype)
            bad = mine.to(coarse) != theirs.to(coarse)  # both rounded once to the coarser dtype
        differing += int(bad.sum())
        total += len(values)
        if first is None and bool(bad.any()):
            i = int(bad.nonzero()[0])
            first = (name, float(theirs[i]), float(mine[i]), dtype)
    if total and (differing > FINGERPRINT_MAX_DIFFERING * total or (old_format and differing)):
        name, a, b, dtype = first
        raise AdapterError(
            f"{source}: the base model's weights differ from those the adapter was trained on{made_for}: "
            f"{differing} of {total} sampled values differ at {dtype} precision (e.g. {name!r}: {a:.6g} there, "
            f"{b:.6g} here). Same architecture, different checkpoint (another fine-tune of the same base?): load "
            "the matching base, or pass strict_base=False to load anyway."
        )


# -- save / load --------------------------------------------------------------------------------------------


def save(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the fine-tune carried by ``model`` (see ``leantune.apply``) to ``directory``."""
    method = getattr(model, "leantune_method", None)
    if method is None:
        raise ValueError("this model carries no leantune method: call leantune.apply(model, ...) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    atomic_save_tensors(method.state(), weights, metadata={"format": "pt", "leantune_method": method.name})
    from .models import model_name

    meta = {
        "format_version": FORMAT_VERSION,
        "leantune_version": __version__,
        "method": method.name,
        "config": method.config.to_dict(),
        "capabilities": method.capabilities.to_dict(),
        "trainable_params": method.num_trainable(),
        "changed_params": method.num_changed(),
        "base": {"name": model_name(model), "dtype": _float_dtype(model), "fingerprint": method.base_fingerprint},
        "weights": {"file": WEIGHTS_NAME, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)},
    }
    if extra:
        meta.update(extra)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return directory


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
