"""The ground floor: files written atomically, checksums, the base-model fingerprint, AdapterError, the version.

Imports nothing of leantune's, so every floor above may use it (``io``, ``methods/base``, the interop writers).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

__version__ = "0.1.0"


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


UNQUANTIZED_FINGERPRINT = "leantune_unquantized_fingerprint"  # set by leantune.quant before it converts a base


def fingerprint(model: nn.Module) -> dict:
    """Architecture, parameter shapes and 256 weight values (with their dtype): enough to tell one base model
    from another, also a sibling checkpoint of the same architecture (an instruct tune of the same base).

    Values are stored exactly and compared at the coarser of the two dtypes (:func:`check_fingerprint`), so the
    same base stored in bf16 or fp32 matches while one whose weights moved by 0.5 % does not.

    A quantized base (leantune.quant) answers with the fingerprint its full-precision weights had before conversion,
    so an adapter made on it also loads on the unquantized base, and the other way round."""
    stored = model.__dict__.get(UNQUANTIZED_FINGERPRINT)
    if stored is not None:
        return json.loads(json.dumps(stored))  # a copy
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
    if UNQUANTIZED_FINGERPRINT in model.__dict__:  # a quantized base: compare with its weights before conversion
        params = {n: torch.tensor(v, dtype=getattr(torch, got["sample_dtypes"][n]))
                  for n, v in got["sample"].items()}
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
