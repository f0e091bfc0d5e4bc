"""LoRA (Hu et al. 2021), with the rsLoRA scaling (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

A target layer keeps its own weight and gains a child module ``lora`` (A: r x in, B: out x r, B = 0 at init);
its forward adds ``scale * B A x``, computed with the layer's own product in one autograd function where it can be
(``methods/fused.py``). Module names of the base are untouched, so a merged model is the plain base architecture
again. GPT-2's fused ``c_attn`` is one target for the q, k and v roles (as in PEFT).

Mixture of experts (``experts=true``): besides the Linear roles, one low-rank pair per routed expert on the 3-D
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (as PEFT's ``target_parameters``), applied as a
parametrization ``W + s B A`` computed once per forward of the experts module.

DoRA: ``W' = m * (W + s B A) / ||W + s B A||`` row-wise (the norm is treated as a constant in backward, as in the
paper and PEFT). Unmerge subtracts what merge added: equal to the base within float rounding (about 1e-6 relative
in fp32), not bitwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..anatomy import in_out_features, is_conv1d, is_quantized_layer, resolve_roles, weight_2d
from ..precision import trainable_dtype
from ..prune.importance import AdapterUnit
from ..quant import refuse_quantized_merge
from . import fused
from .attached import AttachedMethod
from .base import Capabilities, ConfigError, MethodConfig, register
from .terms import Bias, LowRank, OutScale


@dataclass
class LoraConfig(MethodConfig):
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "all-linear"  # roles: q,k,v,o,gate,up,down or all-linear
    rslora: bool = False  # scale = alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed LoRA: a trainable magnitude per output row
    experts: bool = False  # MoE: also a low-rank pair per routed expert on gate_up_proj and down_proj

    def validate(self):
        if self.experts and (self.dora or self.dropout):
            raise ConfigError("lora: experts=true takes plain LoRA (no dora, dropout=0): the expert pairs act on the "
                              "3-D parameters, not on a layer's input")
        if self.r < 1:
            raise ConfigError(f"lora: r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if self.targets or not self.experts:  # experts=true may adapt the expert parameters alone (targets="")
            try:
                resolve_roles(self.targets)
            except ValueError as e:
                raise ConfigError(f"lora: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraAdapter(nn.Module):
    """The low-rank branch of one layer. Lives as a child of the layer it adapts."""

    def __init__(self, in_f: int, out_f: int, r: int, scale: float, dropout: float, weight: torch.Tensor, dora: bool):
        super().__init__()
        kw = {"dtype": trainable_dtype(weight), "device": weight.device}  # float32 on a bf16 base (precision.py)
        self.A = nn.Parameter(torch.empty(r, in_f, **kw))
        self.B = nn.Parameter(torch.zeros(out_f, r, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude = nn.Parameter(weight.detach().to(kw["dtype"]).norm(dim=1)) if dora else None
        self.active = True
        self.merged = False
        self._merged_norm: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        """scale * B A as an (out, in) matrix."""
        return (self.B @ self.A) * self.scale

    def dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight + self.delta_weight().to(weight.dtype)
        return w.norm(dim=1).detach()


def _lora_term(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The layer's output plus the LoRA (or DoRA) term, given the layer's own output."""
    lora: LoraAdapter = module.lora
    if lora.magnitude is None:
        # output += scale·(x Aᵀ) Bᵀ as one in-place addmm: no full-width product, sum or copy of its own (the base
        # linear saves its input and weight for backward, never its output, so writing into it is safe)
        a = F.linear(lora.dropout(x).to(lora.A.dtype), lora.A).to(output.dtype)
        a2d, b_t = a.reshape(-1, a.shape[-1]), lora.B.t().to(output.dtype)
        if output.is_contiguous() and not is_quantized_layer(module):  # LLM.int8's output: a custom Function's view
            output.view(-1, output.shape[-1]).addmm_(a2d, b_t, alpha=lora.scale)
            return output
        out = torch.addmm(output.reshape(-1, output.shape[-1]), a2d, b_t, alpha=lora.scale)
        return out.view(output.shape)
    h = F.linear(F.linear(lora.dropout(x).to(lora.A.dtype), lora.A), lora.B) * lora.scale
    weight = weight_2d(module)
    factor = (lora.magnitude / lora.dora_norm(weight)).to(output.dtype)
    bias = module.bias
    base = output - bias if bias is not None else output
    return output + (factor - 1) * base + factor * h.to(output.dtype)


def _lora_forward(module: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """The forward of a layer that carries LoRA: fused with the layer where it can be (``methods/fused.py``,
    benchmarks/lora_step_time.py measures the difference), else the layer's own forward plus the term."""
    lora: LoraAdapter = module.lora
    if not lora.active or lora.merged:
        return base_forward(x, *args, **kwargs)
    if (fusable and lora.magnitude is None and (not lora.training or isinstance(lora.dropout, nn.Identity))
            and fused.can_fuse(module, x, lora.A, lora.B)):
        return fused.lora_linear(module, x, lora.A, lora.B, lora.scale)
    return _lora_term(module, x, base_forward(x, *args, **kwargs))


class ExpertLora(nn.Module):
    """One low-rank pair per expert for a 3-D expert parameter W [E, out, in]: ``W + scale * B_e A_e`` (float32
    pairs; the sum is formed in W's dtype, as a weight, so on a bf16 base the update is rounded to bf16 there).
    Lives as a child ``lora_<param>`` of the experts module."""

    def __init__(self, weight: torch.Tensor, r: int, scale: float):
        super().__init__()
        e, out_f, in_f = weight.shape
        kw = {"dtype": trainable_dtype(weight), "device": weight.device}  # float32 on a bf16 base (precision.py)
        self.A = nn.Parameter(torch.empty(e, r, in_f, **kw))
        self.B = nn.Parameter(torch.zeros(e, out_f, r, **kw))
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale = scale
        self.active = True
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return torch.bmm(self.B, self.A) * self.scale


class _ExpertDelta(nn.Module):
    """The parametrization: W -> W + delta while the pair is active and not merged (the pair is held by reference,
    so its parameters stay under the experts module's ``lora_<param>``)."""

    def __init__(self, pair: ExpertLora):
        super().__init__()
        self.__dict__["pair"] = pair

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        pair = self.__dict__["pair"]
        if not pair.active or pair.merged:
            return w
        return w + pair.delta_weight().to(w.dtype)


_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _experts_forward(module: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """The experts module's own forward, with each parametrized weight computed once for the whole call."""
    with parametrize.cached():
        return base_forward(x, *args, **kwargs)


def _add_stored(mod: nn.Module, delta_2d: torch.Tensor) -> None:
    """weight += delta (given as (out, in)) in the weight's stored layout: a transposed view writes slowly."""
    refuse_quantized_merge(mod, "lora")
    w = mod.weight
    w.add_((delta_2d.t() if is_conv1d(mod) else delta_2d).to(w.dtype))


def _set_stored(mod: nn.Module, new_2d: torch.Tensor) -> None:
    refuse_quantized_merge(mod, "lora")
    w = mod.weight
    w.copy_((new_2d.t() if is_conv1d(mod) else new_2d).to(w.dtype))


@register("lora")
class Lora(AttachedMethod):
    child_name = "lora"
    family = "reparametrization"
    description = "LoRA: a trainable low-rank update B·A beside each targeted linear layer (rsLoRA, DoRA flags)."
    config_cls = LoraConfig
    default_lr = 5e-4

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            mergeable=True,
            restores_base=False,
            mixed_batch=not self.config.experts,  # bank_terms(): a low-rank term a layer (DoRA: with a scale)
            prunable=not self.config.dora,  # DoRA's row norm spans the input columns Light-PEFT removes
            inference_overhead="extra_ffn",
            quantized_base=True,  # QLoRA: the term beside a 4-bit/8-bit layer (DoRA reads the weight dequantized)
        )

    def check_model(self, anat):
        if self.config.experts and not anat.n_experts:
            raise ConfigError(f"lora: experts=true, but this {anat.model_type} model has no routed experts")

    def _apply(self, model, anat):
        cfg = self.config
        self._start()
        self.experts: dict[str, nn.Module] = {}  # experts module name -> module carrying lora_<param> pairs
        self._expert_hooks = []
        targets = anat.linears(cfg.targets) if cfg.targets else []
        if not targets and not cfg.experts:
            raise ValueError(f"lora: no layers for targets {cfg.targets!r} in this {anat.model_type} model")
        for name, _role, _i, mod in targets:
            in_f, out_f = in_out_features(mod)
            self.attach(name, mod, LoraAdapter(in_f, out_f, cfg.r, cfg.scale, cfg.dropout, weight_2d(mod), cfg.dora),
                        _lora_forward)
        for b in anat.blocks if cfg.experts else ():
            if b.experts is None:
                continue
            for attr in _EXPERT_PARAMS:
                pair = ExpertLora(getattr(b.experts, attr), cfg.r, cfg.scale)
                b.experts.add_module(f"lora_{attr}", pair)
                parametrize.register_parametrization(b.experts, attr, _ExpertDelta(pair), unsafe=True)
            self._expert_hooks.append(fused.override_forward(b.experts, _experts_forward))
            self.experts[anat.name_of(b.experts)] = b.experts

    def _expert_pairs(self):
        """(experts module name, parameter name, experts module, pair) for every adapted expert parameter."""
        for name, mod in self.experts.items():
            for attr in _EXPERT_PARAMS:
                yield name, attr, mod, getattr(mod, f"lora_{attr}")

    def trainable_parameters(self):
        yield from self._named_child_parameters()
        for name, attr, _mod, pair in self._expert_pairs():
            yield f"{name}.lora_{attr}.A", pair.A
            yield f"{name}.lora_{attr}.B", pair.B

    def num_changed(self) -> int:
        return (sum(in_out_features(m)[0] * in_out_features(m)[1] for m in self.layers.values())
                + sum(pair.A.shape[0] * pair.A.shape[2] * pair.B.shape[1] for *_, pair in self._expert_pairs()))

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, mod in self.layers.items():
            out[f"{name}.lora_A"] = mod.lora.A.data
            out[f"{name}.lora_B"] = mod.lora.B.data
            if mod.lora.magnitude is not None:
                out[f"{name}.magnitude"] = mod.lora.magnitude.data
        for name, attr, _mod, pair in self._expert_pairs():
            out[f"{name}.{attr}.lora_A"] = pair.A.data
            out[f"{name}.{attr}.lora_B"] = pair.B.data
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for mod in self.layers.values():
            lora = mod.lora
            delta = lora.delta_weight().float()
            if lora.magnitude is None:
                _add_stored(mod, delta)
            else:
                w = weight_2d(mod).float()
                norm = (w + delta).norm(dim=1)
                lora._merged_norm = norm
                _set_stored(mod, (w + delta) * (lora.magnitude.float() / norm)[:, None])
            lora.merged = True
        for _name, attr, mod, pair in self._expert_pairs():
            original = mod.parametrizations[attr].original
            original.add_(pair.delta_weight().to(original.dtype))
            pair.merged = True
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for mod in self.layers.values():
            lora = mod.lora
            delta = lora.delta_weight().float()
            if lora.magnitude is None:
                _add_stored(mod, -delta)
            else:
                w = weight_2d(mod).float()
                _set_stored(mod, w * (lora._merged_norm / lora.magnitude.float())[:, None] - delta)
                lora._merged_norm = None
            lora.merged = False
        for _name, attr, mod, pair in self._expert_pairs():
            original = mod.parametrizations[attr].original
            original.sub_(pair.delta_weight().to(original.dtype))
            pair.merged = False
        self.merged = False

    def unload(self) -> nn.Module:
        """Take the LoRA modules and hooks off, keeping the weights as they are (merged by merge_and_unload)."""
        self._model()  # raises unless applied
        for h in self._expert_hooks:
            h.remove()
        for _name, attr, mod, _pair in list(self._expert_pairs()):
            # the original weight becomes the parameter again (merged values after merge_and_unload)
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
            delattr(mod, f"lora_{attr}")
        self.experts, self._expert_hooks = {}, []
        return super().unload()

    @torch.no_grad()
    def bank_terms(self) -> dict | None:
        """One low-rank term a layer. DoRA, once trained, is ``y = f ⊙ (W x) + b + f ⊙ s·B A x`` with ``f = m /
        ‖W + s·B A‖`` per output row, a constant: an output scale f (which scales the bias too), the low-rank term
        with B's rows scaled by f, and the bias given back what the scale took, ``(1 - f) ⊙ b``; in that order, so
        a switch merges the scale into W before it adds the low-rank change."""
        if self.experts:
            return None  # the expert parametrizations are no per-layer term
        out = {}
        for n, m in self.layers.items():
            lora = m.lora
            if lora.magnitude is None:
                out[n] = [LowRank(lora.A.data, lora.B.data, lora.scale)]
                continue
            f = (lora.magnitude / lora.dora_norm(weight_2d(m))).float()
            out[n] = [OutScale(f), LowRank(lora.A.data, lora.B.data * f[:, None].to(lora.B.dtype), lora.scale)]
            if m.bias is not None:
                out[n].append(Bias((1 - f) * m.bias.detach().float()))
        return out

    def lora_factors(self) -> dict:
        cfg = self.config
        return {
            "modules": {n: (m.lora.A.data, m.lora.B.data) for n, m in self.layers.items()},
            # expert pairs, as PEFT's target_parameters: "<experts module>.<parameter>" -> (A [E, r, in], B [E, out, r])
            "parameters": {f"{n}.{attr}": (pair.A.data, pair.B.data) for n, attr, _m, pair in self._expert_pairs()},
            "alpha": cfg.alpha,
            "use_rslora": cfg.rslora,
            "magnitudes": {n: m.lora.magnitude.data for n, m in self.layers.items()} if cfg.dora else None,
            "dropout": cfg.dropout,
        }

    # -- Light-PEFT's pruning interface -----------------------------------------------------------------------------
    prune_defaults: ClassVar[dict] = {"r": 8, "alpha": 16.0}  # the Light-PEFT paper: r = 8 on all linear layers

    def prune_units(self) -> dict[str, AdapterUnit]:
        """A (r, in) is the down projection, B (out, r) the up projection."""

        def delta(mod):
            return lambda x: F.linear(F.linear(x.to(mod.lora.A.dtype), mod.lora.A), mod.lora.B) * mod.lora.scale

        def exact(mod):  # with dropout on, the output's term is ΔW·dropout(x), not ΔW·x
            return lambda: not (mod.lora.training and isinstance(mod.lora.dropout, nn.Dropout))

        # LoRA's forward adds its term itself, so the output forward hooks see is W·x + b + ΔW·dropout(x)
        return {n: AdapterUnit(m, m.lora.A, m.lora.B, delta(m), output_has_delta=True, term_is_exact=exact(m))
                for n, m in self.layers.items()}

    def prune_widths(self) -> dict[str, int]:
        return {n: m.lora.A.shape[0] for n, m in self.layers.items()}

    @torch.no_grad()
    def keep_widths(self, name: str, idx: list[int]) -> None:
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
