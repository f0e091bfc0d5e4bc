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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """(device, address) of a tensor's storage, or None for tensors without one (sparse). Storages without data
    (meta, or a fake tensor's: ``leantune plan``) are told apart by the storage object itself."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (str(t.device), st.data_ptr() if st.device.type != "meta" else st._cdata)


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


class LiveBytesMeter(TorchDispatchMode):
    """Bytes of every tensor storage alive, and their high-water mark, inside ``with meter:``: each op's outputs
    are counted when they appear and dropped when their storage dies. Works on fake tensors (``leantune plan``),
    where nothing is allocated. ``block``: sizes round up to it (CUDA's caching allocator hands out 512-byte
    multiples). ``fake_scalars``: a Python read of a fake tensor's value (``.item()``, ``float(loss)``) gets 1
    (True for a flag): the plan is about bytes, and a 1 keeps every division and ``**`` defined."""

    def __init__(self, block: int = 1, fake_scalars: bool = True):
        super().__init__()
        self.block = block
        self.fake_scalars = fake_scalars
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> int:
        """Start a new high-water mark from what is alive now; returns that."""
        self.peak = self.current
        return self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _count(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        n = -(-st.nbytes() // self.block) * self.block
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            from torch._subclasses.fake_tensor import DataDependentOutputException

            try:
                return func(*args)  # a fake tensor that knows its value (a constant)
            except DataDependentOutputException:
                dtype = args[0].dtype
                return True if dtype is torch.bool else (1.0 if dtype.is_floating_point or dtype.is_complex else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._count(t)
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def allocator_peak(fn) -> tuple[object, int]:
    """``(fn(), peak)``: the high-water mark of the CPU allocator's bytes while ``fn()`` runs, above what was
    allocated when it began, from the profiler's memory events (every allocation and free, in order). Around a
    marked region, ``fn`` may call :func:`peak_region` to have the peak read only inside it."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # an earlier model freed by the collector inside the window would count as negative bytes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == _REGION]
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    lo, hi = (marks[-1].start_ns(), marks[-1].end_ns()) if marks else (None, None)
    live, peak = 0, 0
    for t, n in mem:
        live += n
        if lo is None or lo <= t <= hi:
            peak = max(peak, live)
    return out, peak


_REGION = "leantune.measured_region"


def peak_region():
    """The region :func:`allocator_peak` reads its peak in (the last one entered)."""
    return torch.profiler.record_function(_REGION)


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """CUDA: the allocator's peak since the last reset. CPU: this process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def _vm_hwm() -> int | None:
    """Linux: this process's own high-water mark (``VmHWM``). ``ru_maxrss`` is no good there for the bench's job
    processes: exec keeps the largest RSS of the process image it replaced, so a child started by a big parent
    reports at least the parent's RSS (measured: 813 MiB for a child that never held more than 14 MiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
