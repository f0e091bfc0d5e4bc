"""Light-PEFT (Gu et al., Findings of ACL 2024): early pruning of the foundation model and of the PEFT modules.

Estimation (a short first part of the run): a PEFT method (LoRA now) trains together with foundation masks
(one scalar per attention head and per FFN channel, L1 penalty); adapter importance is collected in the second
half. Then, in flight: heads and FFN channels with the smallest masks are sliced out of the base, the least
important adapter modules are dropped and half of the remaining ranks are cut; training goes on with a fresh
optimizer. The prune plan sits in the config (``plan``), so ``leantune.load(fresh_base, dir)`` rebuilds the
pruned model from the original base + plan + adapter.

The wrapped PEFT method is any registered method whose capabilities say ``prunable`` (LoRA, the bottleneck
adapters houlsby / pfeiffer / parallel / scaled_parallel), picked by name (``base_method``); it implements the
pruning interface itself (``methods/attached.py``: units for importance, widths, keep_widths, follow_slice,
drop_modules) and says which options Light-PEFT wraps it with (``prune_defaults``; LoRA: the paper's r = 8, α = 16).
Options this config does not know go to the wrapped method (``-o r=4``, ``-o bottleneck=8``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..prune import importance as imp
from ..prune.masks import FoundationMasks
from ..prune.plan import PrunePlan, select_channels, select_heads, select_modules, select_ranks
from ..prune.schedule import EarlyPruneSchedule
from ..prune.surgery import apply_foundation_plan
from .base import (
    Capabilities,
    ConfigError,
    Method,
    MethodConfig,
    get_method,
    list_methods,
    register,
    warn_once,
)

DEFAULT_FFN_RATIO = 0.4


@dataclass
class LightPeftConfig(MethodConfig):
    FORMAT_VERSION = 2  # 2: the wrapped method's options in base_options (1 had LoRA's r/alpha/... at the top)

    base_method: str = "lora"  # the wrapped PEFT method: any registered method with capabilities.prunable
    base_options: dict | None = None  # its options, over its prune_defaults (unknown top-level options go here)
    # estimation phase: a step count, or (when 0) a fraction of the run; at least 20 steps either way
    estimation_steps: int = 0
    estimation_fraction: float = 0.04
    mask_l1: float = 1e-4  # λ of the L1 penalty on the foundation masks
    # the masks' learning rate as a multiple of the run's (the reference trains head masks at 100x, FFN masks at 50x)
    head_mask_lr_scale: float = 100.0
    ffn_mask_lr_scale: float = 50.0
    # what goes: fractions of heads and FFN channels removed; fractions of adapter modules and ranks kept
    head_ratio: float = 0.4
    # None: DEFAULT_FFN_RATIO on a dense FFN, 0 on a mixture of experts (set at apply, so the saved config says which)
    ffn_ratio: float | None = None
    module_keep: float = 0.25
    rank_keep: float = 0.5
    uniform: bool = False  # the same shape in every layer (a merged model that fits the model's own config)
    # how heads/channels and adapter modules are ranked: the paper's scores, or first-order Taylor scores
    foundation_score: str = "mask"  # "mask": the learned mask values; "taylor": mean |m ⊙ ∂L/∂m|
    module_score: str = "output_ratio"  # "output_ratio": ‖ΔW·x‖ / ‖W·x‖; "taylor": Σ of the module's rank scores
    plan: dict | None = None  # filled in by pruning; set, the method rebuilds the pruned model at apply

    @classmethod
    def from_dict(cls, d: dict, method: str | None = None) -> LightPeftConfig:
        """Options that are not Light-PEFT's own are the wrapped method's (``r=4``, ``targets=q,v``)."""
        d = dict(d)
        own = {f.name for f in dataclasses.fields(cls)} | {"format_version"}
        passed = {k: d.pop(k) for k in list(d) if k not in own}
        if passed:
            d["base_options"] = {**(d.get("base_options") or {}), **passed}
        cfg = super().from_dict(d, method)
        if cfg.base_options:  # stored as the wrapped config read them (CLI strings become numbers)
            base = cfg.base_config()
            cfg.base_options = {k: getattr(base, k) for k in cfg.base_options}
        return cfg

    def base_config(self) -> MethodConfig:
        """The wrapped method's config: its prune_defaults, then base_options."""
        cls = self.base_class()
        if self.base_options is not None and not isinstance(self.base_options, dict):
            raise ConfigError(f"light_peft: base_options must be a mapping of {cls.name}'s options, got "
                              f"{self.base_options!r}")
        try:
            return cls.config_cls.from_dict({**cls.prune_defaults, **(self.base_options or {})}, method=cls.name)
        except ConfigError as e:
            raise ConfigError(f"light_peft (base_method={cls.name!r}): {e}") from None

    def base_class(self):
        try:
            cls = get_method(self.base_method)
        except KeyError as e:
            raise ConfigError(f"light_peft: {e.args[0]}") from None
        if not (hasattr(cls, "prune_units") and cls().capabilities.prunable):
            prunable = sorted(m.name for m in list_methods() if hasattr(m, "prune_units") and m().capabilities.prunable)
            raise ConfigError(f"light_peft: base_method {self.base_method!r} cannot be pruned (its capabilities say "
                              f"so); use one of {prunable}")
        return cls

    def validate(self):
        if not isinstance(self.base_method, str):
            raise ConfigError(f"light_peft: base_method must be a method name, got {self.base_method!r}")
        for name in ("head_ratio", "ffn_ratio"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
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
        if not self.base_class()(self.base_config()).capabilities.prunable:
            raise ConfigError(f"light_peft: {self.base_method} with options {self.base_options} cannot be pruned "
                              "(its capabilities say so)")
        if self.plan is not None and not isinstance(self.plan, dict):
            raise ConfigError(f"light_peft: plan must be a prune plan (a JSON object), got {type(self.plan).__name__}")


# -- the method ---------------------------------------------------------------------------------------------


@register("light_peft")
class LightPeft(Method):
    family = "pruning"
    description = (
        "Light-PEFT: a PEFT method (LoRA, or a bottleneck adapter: base_method) + foundation masks for a short "
        "estimation phase, then heads, FFN channels, adapter modules and ranks/widths pruned in flight; training "
        "goes on with the smaller model."
    )
    config_cls = LightPeftConfig
    default_lr = 5e-4

    @property
    def capabilities(self) -> Capabilities:
        wrapped = self.config.base_class()(self.config.base_config()).capabilities
        return Capabilities(
            mergeable=wrapped.mergeable,
            restores_base=False,
            mixed_batch=False,  # the base itself is pruned: it cannot be shared with other adapters
            prunable=False,
            needs_schedule=self.config.plan is None,
            schedule_ends=self.config.plan is None,
            inference_overhead=wrapped.inference_overhead,
            changes_trainable=self.config.plan is None,
            fsdp=False,
            fsdp_refusal="Light-PEFT slices parameters to new shapes in flight, which FSDP's shards cannot follow",
            quantized_refusal="Light-PEFT prunes the base itself (rows and columns of its weights, sliced in flight), "
            "which a packed 4-bit/8-bit weight cannot be sliced into; train it on a full-precision or bf16 base",
        )

    @property
    def pruned(self) -> bool:
        return self.plan is not None

    def check_model(self, anat):
        cfg = self.config
        if cfg.ffn_ratio is None:  # the default: FFN channels where the FFN is one MLP, attention heads only on experts
            cfg.ffn_ratio = 0.0 if anat.n_experts else DEFAULT_FFN_RATIO
            if anat.n_experts and cfg.plan is None:
                warn_once(f"light_peft: this {anat.model_type} model's FFN is a mixture of {anat.n_experts} experts, "
                          "whose channels Light-PEFT cannot prune yet: it prunes attention heads only (ffn_ratio=0)")
        ffn = cfg.ffn_ratio > 0 if cfg.plan is None else cfg.plan.get("ffn") is not None
        if ffn and anat.n_experts:
            raise ConfigError(
                f"light_peft: this {anat.model_type} model's FFN is a mixture of {anat.n_experts} experts; Light-PEFT "
                f"cannot prune expert channels yet (ffn_ratio={cfg.ffn_ratio}): prune attention heads only with "
                "ffn_ratio=0 (the default on a mixture of experts)")
        heads = cfg.head_ratio > 0 if cfg.plan is None else cfg.plan.get("heads") is not None
        cross = any("cross_o" in b.linears for b in anat.blocks)
        if heads and cross and (anat.n_kv_heads != anat.n_heads or anat.qk_norm_kind() is not None
                                or any("qkv" in b.linears for b in anat.blocks)):
            raise ConfigError(
                f"light_peft: this {anat.model_type} model has cross-attention and grouped KV heads, a fused qkv or q/k "
                "norms, which head pruning does not slice together; prune FFN channels only with head_ratio=0")
        if heads and anat.qk_norm_kind() == "whole" and any("qkv" in b.linears for b in anat.blocks):
            raise ConfigError(
                f"light_peft: this {anat.model_type} model normalizes its fused queries and keys over all heads at "
                "once, which head pruning cannot keep whole; prune FFN channels only with head_ratio=0")

    def _apply(self, model, anat):
        cfg = self.config
        self.peft = cfg.base_class()(cfg.base_config())  # the wrapped method, applied to the same model
        self.peft.model, self.peft.anatomy = model, anat
        self.peft._apply(model, anat)
        self.masks: FoundationMasks | None = None
        self.importance: imp.AdapterImportance | None = None
        self.plan: PrunePlan | None = None
        if cfg.plan is not None:
            self.apply_plan(PrunePlan.from_dict(cfg.plan))
            return
        self.masks = FoundationMasks(anat, heads=cfg.head_ratio > 0, ffn=cfg.ffn_ratio > 0,
                                     taylor=cfg.foundation_score == "taylor")
        self.importance = imp.AdapterImportance(model, self.peft.prune_units())

    # -- what trains --------------------------------------------------------------------------------------
    def trainable_parameters(self):
        yield from self.peft.trainable_parameters()
        if self.masks is not None:
            yield from self.masks.named.items()

    def optimizer_options(self) -> dict[str, dict[str, float]]:
        if self.masks is None:
            return {}
        scale = {"head_mask": self.config.head_mask_lr_scale, "cross_head_mask": self.config.head_mask_lr_scale,
                 "ffn_mask": self.config.ffn_mask_lr_scale}
        return {n: {"lr_scale": scale[n.rsplit(".", 1)[1]]} for n in self.masks.named}

    def num_changed(self) -> int:
        return self.peft.num_changed()

    def state(self) -> dict[str, torch.Tensor]:
        out = dict(self.peft.state())
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
        if self.masks is not None and any(m is not None for m in self.masks.cross_head_masks):
            scores = self.masks.taylor_scores("cross_head_mask") if taylor else self.masks.cross_head_scores()
            kept = iter(select_heads(scores, anat.n_heads, cfg.head_ratio, cfg.uniform, divisor_of=anat.hidden)[0])
            plan.cross_heads = [next(kept) if m is not None else None for m in self.masks.cross_head_masks]
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
        ranks = self.peft.prune_widths()
        heads = [len(h) for h in plan.heads] if plan.heads else [anat.n_heads] * n_layers
        ffn = [len(c) for c in plan.ffn] if plan.ffn else [anat.intermediate] * n_layers
        plan.counts = {
            "heads_total": anat.n_heads * n_layers,
            "heads_kept": sum(heads),
            "heads_kept_per_layer": heads,
            "kv_heads_kept_per_layer": [len(k) for k in plan.kv_heads] if plan.kv_heads else [anat.n_kv_heads] * n_layers,
            **({"cross_heads_total": anat.n_heads * sum(c is not None for c in plan.cross_heads),
                "cross_heads_kept": sum(len(c) for c in plan.cross_heads if c is not None)} if plan.cross_heads else {}),
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
        before_trainable = sum(p.numel() for _, p in self.peft.trainable_parameters())
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
            r = self.peft.prune_widths()[name]
            if idx[-1] >= r:
                raise ValueError(f"light_peft: the plan keeps rank {idx[-1]} of {name!r}, which has rank {r}")
            self.peft.keep_widths(name, idx)
        self.plan = plan
        self.config.plan = plan.to_dict()

    # -- merge / remove -----------------------------------------------------------------------------------
    def merge(self) -> None:
        self.peft.merge()
        self.merged = True

    def unmerge(self) -> None:
        self.peft.unmerge()
        self.merged = False

    def remove(self) -> nn.Module:
        if self.pruned:
            raise RuntimeError(
                "light_peft: the base model was physically pruned and cannot be given back; reload the base model "
                "(leantune.load(fresh_base, dir) rebuilds the pruned one)"
            )
        self.masks.detach()
        self.importance.close()
        model = self.peft.remove()
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
        model = self.peft.unload()
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

        if not self.capabilities.mergeable:
            raise ValueError(f"light_peft: base_method {self.config.base_method!r} cannot be merged into the base "
                             "weights; save the adapter instead (leantune.load rebuilds the pruned model)")
        out = save_merged(self._model(), directory, tokenizer)
        return {"kind": out.kind, "reason": out.reason}

    def base_state_dict(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """The (pruned) base model's own tensors without the adapter's modules; ``merged``: with the adapter folded
        into copies of the adapted weights (the live model is left untouched)."""
        if merged and not self.capabilities.mergeable:
            raise ValueError(f"light_peft: base_method {self.config.base_method!r} has no merged form; pass merged=False")
        prefixes = tuple(self.peft.adapter_prefixes())
        state = {k: v for k, v in self._model().state_dict().items() if not k.startswith(prefixes)}
        if merged:
            state.update(self.peft.merged_weights())
        elif self.merged:
            raise RuntimeError("light_peft: the adapter is merged into the live weights; unmerge() first")
        return state
