"""One training step the way leantune's loop takes it, split into its parts so they can be measured.

The loop (``train/loop.py``) runs a whole training; the bench needs single steps of several models, side by
side, with meters around the forward and the backward. :class:`Stepper` takes the loop's steps in the loop's
order: the method's schedule hooks at the same points, the loop's token loss, gradient clipping, AdamW built
over the parameters that train now and rebuilt the loop's way (state kept for parameters that stay).
"""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import TrainContext
from ..train.loop import TrainConfig, build_adamw, token_loss_sum


class Stepper:
    def __init__(self, model: nn.Module, lr: float | None = None, max_steps: int = 100, max_grad_norm: float = 1.0,
                 batch: dict | None = None):
        method = getattr(model, "leantune_method", None)
        if method is None:
            raise ValueError("the model carries no leantune method: apply one before measuring it")
        self.model, self.method = model, method
        self.lr = lr if lr is not None else method.default_lr
        self.config = TrainConfig(max_steps=max_steps, lr=self.lr, max_grad_norm=max_grad_norm, progress=False)
        self.causal = method.anatomy.causal
        if hasattr(model, "config"):
            model.config.use_cache = False  # a training step builds no KV cache
        model.train()
        self.hooks = [h for h in [method.schedule()] if h is not None]
        self.ctx = TrainContext(model=model, method=method, config=self.config)
        self.ctx._rebuild = self._build_optimizer
        if batch is not None:  # the loop offers its first training batches to hooks (e.g. S²FT's calibration)
            self.ctx._batches = lambda n: [batch] * n
        for h in self.hooks:
            h.on_train_begin(self.ctx)
        if self.ctx.optimizer is None:
            self.ctx.optimizer = self._build_optimizer()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ctx.optimizer

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return build_adamw(self.method, self.lr, self.config, self.ctx.optimizer)

    def begin(self) -> None:
        self.ctx.logs = {}
        for h in self.hooks:
            h.on_step_begin(self.ctx)

    def forward(self, batch: dict) -> torch.Tensor:
        loss_sum, n = token_loss_sum(self.model, batch, self.causal)
        loss = loss_sum / max(1, n)
        extra = [e for h in self.hooks if (e := h.extra_loss(self.ctx)) is not None]
        return loss + sum(extra) if extra else loss

    def finish(self) -> None:
        opt = self.ctx.optimizer
        self.method.masters.grads_to_masters()
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        opt.step()
        self.method.masters.write_back()
        opt.zero_grad(set_to_none=True)
        self.ctx.step += 1
        for h in self.hooks:
            h.on_step_end(self.ctx)

    def step(self, batch: dict) -> float:
        self.begin()
        loss = self.forward(batch)
        loss.backward()
        self.finish()
        return float(loss.detach())
