"""Light-PEFT (Gu et al., Findings of ACL 2024): early pruning of the foundation model and of the PEFT modules.

Estimation (a short first part of the run): a PEFT method (LoRA now) trains together with foundation masks
(one scalar per attention head and per FFN channel, L1 penalty); adapter importance is collected in the second
half. Then, in flight: heads and FFN channels with the smallest masks are sliced out of the base, the least
important adapter modules are dropped and half of the remaining ranks are cut; training goes on with a fresh
optimizer. The prune plan sits in the config (``plan``), so ``leantune.load(fresh_base, dir)`` rebuilds the
pruned model from the original base + plan + adapter.

The wrapped PEFT method is pluggable: a ``PeftPruner`` builds it and knows how to drop its modules, cut its
ranks and follow the base's slices. Register one in ``PEFT_PRUNERS`` (bottleneck adapters will join here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import is_conv1d
from ..prune import importance as imp
from ..prune.masks import FoundationMasks
from ..prune.plan import PrunePlan, select_channels, select_heads, select_modules, select_ranks
from ..prune.schedule import EarlyPruneSchedule
from ..prune.surgery import apply_foundation_plan
from .base import Capabilities, ConfigError, Method, MethodConfig, register, warn_once
from .lora import Lora, LoraConfig


@dataclass
class LightPeftConfig(MethodConfig):
    base_method: str = "lora"  # the wrapped PEFT method (see PEFT_PRUNERS)
    # options of the wrapped LoRA (the paper: r=8 on all linear layers)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    rslora: bool = False
    # estimation phase: a step count, or (when 0) a fraction of the run; at least 20 steps either way
    estimation_steps: int = 0
    estimation_fraction: float = 0.04
    mask_l1: float = 1e-4  # λ of the L1 penalty on the foundation masks
    # the masks' learning rate as a multiple of the run's (the reference trains head masks at 100x, FFN masks at 50x)
    head_mask_lr_scale: float = 100.0
    ffn_mask_lr_scale: float = 50.0
    # what goes: fractions of heads and FFN channels removed; fractions of adapter modules and ranks kept
    head_ratio: float = 0.4
    ffn_ratio: float = 0.4
    module_keep: float = 0.25
    rank_keep: float = 0.5
    uniform: bool = False  # the same shape in every layer (a merged model that fits the model's own config)
    # how heads/channels and adapter modules are ranked: the paper's scores, or first-order Taylor scores
    foundation_score: str = "mask"  # "mask": the learned mask values; "taylor": mean |m ⊙ ∂L/∂m|
    module_score: str = "output_ratio"  # "output_ratio": ‖ΔW·x‖ / ‖W·x‖; "taylor": Σ of the module's rank scores
    plan: dict | None = None  # filled in by pruning; set, the method rebuilds the pruned model at apply

    def validate(self):
        if self.base_method not in PEFT_PRUNERS:
            raise ConfigError(
                f"light_peft: base_method {self.base_method!r} cannot be pruned yet; use one of {sorted(PEFT_PRUNERS)}"
            )
        for name in ("head_ratio", "ffn_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"light_peft: {name} is the fraction removed, in [0, 1); got {v}")
        for name in ("module_keep", "rank_keep"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"light_peft: {name} is the fraction kept, in (0, 1]; got {v}")
        if not 0.0 < self.estimation_fraction < 1.0:
            raise ConfigError(f"light_peft: estimation_fraction must be in (0, 1), got {self.estimation_fraction}")
        if self.estimation_steps < 0:
            raise ConfigError(f"light_peft: estimation_steps must be >= 0 (0: use the fraction), got {self.estimation_steps}")
        for name in ("head_mask_lr_scale", "ffn_mask_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"light_peft: {name} multiplies the learning rate and must be > 0, got {getattr(self, name)}")
        if self.foundation_score not in ("mask", "taylor"):
            raise ConfigError(f"light_peft: foundation_score is 'mask' or 'taylor', got {self.foundation_score!r}")
        if self.module_score not in ("output_ratio", "taylor"):
            raise ConfigError(f"light_peft: module_score is 'output_ratio' or 'taylor', got {self.module_score!r}")
        if self.mask_l1 < 0:
            raise ConfigError(f"light_peft: mask_l1 must be >= 0, got {self.mask_l1}")
        PEFT_PRUNERS[self.base_method].validate(self)
        if self.plan is not None and not isinstance(self.plan, dict):
            raise ConfigError(f"light_peft: plan must be a prune plan (a JSON object), got {type(self.plan).__name__}")


# -- the wrapped PEFT method --------------------------------------------------------------------------------


class LoraPruner:
    """LoRA as the wrapped method: A (r, in) is the down projection, B (out, r) the up projection."""

    @staticmethod
    def validate(cfg: LightPeftConfig) -> None:
        try:
            LoraPruner.lora_config(cfg).validate()
        except ConfigError as e:
            raise ConfigError(f"light_peft: {e}") from None

    @staticmethod
    def lora_config(cfg: LightPeftConfig) -> LoraConfig:
        return LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, rslora=cfg.rslora)

    def __init__(self, model: nn.Module, anat, cfg: LightPeftConfig):
        self.method = Lora(self.lora_config(cfg))
        self.method.model, self.method.anatomy = model, anat
        self.method._apply(model, anat)

    @property
    def layers(self) -> dict[str, nn.Module]:
        return self.method.layers

    def units(self) -> dict[str, imp.AdapterUnit]:
        def delta(mod):
            return lambda x: F.linear(F.linear(x, mod.lora.A), mod.lora.B) * mod.lora.scale

        # LoRA's forward adds its term itself, so the output forward hooks see is W·x + b + ΔW·x
        return {n: imp.AdapterUnit(m, m.lora.A, m.lora.B, delta(m), output_has_delta=True) for n, m in self.layers.items()}

    def ranks(self) -> dict[str, int]:
        return {n: m.lora.A.shape[0] for n, m in self.layers.items()}

    def drop_modules(self, names) -> None:
        """Take these LoRA branches off their layers (hook and weights)."""
        for name in names:
            self.method.detach(name)

    @torch.no_grad()
    def keep_ranks(self, name: str, idx: list[int]) -> None:
        """Keep ranks ``idx``: rows of A, columns of B; the scale stays α / r_original."""
        lora = self.layers[name].lora
        i = torch.tensor(idx, dtype=torch.long, device=lora.A.device)
        lora.A = nn.Parameter(lora.A[i].contiguous(), requires_grad=lora.A.requires_grad)
        lora.B = nn.Parameter(lora.B[:, i].contiguous(), requires_grad=lora.B.requires_grad)

    @torch.no_grad()
    def follow_slice(self, layer: nn.Module, side: str, idx: torch.Tensor) -> None:
        """The base layer lost output rows (B follows) or input columns (A follows)."""
        lora = getattr(layer, "lora", None)
        if lora is None:
            return
        idx = idx.to(lora.A.device)
        if side == "out":
            lora.B = nn.Parameter(lora.B[idx].contiguous(), requires_grad=lora.B.requires_grad)
        else:
            lora.A = nn.Parameter(lora.A[:, idx].contiguous(), requires_grad=lora.A.requires_grad)

    @torch.no_grad()
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """New tensors W + scale·B·A for every adapted layer (the live weights are not touched)."""
        out = {}
        for name, mod in self.layers.items():
            w = mod.weight
            delta = mod.lora.delta_weight().float()
            delta = delta.t() if is_conv1d(mod) else delta  # Conv1D stores (in, out)
            out[f"{name}.weight"] = (w.float() + delta).to(w.dtype) if not mod.lora.merged else w.detach().clone()
        return out

    def adapter_prefixes(self) -> list[str]:
        """State-dict prefixes of the adapter's own modules (left out of a merged export)."""
        return [f"{n}.lora." for n in self.layers]


PEFT_PRUNERS: dict[str, type] = {"lora": LoraPruner}


# -- the method ---------------------------------------------------------------------------------------------


@register("light_peft")
class LightPeft(Method):
    family = "pruning"
    description = (
        "Light-PEFT: LoRA + foundation masks for a short estimation phase, then heads, FFN channels, LoRA modules "
        "and ranks pruned in flight; training goes on with the smaller model."
    )
    config_cls = LightPeftConfig
    default_lr = 5e-4

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            mergeable=True,
            restores_base=False,
            mixed_batch=False,  # the base itself is pruned: it cannot be shared with other adapters
            prunable=False,
            needs_schedule=self.config.plan is None,
            schedule_ends=self.config.plan is None,
            inference_overhead="extra_ffn",
        )

    @property
    def pruned(self) -> bool:
        return self.plan is not None

    def _apply(self, model, anat):
        cfg = self.config
        self.peft = PEFT_PRUNERS[cfg.base_method](model, anat, cfg)
        self.masks: FoundationMasks | None = None
        self.importance: imp.AdapterImportance | None = None
        self.plan: PrunePlan | None = None
        if cfg.plan is not None:
            self.apply_plan(PrunePlan.from_dict(cfg.plan))
            return
        self.masks = FoundationMasks(anat, heads=cfg.head_ratio > 0, ffn=cfg.ffn_ratio > 0,
                                     taylor=cfg.foundation_score == "taylor")
        self.importance = imp.AdapterImportance(model, self.peft.units())

    # -- what trains --------------------------------------------------------------------------------------
    def trainable_parameters(self):
        yield from self.peft.method.trainable_parameters()
        if self.masks is not None:
            yield from self.masks.named.items()

    def optimizer_options(self) -> dict[str, dict[str, float]]:
        if self.masks is None:
            return {}
        scale = {"head_mask": self.config.head_mask_lr_scale, "ffn_mask": self.config.ffn_mask_lr_scale}
        return {n: {"lr_scale": scale[n.rsplit(".", 1)[1]]} for n in self.masks.named}

    def num_changed(self) -> int:
        return self.peft.method.num_changed()

    def state(self) -> dict[str, torch.Tensor]:
        out = dict(self.peft.method.state())
        if not self.pruned:  # in the middle of estimation (a checkpoint): masks and importance sums too
            out.update(self.masks.named)
            out.update(self.importance.state("light_peft.importance"))
            out.update(self.masks.state("light_peft.masks"))
        return out

    def schedule(self):
        return None if self.pruned else EarlyPruneSchedule(self)

    # -- pruning ------------------------------------------------------------------------------------------
    def make_plan(self) -> PrunePlan:
        """Turn the masks and the adapter importance into a plan (explicit counts included)."""
        cfg, anat = self.config, self.anatomy
        plan = PrunePlan(len(anat.blocks), anat.n_heads, anat.n_kv_heads, anat.head_dim, anat.intermediate)
        n_layers = len(anat.blocks)
        taylor = cfg.foundation_score == "taylor"
        if self.masks is not None and self.masks.head_masks:
            scores = self.masks.taylor_scores("head_mask") if taylor else self.masks.head_scores()
            plan.heads, plan.kv_heads = select_heads(
                scores, anat.n_kv_heads, cfg.head_ratio, cfg.uniform, divisor_of=anat.hidden
            )
        if self.masks is not None and self.masks.ffn_masks:
            scores = self.masks.taylor_scores("ffn_mask") if taylor else self.masks.ffn_scores()
            plan.ffn = select_channels(scores, cfg.ffn_ratio, cfg.uniform)
        rank_scores = self.importance.rank_scores()
        if cfg.module_score == "taylor":
            module_scores = {n: float(rank_scores[n].sum()) for n in self.importance.names}
        else:
            module_scores = self.importance.module_scores()
        plan.modules = select_modules(module_scores, cfg.module_keep)
        plan.ranks = select_ranks({n: rank_scores[n] for n in plan.modules}, cfg.rank_keep)
        ranks = self.peft.ranks()
        heads = [len(h) for h in plan.heads] if plan.heads else [anat.n_heads] * n_layers
        ffn = [len(c) for c in plan.ffn] if plan.ffn else [anat.intermediate] * n_layers
        plan.counts = {
            "heads_total": anat.n_heads * n_layers,
            "heads_kept": sum(heads),
            "heads_kept_per_layer": heads,
            "kv_heads_kept_per_layer": [len(k) for k in plan.kv_heads] if plan.kv_heads else [anat.n_kv_heads] * n_layers,
            "ffn_total": anat.intermediate * n_layers,
            "ffn_kept": sum(ffn),
            "ffn_kept_per_layer": ffn,
            "modules_total": len(ranks),
            "modules_kept": len(plan.modules),
            "ranks_total": sum(ranks.values()),
            "ranks_of_kept_modules": sum(ranks[n] for n in plan.modules),
            "ranks_kept": sum(len(v) for v in plan.ranks.values()),
        }
        return plan

    def prune(self) -> PrunePlan:
        """Prune now (the schedule calls this at the end of estimation); returns the plan."""
        if self.pruned:
            raise RuntimeError("light_peft: the model is already pruned")
        before_base = sum(p.numel() for n, p in self._model().named_parameters() if not p.requires_grad)
        before_trainable = sum(p.numel() for _, p in self.peft.method.trainable_parameters())
        plan = self.make_plan()
        self.apply_plan(plan)
        after_base = sum(p.numel() for n, p in self._model().named_parameters() if not p.requires_grad)
        plan.counts.update(
            base_params_before=before_base,
            base_params_after=after_base,
            adapter_params_before=before_trainable,
            adapter_params_after=self.num_trainable(),
        )
        self.config.plan = plan.to_dict()
        return plan

    def apply_plan(self, plan: PrunePlan) -> None:
        """Drop the masks and importance hooks, slice the base and the adapter as the plan says."""
        if self.masks is not None:
            self.masks.detach()
            self.masks = None
        if self.importance is not None:
            self.importance.close()
            self.importance = None
        if plan.modules is not None:
            unknown = sorted(set(plan.modules) - set(self.peft.layers))
            if unknown:
                raise ValueError(f"light_peft: the plan keeps adapter modules {unknown[:3]} this model has none of")
            self.peft.drop_modules([n for n in self.peft.layers if n not in set(plan.modules)])
        apply_foundation_plan(self.anatomy, plan, self.peft.follow_slice)
        for name, idx in (plan.ranks or {}).items():
            r = self.peft.ranks()[name]
            if idx[-1] >= r:
                raise ValueError(f"light_peft: the plan keeps rank {idx[-1]} of {name!r}, which has rank {r}")
            self.peft.keep_ranks(name, idx)
        self.plan = plan
        self.config.plan = plan.to_dict()

    # -- merge / remove -----------------------------------------------------------------------------------
    def merge(self) -> None:
        self.peft.method.merge()
        self.merged = True

    def unmerge(self) -> None:
        self.peft.method.unmerge()
        self.merged = False

    def remove(self) -> nn.Module:
        if self.pruned:
            raise RuntimeError(
                "light_peft: the base model was physically pruned and cannot be given back; reload the base model "
                "(leantune.load(fresh_base, dir) rebuilds the pruned one)"
            )
        self.masks.detach()
        self.importance.close()
        model = self.peft.method.remove()
        model.__dict__.pop("leantune_method", None)
        self.model = None
        return model

    def unload(self) -> nn.Module:
        """After ``merge()``: take LoRA and any masks off, keeping the merged (pruned) weights. Where every layer has
        the same pruned shape and the model's config class can describe it, the config is updated in place so the
        model saves as a plain Hugging Face folder; otherwise it keeps the base config (use
        ``leantune.prune.save_merged``, which writes a folder leantune loads and says why)."""
        if not self.merged:
            raise RuntimeError("light_peft: unload() keeps the weights as they are; call merge() first")
        from ..prune.export import fitting_config

        fitted, why = None, None
        if self.pruned:
            shapes = {k: tuple(v.shape) for k, v in self.base_state_dict(merged=True).items()}
            fitted, why = fitting_config(self._model(), self.plan, shapes)
        if self.masks is not None:
            self.masks.detach()
            self.importance.close()
        model = self.peft.method.unload()
        if fitted is not None:  # in place: every attention module holds this same config object
            current = model.config.to_dict()
            for key, value in fitted.to_dict().items():
                if key != "use_cache" and current.get(key) != value:
                    setattr(model.config, key, value)
        elif why is not None:
            warn_once(f"light_peft: the unloaded model keeps its base config: {why}; save it with "
                      "leantune.prune.save_merged")
        model.__dict__.pop("leantune_method", None)
        self.model = None
        return model

    def save_merged(self, directory, tokenizer=None) -> dict:
        """The pruned, merged model: a plain Hugging Face folder where the pruned shape fits the model's own
        config, else a leantune folder (``leantune.prune.load_merged``); says which and why."""
        from ..prune.export import save_merged

        out = save_merged(self._model(), directory, tokenizer)
        return {"kind": out.kind, "reason": out.reason}

    def base_state_dict(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """The (pruned) base model's own tensors without the adapter's modules; ``merged``: with the adapter folded
        into copies of the adapted weights (the live model is left untouched)."""
        prefixes = tuple(self.peft.adapter_prefixes())
        state = {k: v for k, v in self._model().state_dict().items() if not k.startswith(prefixes)}
        if merged:
            state.update(self.peft.merged_weights())
        elif self.merged:
            raise RuntimeError("light_peft: the adapter is merged into the live weights; unmerge() first")
        return state
