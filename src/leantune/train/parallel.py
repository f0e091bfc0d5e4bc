"""Data parallelism for the loop: one process (nothing to do), DDP, or FSDP2 — chosen once, known to no method.

Launch with ``torchrun --nproc_per_node N -m leantune.cli train ...`` or ``accelerate launch -m leantune.cli
train ...``; accelerate sets up the process group and the device. Every strategy gives each process its own shard
of the global batch and keeps the update equal to a single process's on the whole batch:

* ``ddp`` with a fixed trainable set: PyTorch's ``DistributedDataParallel`` (through accelerate), gradients
  averaged while backward runs.
* ``ddp`` for a method whose trainable set changes during the run (``Capabilities.changes_trainable``: LISA's
  draws, Light-PEFT's prune): DDP fixes its parameters and buckets when it wraps, so instead the gradients of what
  trains *now* are averaged after the step's last micro-batch, in one flat all-reduce. No
  ``find_unused_parameters`` scan on every step; the cost is that the all-reduce does not overlap backward.
* ``fsdp``: ``torch.distributed.fsdp.fully_shard`` on every transformer block (from the anatomy) and on the root;
  parameters, gradients and AdamW state are sharded (per parameter, so a unit holds frozen and trainable tensors
  alike). The adapter and checkpoints gather the method's tensors only (``full_state``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..dist import sum_over_ranks

STRATEGIES = ("auto", "no", "ddp", "fsdp")


class Parallel:
    """What the loop asks of a strategy."""

    name = "no"

    def __init__(self, acc):
        self.acc = acc
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.is_main = acc.is_main_process

    def wrap(self, model: nn.Module, method) -> nn.Module:
        return self.acc.prepare_model(model)

    def no_sync(self, wrapped: nn.Module, last: bool):
        """The context for one micro-batch's backward: gradients are reduced on the step's last one only."""
        return contextlib.nullcontext()

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        """After the step's last backward: make every rank's gradients the global average (if not done yet)."""

    def sum(self, value: float) -> float:
        """A number summed over all ranks (token counts, loss sums)."""
        if self.world == 1:
            return value
        return float(sum_over_ranks(torch.tensor([float(value)], dtype=torch.float64)))

    def full_state(self, method, training: bool = False) -> dict[str, torch.Tensor]:
        """The method's tensors (``training``: what a checkpoint holds), whole, on every rank (a collective under
        FSDP: call it on all ranks)."""
        return method.training_state() if training else method.state()

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state dict with whole tensors, the same whatever the number of ranks (a collective
        under FSDP), so a checkpoint resumes on any number of processes."""
        return optimizer.state_dict()

    def shard_optimizer_state(self, optimizer) -> None:
        """After loading a whole-tensor state dict: give each rank its shards (FSDP)."""

    def broadcast_trainable(self, method) -> None:
        """Make rank 0's trainable values everyone's (the same seed gives the same values; this makes sure)."""

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class DDP(Parallel):
    """PyTorch DDP (through accelerate) for a fixed trainable set; a flat all-reduce of the active gradients when
    the method changes what trains."""

    name = "ddp"

    def wrap(self, model, method):
        self.manual = method.capabilities.changes_trainable
        if not self.manual:
            return self.acc.prepare_model(model)
        model.to(self.acc.device)
        self.broadcast_trainable(method)
        return model

    def no_sync(self, wrapped, last):
        if self.manual or last:
            return contextlib.nullcontext()
        return self.acc.no_sync(wrapped)

    def sync_grads(self, params):
        if not self.manual:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):
            raise RuntimeError("ddp: a trainable parameter got no gradient on this rank; every rank must train the "
                               "same tensors")
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_trainable(self, method):
        with torch.no_grad():
            for _, p in method.trainable_parameters():
                dist.broadcast(p.data, src=0)


class FSDP(Parallel):
    """FSDP2: one ``fully_shard`` unit per transformer block, then the root."""

    name = "fsdp"

    def wrap(self, model, method):
        from torch.distributed.fsdp import fully_shard

        if not method.capabilities.fsdp:
            raise ValueError(f"method {method.name!r} cannot train under FSDP: {method.capabilities.fsdp_refusal}; "
                             "use --distributed ddp")
        model.to(self.acc.device)
        before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
        for block in method.anatomy.blocks:
            fully_shard(block.module)
        fully_shard(model)
        after = dict(model.named_parameters(remove_duplicate=False))
        method.rebind_parameters({id(p): after[n] for n, p in before.items() if n in after})  # sharded objects
        return model

    def no_sync(self, wrapped, last):
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_state(self, method, training: bool = False):
        return {k: _whole(v) for k, v in (method.training_state() if training else method.state()).items()}

    def optimizer_state(self, optimizer):
        sd = optimizer.state_dict()
        return {**sd, "state": {i: {k: _whole(v) for k, v in st.items()} for i, st in sd["state"].items()}}

    def shard_optimizer_state(self, optimizer):
        from torch.distributed.tensor import DTensor, distribute_tensor

        for p, st in optimizer.state.items():
            if isinstance(p, DTensor):
                for k, v in st.items():
                    if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                        st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def make(strategy: str, acc) -> Parallel:
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed={strategy!r}: use one of {', '.join(STRATEGIES)}")
    if acc.num_processes == 1 or strategy == "no":
        if strategy == "no" and acc.num_processes > 1:
            raise ValueError(f"distributed='no' but {acc.num_processes} processes were launched; use ddp or fsdp")
        return Parallel(acc)
    return FSDP(acc) if strategy == "fsdp" else DDP(acc)
