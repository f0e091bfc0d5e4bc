"""The few collectives that code below the training loop needs (ground floor: imports nothing of leantune's).

Everything here is a no-op in a single process, so methods and ``prune/`` call it unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all processes (a new tensor; ``t`` itself in a single process)."""
    if world_size() == 1:
        return t
    # NCCL reduces only GPU tensors; gloo takes them where they are
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all processes: a statistic that is linear in the gradient, taken from each rank's
    local gradient, becomes the statistic of the averaged (global) gradient."""
    n = world_size()
    return t if n == 1 else sum_over_ranks(t) / n
