"""Training checkpoints: ``OUT/checkpoints/step-00000100/`` with the adapter (``leantune.json`` +
``adapter.safetensors``), ``optimizer.pt``, ``rng.pt`` and ``trainer_state.json``.

A checkpoint is written into a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none. Optimizer and RNG state are our own files and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from .. import io

STATE_NAME = "trainer_state.json"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest(out: Path | None) -> Path | None:
    if out is None:
        return None
    root = checkpoints_dir(out)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).exists())
    return done[-1] if done else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def save_checkpoint(out: Path, step: int, model, optimizer, hooks, keep: int, scaler=None, par=None) -> Path | None:
    """``scaler``: fp16's gradient scaler, whose scale and growth counter a resumed run must continue from.
    ``par`` (train/parallel.py): with several processes every rank calls this, the method's tensors and the
    optimizer state are gathered whole, and rank 0 alone writes."""
    method = model.leantune_method
    state = par.full_state(method, training=True) if par is not None else method.training_state()
    opt_state = par.optimizer_state(optimizer) if par is not None else optimizer.state_dict()
    if par is not None and not par.is_main:
        par.barrier()
        return None
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        io.save(model, tmp, state=state)
        torch.save(opt_state, tmp / "optimizer.pt")
        rng = _rng_state()
        torch.save({"torch": rng["torch"], **({"cuda": rng["cuda"]} if "cuda" in rng else {})}, tmp / "rng.pt")
        py = rng["python"]
        extra = {"python_rng": [py[0], list(py[1]), py[2]]}
        if "numpy" in rng:
            n = rng["numpy"]
            extra["numpy_rng"] = [n[0], n[1].tolist(), int(n[2]), int(n[3]), float(n[4])]
        hook_states = [{"type": type(h).__qualname__, "state": h.state_dict()} for h in hooks]
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()  # floats and ints: JSON
        state = {"step": step, "hooks": hook_states, **extra}
        (tmp / STATE_NAME).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).exists())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    if par is not None:
        par.barrier()  # the others wait until the checkpoint is whole
    return final


def load_checkpoint(path: Path, method, hooks) -> int:
    """Load the method's tensors and the hooks' state; return the step to continue from."""
    state = json.loads((path / STATE_NAME).read_text())
    meta = io.read_meta(path)
    tensors = io.read_weights(path, meta)
    saved = list(state.get("hooks", []))
    for h in hooks:  # match saved hook states to this run's hooks by type, in order
        i = next((i for i, s in enumerate(saved) if s["type"] == type(h).__qualname__), None)
        if i is not None:
            h.load_state_dict(saved.pop(i)["state"])
    lost = [s["type"] for s in saved if s["state"]]
    if lost:
        raise ValueError(f"checkpoint {path} holds the state of schedule hook(s) {lost} that this run does not "
                         "have: resume with the same method, or use a new output folder")
    method.load_training_state(tensors)
    return int(state["step"])


def load_optimizer_and_rng(path: Path, optimizer, scaler=None, shard=None) -> None:
    """``shard``: called after loading the whole-tensor optimizer state, to give each rank its shards (FSDP)."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if shard is not None:
        shard(optimizer)
    state = json.loads((path / STATE_NAME).read_text())
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "python_rng" in state:
        v, internal, gauss = state["python_rng"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy_rng" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
