"""Bridges to Hugging Face's ``transformers.Trainer`` (and TRL's trainers, which subclass it).

``LisaCallback`` runs LISA's schedule inside a Trainer whose model carries ``leantune.apply(model, "lisa")``:

    method = leantune.apply(model, "lisa", gamma=2, period=20)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LisaCallback()])
    trainer.train()
    leantune.save(model, "out/lisa")      # the blocks that changed plus the always-on parts

Unlike the reference callback, which only flips ``requires_grad``, it makes the memory behaviour real:
- the Trainer builds its optimizer over *every* block (the callback unfreezes them all when the Trainer is
  created), so no block is left out because it was frozen at that moment (LMFlow#726); the Trainer's own
  weight-decay grouping and LR scheduler stay as they are;
- frozen blocks have ``grad`` None, so AdamW makes no state for them, and at every switch the callback deletes
  the moments of the blocks that leave (memory freed) — blocks that join start fresh.
Switches happen in ``on_step_begin``, before the first micro-batch of an optimizer step, so gradient
accumulation is safe. On ``resume_from_checkpoint`` the draws follow ``state.global_step``, so they match an
uninterrupted run.
"""

from __future__ import annotations

from transformers import TrainerCallback


class LisaCallback(TrainerCallback):
    """LISA's layer schedule for ``transformers.Trainer`` / TRL. Pass it in ``Trainer(callbacks=[...])``."""

    def __init__(self, method=None):
        self.method = method  # None: read model.leantune_method when the Trainer starts
        self.period: int | None = None

    def _lisa(self, model):
        method = self.method if self.method is not None else getattr(model, "leantune_method", None)
        if method is None or method.name != "lisa":
            found = "no leantune method" if method is None else f"method {method.name!r}"
            raise ValueError(f"LisaCallback: the Trainer's model carries {found}; call "
                             "leantune.apply(model, 'lisa', ...) before creating the Trainer")
        self.method = method
        return method

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # The Trainer builds its optimizer from parameters with requires_grad: make it see every candidate.
        for p in self._lisa(model).candidate_parameters():
            p.requires_grad_(True)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        method = self._lisa(model)
        if args.world_size > 1 and args.ddp_find_unused_parameters is False:
            raise ValueError("LisaCallback under DDP needs ddp_find_unused_parameters=True: the frozen blocks get "
                             "no gradient, and DDP must be told to expect that")
        if optimizer is not None:
            have = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = sum(id(p) not in have for p in method.candidate_parameters())
            if missing:
                raise ValueError(
                    f"LisaCallback: the optimizer misses {missing} of the parameters LISA may train, so the blocks "
                    "frozen when it was built would never train. Pass the callback in Trainer(callbacks=[...]) "
                    "(not add_callback after), or build your optimizer over method.candidate_parameters()"
                )
        step = state.global_step
        method.mark_trained_through(step)  # a resumed run: the blocks drawn before this step changed
        self.period = method.period_of(step)
        method.activate(method.draw(self.period))
        self._drop_frozen_state(method, optimizer)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        method = self._lisa(model)
        period = method.period_of(state.global_step)
        if period != self.period:
            self.period = period
            method.activate(method.draw(period))
            self._drop_frozen_state(method, optimizer)

    @staticmethod
    def _drop_frozen_state(method, optimizer) -> None:
        """Delete the AdamW moments of every parameter that does not train now (freed, not idle)."""
        if optimizer is None:
            return
        active = {id(p) for _, p in method.trainable_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in active:
                    optimizer.state.pop(p, None)
                    p.grad = None
