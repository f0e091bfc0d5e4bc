"""Bytes of a training step, counted rather than sampled: weights, gradients, optimizer state, and the tensors
autograd keeps for backward. Peak memory is the one measured figure (CUDA's allocator peak, or the peak RSS of
this process on the CPU).
"""

from __future__ import annotations

import resource
import sys
import weakref

import torch
from torch import nn


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """(device, address) of a tensor's storage, or None for tensors without one (sparse, meta)."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (str(t.device), st.data_ptr())


def weight_bytes(model: nn.Module) -> int:
    """All parameters, frozen included; tied weights counted once; a quantized layer's weight at its real size
    (the packed codes, which are its parameter, plus the block or row scales bitsandbytes keeps beside them)."""
    from ..quant import scale_bytes

    return sum(tensor_bytes(p) for p in model.parameters()) + scale_bytes(model)


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients that exist now (call after backward, before zero_grad)."""
    return sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq and a scalar step per parameter)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and (key := _storage_key(v)) not in seen:
                seen.add(key)
                total += tensor_bytes(v)
    return total


class _Saved:
    """What the pack hook hands autograd: alive exactly as long as the graph keeps the tensor."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor):
        self.t = t


class SavedTensorMeter:
    """Bytes autograd saves for backward inside ``with meter:``, read after the forward and before backward.

    Counts the tensors the graph still holds when read (a node freed during the forward no longer counts), each
    storage once (a view and its base, or one input saved by several ops, are one storage), whole storages (a
    saved slice keeps its whole storage alive). Parameters and buffers of ``model`` are excluded: they are
    weights, not activations."""

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self._live: weakref.WeakSet[_Saved] = weakref.WeakSet()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> _Saved:
        s = _Saved(t)
        self._live.add(s)
        return s

    @staticmethod
    def _unpack(s: _Saved) -> torch.Tensor:
        return s.t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _weight_keys(self) -> set:
        if self.model is None:
            return set()
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return {k for t in tensors if (k := _storage_key(t)) is not None}

    def saved_bytes(self) -> int:
        skip, seen, total = self._weight_keys(), set(), 0
        for s in list(self._live):
            key = _storage_key(s.t)
            if key is None or key in skip or key in seen:
                continue
            seen.add(key)
            total += s.t.untyped_storage().nbytes()
        return total


def allocations(fn, min_bytes: int = 1) -> list[int]:
    """Sizes of the CPU allocations ``fn()`` makes (each one, whether freed later or not), sorted, from the
    profiler's memory events: deterministic, unlike time. ``min_bytes`` leaves out smaller ones (e.g. scalars)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= min_bytes)


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """CUDA: the allocator's peak since the last reset. CPU: this process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
