"""Selective methods: train a chosen subset of the base model's own tensors.

``full`` (every parameter), ``bitfit`` (biases) and ``ln_tuning`` (norm weights and biases). The change lives in
the weights themselves, so there is nothing to merge (no inference overhead) and ``remove()`` gives the base back
bitwise from a snapshot of the selected tensors taken at ``apply``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..anatomy import Anatomy, in_out_features
from .base import (
    Capabilities,
    ConfigError,
    Method,
    MethodConfig,
    check_state_keys,
    register,
    unique_parameters,
)
from .terms import Bias


def _bias_dtype(mod: nn.Module) -> torch.dtype:
    """A new bias's dtype: the weight's, or on a quantized layer the dtype it computes in (its output's)."""
    w = mod.weight
    return w.dtype if w.is_floating_point() else (getattr(mod, "compute_dtype", None) or torch.float32)


class SelectiveMethod(Method):
    """Trains existing tensors picked by ``_select``; may add zero-initialised ones (BitFit's missing biases)."""

    keep_snapshot = True

    def _select(self, model: nn.Module, anat: Anatomy) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def _apply(self, model, anat):
        self.added: list[tuple[nn.Module, str]] = []  # (module, attribute) created by the method
        self.selected = self._select(model, anat)
        if not self.selected:
            raise ValueError(f"method {self.name!r} found nothing to train in this {anat.model_type} model")
        self.snapshot = (
            {n: p.detach().clone() for n, p in self.selected.items()} if self.keep_snapshot else None
        )
        for p in self.selected.values():
            p.requires_grad_(True)

    @property
    def capabilities(self) -> Capabilities:
        # BitFit and LN tuning train biases and norms, which a quantized base keeps in full precision
        return Capabilities(mergeable=True, restores_base=self.keep_snapshot, mixed_batch=False, quantized_base=True)

    def trainable_parameters(self):
        seen = set()
        for n, p in self.selected.items():
            if id(p) not in seen:
                seen.add(id(p))
                yield n, p

    def rebind_parameters(self, mapping):
        super().rebind_parameters(mapping)
        self.selected = {n: mapping.get(id(p), p) for n, p in self.selected.items()}

    def num_changed(self) -> int:
        return sum(p.numel() for p in unique_parameters(self.selected.values()))

    def state(self) -> dict[str, torch.Tensor]:
        seen, out = set(), {}
        for n, p in self.selected.items():
            if id(p) not in seen:  # tied weights stored once
                seen.add(id(p))
                out[n] = self.masters.value(p)  # the float32 master while training a low-precision base
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state()
        check_state_keys(self.name, expected, state)
        for k, v in state.items():
            self.masters.assign(self.selected[k], v)

    # The tuned values already sit in the weights: merge and unmerge have nothing to move.
    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def remove(self) -> nn.Module:
        """Take the method off: the base model back, bitwise."""
        self._model()  # raises unless applied
        if self.snapshot is None:
            raise RuntimeError(
                f"method {self.name!r} kept no copy of the base weights (keep_base=false); reload the base model"
            )
        with torch.no_grad():
            for n, p in self.selected.items():
                p.copy_(self.snapshot[n])
        for module, attr in self.added:
            delattr(module, attr)
            module.register_parameter(attr, None)
        return self._release()

    def unload(self) -> nn.Module:
        """Nothing to fold (the tuned values are the weights): drop the method and its snapshot of the base."""
        self._model()  # raises unless applied
        self.snapshot = None
        return self._release()


@dataclass
class FullConfig(MethodConfig):
    keep_base: bool = False  # keep a copy of the base weights so that remove() can restore them (2x memory)
    train_router: bool = False  # mixture of experts: the routers train too (frozen by default)


@register("full")
class Full(SelectiveMethod):
    family = "full"
    description = "Full fine-tuning: every parameter trains (the baseline every method is measured against)."
    config_cls = FullConfig
    default_lr = 5e-5

    @property
    def keep_snapshot(self):  # type: ignore[override]
        return self.config.keep_base

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(
            super().capabilities, quantized_base=False,
            quantized_refusal="full fine-tuning updates every weight, and a 4-bit/8-bit weight takes no gradient "
            "or update; load the base in full precision or bf16, or use lisa (it dequantizes the blocks it trains)")

    def _select(self, model, anat):
        frozen = set() if self.config.train_router else {id(p) for _, r in anat.routers() for p in r.parameters()}
        return {n: p for n, p in model.named_parameters() if id(p) not in frozen}


@dataclass
class BitFitConfig(MethodConfig):
    targets: str = "all-linear"  # roles of the linear layers whose biases train
    norms: bool = True  # also the norms' biases (LayerNorm; RMSNorm has none)
    add_missing: bool = True  # add zero biases where a targeted layer has none (LLaMA-style models have none)


@register("bitfit")
class BitFit(SelectiveMethod):
    family = "selective"
    description = "BitFit: only bias terms train; zero biases are added where a targeted layer has none."
    config_cls = BitFitConfig
    default_lr = 1e-3

    @property
    def capabilities(self) -> Capabilities:
        return replace(super().capabilities, mixed_batch=True)  # bank_terms(): a bias change per module

    def bank_terms(self) -> dict:
        """Per module, its bias change (the whole bias where BitFit added one)."""
        out = {}
        for n, p in self.trainable_parameters():
            base = self.snapshot.get(n)
            delta = p.detach().float() - (base.float() if base is not None else 0.0)
            out[n.removesuffix(".bias")] = [Bias(delta)]
        return out

    def _select(self, model, anat):
        out = {}
        for name, _role, _i, mod in anat.linears(self.config.targets):
            if getattr(mod, "bias", None) is None:
                if not self.config.add_missing:
                    continue
                _, out_f = in_out_features(mod)
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(out_f, dtype=_bias_dtype(mod), device=w.device))
                self.added.append((mod, "bias"))
            out[f"{name}.bias"] = mod.bias
        if self.config.norms:
            for name, mod in anat.norms():
                if getattr(mod, "bias", None) is not None:
                    out[f"{name}.bias"] = mod.bias
        return out

    def _apply(self, model, anat):
        super()._apply(model, anat)
        for mod, _ in self.added:  # added biases are not part of the base: remove() deletes them
            self.snapshot.pop(anat.name_of(mod) + ".bias", None)

    def remove(self):
        added = {id(m.bias) for m, _ in self.added}
        self.selected = {n: p for n, p in self.selected.items() if id(p) not in added}
        return super().remove()

    def unload(self) -> nn.Module:
        """Keep the added biases and switch on the config flags that give the plain architecture those biases
        (zero biases on the other layers a flag covers, so the model is exactly what the config builds)."""
        why = self.merged_export_refusal()
        if why:
            raise ValueError(why)
        switches = self.anatomy.spec.bias_switches
        roles = self.added_bias_roles()
        flags = {switches[r] for r in roles}
        model = self._model()
        for flag in sorted(flags):
            setattr(model.config, flag, True)
        for _n, role, _i, mod in self.anatomy.linears("all-linear"):
            if switches.get(role) in flags and getattr(mod, "bias", None) is None:
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(in_out_features(mod)[1], dtype=w.dtype, device=w.device))
        return super().unload()

    def merged_export_refusal(self) -> str | None:
        lacking = sorted(r for r in self.added_bias_roles() if r not in self.anatomy.spec.bias_switches)
        if not lacking:
            return None
        return (f"bitfit added biases to the {lacking} layers, but a {self.anatomy.model_type!r} config has no switch "
                "that gives them a bias, so a plain model cannot hold them: export the adapter instead, or train "
                "with add_missing=false")

    def added_bias_roles(self) -> set[str]:
        """Roles that gained a bias (a merged export must switch the config's bias flags on)."""
        ids = {id(m) for m, _ in self.added}
        return {role for _n, role, _i, mod in self.anatomy.linears("all-linear") if id(mod) in ids}


@dataclass
class LNTuningConfig(MethodConfig):
    final_norm: bool = True  # include the final norm before the LM head
    bias: bool = True  # LayerNorm biases as well as weights

    def validate(self):
        if not isinstance(self.final_norm, bool):
            raise ConfigError("ln_tuning: final_norm must be true or false")


@register("ln_tuning")
class LNTuning(SelectiveMethod):
    family = "selective"
    description = "LN tuning: only the normalization layers' scales (and biases) train."
    config_cls = LNTuningConfig
    default_lr = 1e-3

    def _select(self, model, anat):
        out = {}
        for name, mod in anat.norms(include_final=self.config.final_norm):
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "bias" and not self.config.bias:
                    continue
                out[f"{name}.{pname}"] = p
        return out
