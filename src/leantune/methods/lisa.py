"""LISA — layerwise importance-sampled AdamW (Pan et al., NeurIPS 2024, arXiv 2403.17919).

The always-on parts (token and position embeddings, LM head, final norm by default) train for the whole run.
Every ``period`` optimizer steps, ``gamma`` of the model's blocks are drawn uniformly without replacement and only
they train until the next draw; all other blocks are frozen. The draw for period p is a pure function of
(seed, p), so a resumed run draws the same blocks.

Optimizer state follows the active set: at a switch the schedule hook freezes the blocks that leave
(``requires_grad`` False, ``grad`` None) and rebuilds the optimizer, so their AdamW moments are freed and the
blocks that join start from fresh moments (the reference callback only flips ``requires_grad`` and keeps every
moment it ever made, so memory climbs toward full fine-tuning's). The optimizer is always built over the blocks
that are active *now*, so no block is left out because it was frozen when the optimizer was first built.

The change lives in the base weights themselves, as in full fine-tuning: no inference overhead, and
``merge``/``unmerge`` have nothing to move. ``state()`` holds the blocks that were ever active plus the always-on
parts. ``remove()`` restores the base only with ``keep_base=true``, which copies each block to CPU memory the
first time it becomes active (and the always-on parts at ``apply``): only what training may change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import Anatomy, dequantized_weight, is_quantized_layer
from ..hooks import TrainContext, TrainHook
from ..quant import dequantize_layer_, requantize_layer_, was_quantized
from .base import Capabilities, ConfigError, Method, MethodConfig, check_state_keys, register, warn_once

ALWAYS_ON_PARTS = ("embed", "head", "final_norm", "rest")
ON_LEAVE = ("keep", "requantize")


def draw_blocks(seed: int, period: int, n_blocks: int, gamma: int) -> tuple[int, ...]:
    """The blocks that train in ``period``: ``gamma`` of ``n_blocks``, uniform without replacement, sorted.

    A pure function of its arguments (a string seed goes through SHA-512, so it does not depend on the Python
    process or its hash seed)."""
    rng = random.Random(f"leantune-lisa:{seed}:{period}")
    return tuple(sorted(rng.sample(range(n_blocks), gamma)))


@dataclass
class LisaConfig(MethodConfig):
    gamma: int = 2  # blocks that train at a time (paper: 2 at 7B, 4 at 70B)
    period: int = 10  # optimizer steps between draws (paper: 10 to 50 changes little)
    always_on: str = "embed,head,final_norm"  # comma list of embed, head, final_norm, rest; "none" for nothing
    seed: int = 0
    keep_base: bool = False  # copy what training may change to CPU memory so that remove() can restore the base
    train_router: bool = False  # mixture of experts: the active blocks' routers train too (frozen by default)
    # quantized base: what a block's dequantized, trained linear layers become when it leaves the active set:
    # "keep" (stay full precision, frozen: nothing trained is lost, memory grows by the blocks ever trained) or
    # "requantize" (quantized again from the trained values: memory back to 4/8 bits, the update rounded)
    on_leave: str = "keep"

    def parts(self) -> list[str]:
        """The always-on parts as a list (empty for "none" or "")."""
        text = self.always_on.strip().lower()
        if text in ("", "none"):
            return []
        return [p.strip() for p in text.split(",") if p.strip()]

    def validate(self):
        if not isinstance(self.gamma, int) or self.gamma < 1:
            raise ConfigError(f"lisa: gamma (blocks trained at a time) must be >= 1, got {self.gamma!r}")
        if not isinstance(self.period, int) or self.period < 1:
            raise ConfigError(f"lisa: period (optimizer steps between draws) must be >= 1, got {self.period!r}")
        if self.on_leave not in ON_LEAVE:
            raise ConfigError(f"lisa: on_leave must be one of {', '.join(ON_LEAVE)}, got {self.on_leave!r}")
        bad = [p for p in self.parts() if p not in ALWAYS_ON_PARTS]
        if bad:
            raise ConfigError(
                f"lisa: always_on has unknown part(s) {bad}; use a comma list of {', '.join(ALWAYS_ON_PARTS)}, "
                "or 'none'"
            )


@register("lisa")
class Lisa(Method):
    family = "selective"
    description = (
        "LISA: embeddings and head always train; every K optimizer steps γ randomly drawn blocks train and the "
        "rest are frozen, with optimizer state only for what trains."
    )
    config_cls = LisaConfig
    default_lr = 5e-5  # whole blocks train, as in full fine-tuning: the same learning rate

    def _apply(self, model: nn.Module, anat: Anatomy) -> None:
        cfg = self.config
        n = len(anat.blocks)
        if cfg.gamma > n:
            raise ConfigError(f"lisa: gamma={cfg.gamma} but this {anat.model_type} model has {n} blocks; "
                              f"choose gamma <= {n}")
        # a quantized base: the blocks' quantized layers, dequantized while their block trains (and a quantized
        # head that is always on, now)
        self.float_dtype = anat.embed.weight.dtype
        if "head" in cfg.parts() and anat.head is not None and is_quantized_layer(anat.head):
            dequantize_layer_(anat.head, self.float_dtype)
        self.qlayers: list[dict[str, nn.Module]] = [
            {f"{anat.name_of(m)}.weight": m for m in b.module.modules() if is_quantized_layer(m)} for b in anat.blocks
        ]
        names = {id(p): name for name, p in model.named_parameters()}  # tied weights under their first name
        self.always_on = self._select_always_on(model, anat, names)
        on_ids = {id(p) for p in self.always_on.values()}
        if not cfg.train_router:  # a router stays frozen even in an active block
            on_ids |= {id(p) for _, r in anat.routers() for p in r.parameters()}
        self.block_params: list[dict[str, nn.Parameter]] = [
            {names[id(p)]: p for p in b.module.parameters() if id(p) not in on_ids} for b in anat.blocks
        ]
        self.snapshot: dict[str, torch.Tensor] | None = {} if cfg.keep_base else None
        self._snapshot(self.always_on)
        for p in self.always_on.values():
            p.requires_grad_(True)
        self.changed: set[int] = set()  # blocks that were ever active: the ones state() holds
        self.active: tuple[int, ...] = ()
        self.activate(self.draw(0))

    def _select_always_on(self, model, anat, names) -> dict[str, nn.Parameter]:
        parts = self.config.parts()
        modules = {"embed": [anat.embed, *anat.extra_embeds], "head": [anat.head], "final_norm": [anat.final_norm]}
        in_blocks = {id(p) for b in anat.blocks for p in b.module.parameters()}
        chosen: list[nn.Parameter] = []
        for part in parts:
            if part == "rest":  # everything outside the blocks (e.g. BERT's embedding norm and MLM transform)
                chosen += [p for p in model.parameters() if id(p) not in in_blocks]
            else:
                chosen += [p for m in modules[part] if m is not None for p in m.parameters()]
        head_w = getattr(anat.head, "weight", None)
        if head_w is not None and head_w is anat.embed.weight and ("embed" in parts) != ("head" in parts):
            warn_once("lisa: this model ties its LM head to the token embedding, so always_on="
                      f"{self.config.always_on!r} trains both")
        return {names[id(p)]: p for p in chosen}  # a dict: tied or repeated parameters once

    # -- the schedule ---------------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.block_params)

    def draw(self, period: int) -> tuple[int, ...]:
        return draw_blocks(self.config.seed, period, self.n_blocks, self.config.gamma)

    def period_of(self, step: int) -> int:
        """The period that optimizer step ``step`` (0-based) belongs to."""
        return step // self.config.period

    def activate(self, blocks) -> None:
        """Train exactly ``blocks`` (plus the always-on parts); every other block is frozen and drops its grad."""
        blocks = tuple(sorted(set(blocks)))
        if any(not 0 <= i < self.n_blocks for i in blocks):
            raise ValueError(f"lisa: block indices {blocks} out of range for a model with {self.n_blocks} blocks")
        for i, params in enumerate(self.block_params):
            on = i in blocks
            self._set_precision(i, on)
            for p in params.values():
                if not on:
                    p.grad = None
                p.requires_grad_(on)
        for i in blocks:
            if i not in self.changed:
                self._snapshot(self.block_params[i])  # still the base values: the block has not trained yet
                self.changed.add(i)
        self.active = blocks

    def _set_precision(self, i: int, on: bool) -> None:
        """A quantized base: block ``i``'s quantized layers become full-precision trainable copies when it joins
        (dequantized in place), and quantized again when it leaves with ``on_leave="requantize"``."""
        for name, mod in self.qlayers[i].items():
            if on and is_quantized_layer(mod):
                self.block_params[i][name] = dequantize_layer_(mod, self.float_dtype)
            elif not on and was_quantized(mod) and self.config.on_leave == "requantize":
                requantize_layer_(mod)
                self.block_params[i][name] = mod.weight

    def mark_trained_through(self, steps: int) -> None:
        """Record as changed every block drawn in the first ``steps`` optimizer steps (for a resumed run)."""
        if steps <= 0:
            return
        for p in range(self.period_of(steps - 1) + 1):
            if len(self.changed) == self.n_blocks:
                break
            self.changed.update(self.draw(p))  # no snapshot: these may hold trained values already

    def candidate_parameters(self) -> list[nn.Parameter]:
        """Every parameter the schedule may ever train: the always-on parts and all blocks."""
        seen, out = set(), []
        for p in [*self.always_on.values(), *(p for b in self.block_params for p in b.values())]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def rebind_parameters(self, mapping):
        super().rebind_parameters(mapping)
        self.always_on = {n: mapping.get(id(p), p) for n, p in self.always_on.items()}
        self.block_params = [{n: mapping.get(id(p), p) for n, p in b.items()} for b in self.block_params]

    def schedule(self) -> LisaSchedule:
        return LisaSchedule(self)

    # -- the contract ---------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(mergeable=True, restores_base=self.config.keep_base, needs_schedule=True,
                            changes_trainable=True, quantized_base=not self.config.keep_base,
                            quantized_refusal="keep_base=true copies the base to restore it, which a quantized "
                            "base does not need: reload it instead (keep_base=false)")

    def trainable_parameters(self):
        """The always-on parts and the active blocks, always in the same order (optimizer state maps by order)."""
        self._model()
        yield from self.always_on.items()
        for i in self.active:
            yield from self.block_params[i].items()

    def state(self) -> dict[str, torch.Tensor]:
        value = self.masters.value  # the float32 master of what trains now on a low-precision base
        out = {n: value(p) for n, p in self.always_on.items()}
        for i in sorted(self.changed):
            quantized = self.qlayers[i]  # a re-quantized layer: the values it computes with, in full precision
            out.update({n: dequantized_weight(quantized[n]).to(self.float_dtype)
                        if n in quantized and is_quantized_layer(quantized[n]) else value(p)
                        for n, p in self.block_params[i].items()})
        return out

    def num_changed(self) -> int:
        return sum(t.numel() for t in self.state().values())

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put saved tensors onto the base: the always-on parts and the whole blocks the file holds."""
        self._model()
        blocks = {i for i, params in enumerate(self.block_params) if any(n in state for n in params)}
        for i in blocks:  # a quantized base: the saved blocks are held in full precision, as saved
            for name, mod in self.qlayers[i].items():
                if is_quantized_layer(mod):
                    self.block_params[i][name] = dequantize_layer_(mod, self.float_dtype)
        expected = dict(self.always_on)
        for i in blocks:
            expected.update(self.block_params[i])
        check_state_keys(self.name, expected, state)  # also catches a block saved only in part
        with torch.no_grad():
            for i in sorted(blocks):
                self._snapshot(self.block_params[i])  # kept only once per tensor: the first copy is the base
            for k, v in state.items():
                self.masters.assign(expected[k], v)
        self.changed |= blocks

    # The tuned values already sit in the weights: merge and unmerge have nothing to move.
    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def remove(self) -> nn.Module:
        """Take the method off: the base model back, bitwise (needs ``keep_base=true``)."""
        self._model()  # raises unless applied
        if self.snapshot is None:
            raise RuntimeError("method 'lisa' kept no copy of the base weights (keep_base=false); reload the base "
                               "model, or apply lisa with keep_base=true")
        params = dict(self.always_on)
        for i in self.changed:
            params.update(self.block_params[i])
        lost = sorted(n for n in params if n not in self.snapshot)
        if lost:
            raise RuntimeError(f"method 'lisa' has no base copy of {lost[:3]}{'...' if len(lost) > 3 else ''}: "
                               "they were already trained when this process first saw them (a resumed run); "
                               "reload the base model")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.snapshot[n])
        return self._release()

    def unload(self) -> nn.Module:
        """Nothing to fold (the tuned values are the weights): drop the method and its copy of the base."""
        self._model()  # raises unless applied
        self.snapshot = None
        return self._release()

    def _snapshot(self, params: dict[str, nn.Parameter]) -> None:
        if self.snapshot is not None:
            for n, p in params.items():
                if n not in self.snapshot:
                    self.snapshot[n] = p.detach().to("cpu", copy=True)  # CPU: accelerator memory is what LISA saves


class LisaSchedule(TrainHook):
    """Draws the active blocks at period starts (before the first micro-batch of an optimizer step) and rebuilds
    the optimizer, so that AdamW state exists for exactly the parameters that train.

    On resume the loop builds the optimizer after ``on_train_begin`` and then loads the checkpoint's optimizer
    state into it, so ``on_train_begin`` activates the blocks of the last *finished* step (those the saved state
    belongs to); the switch to a new period, if one starts there, happens in ``on_step_begin`` as it would have
    in an uninterrupted run."""

    def __init__(self, method: Lisa):
        self.method = method
        self.period: int | None = None
        self._resumed: dict | None = None

    def on_train_begin(self, ctx: TrainContext) -> None:
        m, done = self.method, ctx.step
        self.period = m.period_of(done - 1) if done > 0 else 0
        blocks = m.draw(self.period)
        if self._resumed is not None and tuple(self._resumed.get("active", ())) != blocks:
            raise ValueError(
                f"lisa: the checkpoint at step {done} was trained with blocks {tuple(self._resumed['active'])} "
                f"active, but gamma={m.config.gamma}, period={m.config.period}, seed={m.config.seed} draw {blocks} "
                "there; resume with the LISA options the run started with, or use a new output folder"
            )
        m.mark_trained_through(done)
        m.activate(blocks)
        if ctx.optimizer is not None:
            ctx.rebuild_optimizer()

    def on_step_begin(self, ctx: TrainContext) -> None:
        m = self.method
        period = m.period_of(ctx.step)
        if period != self.period:
            self.period = period
            blocks = m.draw(period)
            if blocks != m.active:
                m.activate(blocks)
                ctx.rebuild_optimizer()  # frozen blocks' moments are dropped, new blocks start fresh
        ctx.logs["lisa_blocks"] = ",".join(str(i) for i in m.active)

    def state_dict(self) -> dict:
        return {"active": list(self.method.active), "changed": sorted(self.method.changed), "period": self.period}

    def load_state_dict(self, state: dict) -> None:
        self._resumed = dict(state)
        self.method.changed |= {int(i) for i in state.get("changed", [])}
