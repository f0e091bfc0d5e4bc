"""Hybrids, composed of the existing methods' parts (each part is that method's own object, modules and forward):

``mam``      MAM adapter (He et al. 2022): prefix tuning on attention (l = 30, the adapters library's MLP width 800)
             + a scaled parallel adapter beside the FFN (reduction factor 2, s = 4; the adapters library's MAMConfig;
             He et al.: bottleneck 512 at d = 1024, the same ratio).
``unipelt``  UniPELT (Mao et al. 2022): LoRA on q and v (r = 8), prefix tuning (l = 10) and a sequential adapter
             after the FFN (reduction factor 16), each multiplied by its own gate ``σ(W_g x)`` computed per token from
             the part's input. The LoRA and adapter parts start at zero (B = 0, W_up = 0), so they are the identity at
             init whatever the gate; the prefix part, as in the paper, is not. The prefix gate scales the prefix's
             share of each query's attention output (``methods/prompts.py``); the paper's gate on P_K as well would
             make a token's output depend on a gate of other tokens under a cache, so it is left out.

A hybrid holds its parts; trainable parameters, state, removal are theirs, side by side (their module names never
collide: ``prefix`` on attention modules, ``adapter`` on the FFN's last layer, ``lora`` on q/v).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Anatomy
from .adapters import AdapterConfig, Bottleneck, Pfeiffer, ScaledParallel, ScaledParallelConfig
from .attached import term_input
from .base import Capabilities, ConfigError, Method, MethodConfig, check_state_keys, register
from .lora import Lora, LoraConfig
from .prompts import PrefixConfig, PrefixTuningMethod

_FSDP_REFUSAL = ("its prefix's reparametrization MLP is shared by every block, and FSDP shards each block as its own "
                 "unit; train without FSDP")


class _Hybrid(Method):
    family = "hybrid"

    def parts_for(self) -> list[Method]:
        raise NotImplementedError

    @property
    def capabilities(self) -> Capabilities:
        # a quantized base: as its parts allow (each part's own term beside the quantized layer's product); the
        # parts built at apply, or the config's parts before it
        parts = getattr(self, "parts", None) or self.parts_for()
        refusing = [(p.name, p.capabilities.quantized_refusal) for p in parts if not p.capabilities.quantized_base]
        return Capabilities(mergeable=False, restores_base=True, inference_overhead="extra_input",
                            identity_at_init=False, fsdp=False, fsdp_refusal=_FSDP_REFUSAL,
                            quantized_base=not refusing,
                            quantized_refusal="; ".join(f"its {n} part: {r}" for n, r in refusing))

    def check_model(self, anat: Anatomy) -> None:
        self.parts = self.parts_for()
        for part in self.parts:
            part.require_points(anat, part.required_points())
            part.check_model(anat)

    def _apply(self, model, anat):
        for part in self.parts:
            part.model, part.anatomy, part.base_fingerprint = model, anat, self.base_fingerprint
            part._apply(model, anat)

    def trainable_parameters(self):
        for part in self.parts:
            yield from part.trainable_parameters()

    def num_changed(self) -> int:
        return sum(part.num_changed() for part in self.parts)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v for part in self.parts for k, v in part.state().items()}

    def _split(self, state: dict, training: bool) -> list[dict]:
        expected = [part.training_state() if training else part.state() for part in self.parts]
        check_state_keys(self.name, {k: v for e in expected for k, v in e.items()}, state)
        return [{k: state[k] for k in e} for e in expected]

    def load_state(self, state):
        for part, sub in zip(self.parts, self._split(state, False), strict=True):
            part.load_state(sub)

    def training_state(self):
        return {k: v for part in self.parts for k, v in part.training_state().items()}

    def load_training_state(self, state):
        for part, sub in zip(self.parts, self._split(state, True), strict=True):
            part.load_training_state(sub)

    def merge(self) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be merged: its prefix is an extra attention input "
                                  "(and UniPELT's gates depend on the input); serve it with the adapter")

    def unmerge(self) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be merged or unmerged")

    def unload(self):
        self._model()
        for part in self.parts:
            part.unload()
        return self._release()

    def remove(self):
        return self.unload()


# -- MAM -----------------------------------------------------------------------------------------------------------


@dataclass
class MamConfig(MethodConfig):
    prefix_length: int = 30
    prefix_hidden: int = 800  # the prefix's reparametrization MLP width (adapters library's MAMConfig)
    reduction_factor: float = 2.0  # the parallel adapter's bottleneck m = hidden / 2 ...
    bottleneck: int = 0  # ... unless given
    scale: float = 4.0
    non_linearity: str = "relu"

    def validate(self):
        self.prefix().validate()
        self.adapter().validate()

    def prefix(self) -> PrefixConfig:
        return PrefixConfig(length=self.prefix_length, reparam_hidden=self.prefix_hidden)

    def adapter(self) -> ScaledParallelConfig:
        return ScaledParallelConfig(reduction_factor=self.reduction_factor, bottleneck=self.bottleneck,
                                    non_linearity=self.non_linearity, scale=self.scale)


@register("mam")
class Mam(_Hybrid):
    description = "MAM adapter: prefix tuning on attention + a scaled parallel adapter beside the FFN."
    config_cls = MamConfig
    default_lr = 1e-2  # the shipped base's tuned LR is in measure/bench.py TUNED_LRS

    def parts_for(self):
        return [PrefixTuningMethod(self.config.prefix()), ScaledParallel(self.config.adapter())]


# -- UniPELT -------------------------------------------------------------------------------------------------------


def _gate(in_f: int, like: torch.Tensor) -> nn.Linear:
    return nn.Linear(in_f, 1, dtype=like.dtype, device=like.device)


def _gated_lora_forward(module: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """``W x + σ(W_g x) · scale · B A x`` (UniPELT's gated LoRA)."""
    out = base_forward(x, *args, **kwargs)
    lora = module.lora
    if not lora.active:
        return out
    xf = term_input(x, lora.A.dtype)
    term = F.linear(F.linear(lora.dropout(xf), lora.A), lora.B) * lora.scale
    term = torch.sigmoid(lora.gate(xf)) * term
    return out + term.to(out.dtype)


def _gated_after_forward(layer: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """``h + σ(W_g h) · adapter(h)`` (UniPELT's gated sequential adapter)."""
    h = base_forward(x, *args, **kwargs)
    a: Bottleneck = layer.adapter
    if not a.active:
        return h
    g = torch.sigmoid(a.gate(term_input(h, a.gate.weight.dtype))).to(h.dtype)
    return h + g * a(h)


class GatedLora(Lora):
    """LoRA whose term is multiplied by a gate on the layer's input (a ``gate`` inside each ``lora`` module)."""

    def _apply(self, model, anat):
        super()._apply(model, anat)
        for name, layer, lora in list(self.children()):
            lora.add_module("gate", _gate(lora.A.shape[1], lora.A))
            for h in self._handles[name]:
                h.remove()
            from . import fused

            self._handles[name] = [fused.override_forward(layer, _gated_lora_forward)]

    def state(self):
        out = super().state()
        for name, _layer, lora in self.children():
            out[f"{name}.lora_gate.weight"], out[f"{name}.lora_gate.bias"] = lora.gate.weight.data, lora.gate.bias.data
        return out

    def num_changed(self) -> int:
        return sum(p.numel() for _n, p in self.trainable_parameters())  # gated: never folded into the weight


class GatedAdapter(Pfeiffer):
    """A sequential adapter after the FFN whose output is multiplied by a gate on its input."""

    def _apply(self, model, anat):
        super()._apply(model, anat)
        from . import fused

        for name, layer, a in list(self.children()):
            a.add_module("gate", _gate(a.down.weight.shape[1], a.down.weight))
            for h in self._handles[name]:
                h.remove()
            self._handles[name] = [fused.override_forward(layer, _gated_after_forward)]


class GatedPrefix(PrefixTuningMethod):
    gated = True


@dataclass
class UniPeltConfig(MethodConfig):
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,v"
    prefix_length: int = 10
    prefix_hidden: int = 512
    reduction_factor: float = 16.0
    non_linearity: str = "relu"

    def validate(self):
        if self.lora_r < 1:
            raise ConfigError(f"unipelt: lora_r must be >= 1, got {self.lora_r}")
        self.lora().validate()
        self.prefix().validate()
        self.adapter().validate()

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, targets=self.lora_targets)

    def prefix(self) -> PrefixConfig:
        return PrefixConfig(length=self.prefix_length, reparam_hidden=self.prefix_hidden)

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(reduction_factor=self.reduction_factor, non_linearity=self.non_linearity)


@register("unipelt")
class UniPelt(_Hybrid):
    description = "UniPELT: gated LoRA (q, v) + gated prefix tuning + a gated sequential adapter after the FFN."
    config_cls = UniPeltConfig
    default_lr = 1e-2  # the shipped base's tuned LR is in measure/bench.py TUNED_LRS

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, inference_overhead="gating")

    def parts_for(self):
        cfg = self.config
        return [GatedLora(cfg.lora()), GatedPrefix(cfg.prefix()), GatedAdapter(cfg.adapter())]
