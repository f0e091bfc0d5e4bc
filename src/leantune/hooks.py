"""Schedule hooks: how methods (LISA's layer resampling, Light-PEFT's estimate-then-prune) and users step into
the training loop without the loop knowing any method by name.

The loop calls, in order: ``on_train_begin`` (after a resume too, with ``ctx.step`` set), then for every
optimizer step ``on_step_begin`` (before its first micro-batch), ``extra_loss`` (per micro-batch; e.g. an L1
penalty), ``on_step_end`` (after the optimizer step), and ``on_train_end``. Hook state goes into checkpoints
through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TrainHook:
    def on_train_begin(self, ctx: TrainContext) -> None: ...

    def on_step_begin(self, ctx: TrainContext) -> None: ...

    def extra_loss(self, ctx: TrainContext) -> torch.Tensor | None:
        return None

    def on_step_end(self, ctx: TrainContext) -> None: ...

    def on_train_end(self, ctx: TrainContext) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainContext:
    """What a hook may see and change. ``step`` counts finished optimizer steps."""

    model: nn.Module
    method: Any
    config: Any
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    logs: dict = field(default_factory=dict)  # extra values for this step's metrics line
    _rebuild: Any = None
    _batches: Any = None

    def training_batches(self, n: int) -> list[dict]:
        """The first ``n`` training micro-batches as tensors on the model's device (e.g. calibration data for a
        method that selects what to train from activations or gradients)."""
        return self._batches(n)

    def rebuild_optimizer(self) -> torch.optim.Optimizer:
        """Rebuild the optimizer over the parameters that train now. State of parameters that stay is kept;
        state of parameters that left is dropped (memory freed) and their gradients cleared."""
        self.optimizer = self._rebuild()
        return self.optimizer
