"""Light-PEFT's estimate-then-prune schedule, as a training-loop hook (the loop's TrainHook protocol).

Steps ``[0, E)`` are the estimation phase: masks and adapters train, the L1 penalty ``λ·Σ|m|`` is added to the
loss, and the adapter importance is collected during the second half ``[E // 2, E)`` (with
``foundation_score="taylor"``, the masks' Taylor scores over the whole phase). After optimizer step E
the method prunes itself in flight, then the optimizer is rebuilt fresh (no state carried over) and training
goes on. The plan is the hook's checkpoint state, so a resumed run rebuilds the pruned shapes before the
adapter tensors are loaded.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("leantune")

MIN_ESTIMATION_STEPS = 20


def estimation_steps(steps: int, fraction: float, max_steps: int) -> int:
    """``steps`` when given (> 0), else ``fraction`` of the run; at least MIN_ESTIMATION_STEPS either way."""
    wanted = steps if steps > 0 else round(fraction * max_steps)
    return max(MIN_ESTIMATION_STEPS, int(wanted))


class EarlyPruneSchedule:
    """Drives one LightPeft method (``method.prune()``, ``method.apply_plan(plan)``, ``method.masks``)."""

    def __init__(self, method):
        self.method = method
        self.estimation_steps: int | None = None

    def on_train_begin(self, ctx) -> None:
        if self.method.pruned:
            return
        cfg = self.method.config
        # a resumed run keeps the length its checkpoint was estimating with, whatever max_steps says now
        E = self.estimation_steps or estimation_steps(cfg.estimation_steps, cfg.estimation_fraction, ctx.config.max_steps)
        if E >= ctx.config.max_steps:
            raise ValueError(
                f"light_peft: the estimation phase takes {E} optimizer steps (at least {MIN_ESTIMATION_STEPS}), "
                f"but the run has max_steps={ctx.config.max_steps}; raise max_steps so that training continues "
                "after pruning, or lower estimation_steps"
            )
        if ctx.step >= E:
            raise ValueError(
                f"light_peft: resuming at step {ctx.step}, past the end of estimation ({E}), but the checkpoint "
                "holds no prune plan; it was written by another method or config"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                "light_peft prunes the model in flight, which changes parameter shapes under DistributedDataParallel; "
                "run the estimation phase on one process (then continue from the saved adapter on several)"
            )
        self.estimation_steps = E

    def on_step_begin(self, ctx) -> None:
        if not self.method.pruned:
            E = self.estimation_steps
            self.method.importance.active = E // 2 <= ctx.step < E
            if self.method.masks is not None:
                # the masks' Taylor scores read the whole phase: twice the steps, and the early ones see the masks
                # near 1.0, where |m ⊙ g| is Michel et al.'s head importance
                self.method.masks.active = ctx.step < E

    def extra_loss(self, ctx):
        masks = self.method.masks
        if self.method.pruned or masks is None or not masks.parameters() or self.method.config.mask_l1 == 0:
            return None
        return self.method.config.mask_l1 * masks.l1()

    def on_step_end(self, ctx) -> None:
        if self.method.pruned:
            return
        self.method.importance.end_step()
        self.method.importance.active = False
        masks = self.method.masks
        if masks is not None:
            masks.end_step(l1=self.method.config.mask_l1)
            masks.active = False
        if ctx.step == self.estimation_steps:
            plan = self.method.prune()
            ctx.logs.update({f"prune_{k}": v for k, v in plan.counts.items() if isinstance(v, (int, float))})
            ctx.optimizer.state.clear()  # a fresh optimizer: nothing carried over from estimation
            ctx.rebuild_optimizer()
            log.info("light_peft: pruned at step %d: %s", ctx.step, plan.counts)

    def on_train_end(self, ctx) -> None: ...

    def state_dict(self) -> dict:
        return {"plan": self.method.config.plan, "estimation_steps": self.estimation_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("plan") is not None and not self.method.pruned:
            from .plan import PrunePlan

            self.method.apply_plan(PrunePlan.from_dict(state["plan"]))
        if state.get("estimation_steps") is not None:
            self.estimation_steps = state["estimation_steps"]
