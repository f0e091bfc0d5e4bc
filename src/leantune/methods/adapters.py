"""Bottleneck adapters: Houlsby, Pfeiffer, parallel and scaled parallel, Compacter and Compacter++.

An adapter is ``W_up·f(W_down·z) + b_up`` (bottleneck width m, non-linearity f) computed beside a frozen layer and
added to its output before the block's residual add; ``W_up`` and ``b_up`` start at zero, so the model is unchanged
at step 0. Where it sits, in anatomy placement points (``anatomy.PLACEMENTS``):

  ``houlsby``           z = h, added to h, at ``attn_out`` and ``ffn_out`` (two per block; Houlsby et al. 2019);
                        in an encoder-decoder's decoder after the cross-attention too (``cross_attn_out``: after every
                        sub-layer, three per decoder block; ``cross=false`` leaves it out, as AdapterHub's default
                        ``cross_adapter=False`` does)
  ``pfeiffer``          z = h, added to h, at ``ffn_out`` (one per block; Pfeiffer et al. 2021)
  ``parallel``          z = the FFN's input (``ffn_in``), added to the FFN's output (``ffn_out``): beside the FFN,
                        times s (He et al. 2022); ``scaled_parallel`` is the same with s = 4
  ``compacter``         Houlsby placement, every adapter matrix a PHM layer ``W = Σ_i A_i ⊗ (s_i t_iᵀ)``: A_i (n×n)
                        shared by all layers (one set for the down projections, one for the up), s_i t_iᵀ rank 1 per
                        layer (Mahabadi et al. 2021); ``compacter_pp`` the same at the Pfeiffer placement

Defaults and their sources: docs/methods.md. The adapter's tensors are float32 whatever the base dtype; outside
autocast the term is computed in float32 and cast back to the layer's output dtype, under autocast in autocast's
dtype (``attached.term_input``).

Plain bottlenecks (houlsby, pfeiffer, parallel, scaled_parallel) are prunable by Light-PEFT: whole adapter modules
by importance and the bottleneck width (rows of W_down, columns of W_up), the same interface as LoRA's ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Anatomy, PlacementError
from ..precision import trainable_dtype
from ..prune.importance import AdapterUnit
from .attached import AttachedMethod, term_input
from .base import Capabilities, ConfigError, MethodConfig, register

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


@dataclass
class AdapterConfig(MethodConfig):
    reduction_factor: float = 16.0  # bottleneck width m = hidden / reduction_factor (rounded down, at least 1) ...
    bottleneck: int = 0  # ... unless given here (> 0)
    non_linearity: str = "relu"  # relu | gelu | silu (= swish) | tanh
    scale: float = 1.0  # s: the adapter's output is multiplied by it
    cross: bool = True  # an adapter after attention (houlsby, compacter): after the cross-attention too, where any

    def validate(self):
        if not self.reduction_factor > 0:
            raise ConfigError(f"adapter: reduction_factor must be > 0, got {self.reduction_factor}")
        if self.bottleneck < 0:
            raise ConfigError(f"adapter: bottleneck is a width (> 0, or 0 to use reduction_factor), got {self.bottleneck}")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"adapter: non_linearity {self.non_linearity!r} must be one of {', '.join(ACTIVATIONS)}")

    def width(self, hidden: int, multiple: int = 1) -> int:
        """The bottleneck width for a ``hidden``-wide placement, rounded down to a multiple of ``multiple``."""
        m = self.bottleneck or int(hidden // self.reduction_factor)
        return max(multiple, m // multiple * multiple)


@dataclass
class HoulsbyConfig(AdapterConfig):
    non_linearity: str = "swish"  # the adapters library's HoulsbyConfig


@dataclass
class ScaledParallelConfig(AdapterConfig):
    reduction_factor: float = 2.0  # the adapters library's ParBnConfig (He et al. 2022's scaled PA)
    scale: float = 4.0


@dataclass
class CompacterConfig(AdapterConfig):
    reduction_factor: float = 32.0  # the adapters library's CompacterConfig
    non_linearity: str = "gelu"
    phm_dim: int = 4  # n: Kronecker products per PHM layer; the hidden size and bottleneck must divide by it

    def validate(self):
        super().validate()
        if self.phm_dim < 1:
            raise ConfigError(f"compacter: phm_dim (n) must be >= 1, got {self.phm_dim}")


# -- the modules ---------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """``scale · W_up f(W_down z)`` with biases; ``down`` and ``up`` are Linear-like (``weight`` (out, in), ``bias``)."""

    def __init__(self, down: nn.Module, up: nn.Module, non_linearity: str, scale: float):
        super().__init__()
        self.down, self.up = down, up
        self.non_linearity, self.scale = non_linearity, scale
        self.active = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The term, in ``z``'s dtype (computed in the adapter's float32; under autocast in autocast's dtype)."""
        t = self.up(ACTIVATIONS[self.non_linearity](self.down(term_input(z, self.up.bias.dtype))))
        return (t * self.scale).to(z.dtype)

    def capture(self, module, args) -> None:
        """Forward pre-hook on the FFN's first layer: remember the FFN's input for a parallel adapter."""
        self.__dict__["_ffn_input"] = args[0]

    def take_input(self) -> torch.Tensor:
        z = self.__dict__.pop("_ffn_input", None)
        if z is None:
            raise RuntimeError("parallel adapter: the FFN's input was not seen before its output (the ffn_in layer "
                               "did not run first); this FFN's layout does not fit a parallel adapter")
        return z


def _linear(in_f: int, out_f: int, like: torch.Tensor, zero: bool) -> nn.Linear:
    # kaiming-uniform weight (nn.Linear's init), float32 beside a bf16/fp16 base (precision.py)
    lin = nn.Linear(in_f, out_f, dtype=trainable_dtype(like), device=like.device)
    with torch.no_grad():
        lin.bias.zero_()
        if zero:
            lin.weight.zero_()
    return lin


class PHMRule(nn.Module):
    """Compacter's slow weights: n matrices A_i of n×n, one object shared by every PHM layer of one kind."""

    def __init__(self, n: int, like: torch.Tensor):
        super().__init__()
        # var(W) = n · var(A)·var(s)·var(t) = 1/in with var(A) = 1/n, s ~ N(0, 1), t ~ N(0, 1/in): a kaiming-like scale
        self.A = nn.Parameter(torch.randn(n, n, n, dtype=trainable_dtype(like), device=like.device) / math.sqrt(n))


class PHMLinear(nn.Module):
    """A PHM layer: ``weight = Σ_i A_i ⊗ (s_i t_iᵀ)``, (out, in), A_i from the shared rule, s_i (out/n), t_i (in/n)."""

    def __init__(self, in_f: int, out_f: int, rule: PHMRule, zero: bool):
        super().__init__()
        n = rule.A.shape[0]
        if in_f % n or out_f % n:
            raise ConfigError(f"compacter: PHM layer {in_f} -> {out_f} does not divide by phm_dim n={n}; choose an n "
                              "that divides the hidden size and the bottleneck width")
        kw = {"dtype": rule.A.dtype, "device": rule.A.device}
        self.rule = rule
        self.s = nn.Parameter(torch.randn(n, out_f // n, **kw))
        t = torch.zeros(n, in_f // n, **kw)
        if not zero:
            t.normal_(0.0, 1.0 / math.sqrt(in_f))
        self.t = nn.Parameter(t)
        self.bias = nn.Parameter(torch.zeros(out_f, **kw))

    @property
    def weight(self) -> torch.Tensor:
        """W[a·p + i, b·q + j] = Σ_k A_k[a, b] s_k[i] t_k[j]: the sum of Kronecker products, as an (out, in) matrix."""
        w = torch.einsum("kab,ki,kj->aibj", self.rule.A, self.s, self.t)
        return w.reshape(self.s.numel(), self.t.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# -- the forwards installed on the base's layers -----------------------------------------------------------------


def _after_forward(layer: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """A sequential adapter: ``h + adapter(h)`` with h the layer's output."""
    h = base_forward(x, *args, **kwargs)
    a: Bottleneck = layer.adapter
    return h + a(h) if a.active else h


def _beside_forward(layer: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """A parallel adapter on the FFN's last layer: ``h + adapter(FFN input)``."""
    h = base_forward(x, *args, **kwargs)
    a: Bottleneck = layer.adapter
    z = a.take_input()
    return h + a(z) if a.active else h


# -- the methods -----------------------------------------------------------------------------------------------


class BottleneckAdapters(AttachedMethod):
    """The adapter family; subclasses say where (``points`` after which an adapter sits, or ``beside``)."""

    child_name = "adapter"
    family = "additive"
    config_cls = AdapterConfig
    default_lr = 1e-4
    points: ClassVar[tuple[str, ...]] = ()  # sequential: an adapter after each of these points
    beside: ClassVar[bool] = False  # parallel: from ffn_in to ffn_out

    @classmethod
    def placement_points(cls) -> tuple[str, ...]:
        return ("ffn_in", "ffn_out") if cls.beside else cls.points

    def required_points(self) -> tuple[str, ...]:
        return self.placement_points()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(mergeable=False, restores_base=True, prunable=True, inference_overhead="extra_ffn",
                            quantized_base=True)

    def _apply(self, model, anat: Anatomy):
        self._start()
        self._check_points(anat)
        if self.beside:
            for src, dst in zip(anat.placements("ffn_in"), anat.placements("ffn_out"), strict=True):
                child = self.attach(dst.name, dst.module, self._bottleneck(src.size, dst.size), _beside_forward)
                self.add_handle(dst.name, src.module.register_forward_pre_hook(child.capture))
        else:
            for point in self._points(anat):
                for p in anat.placements(point):
                    self.attach(p.name, p.module, self._bottleneck(p.size, p.size), _after_forward)

    def _points(self, anat: Anatomy) -> list[str]:
        """The sequential points in this model: ``points`` and, unless ``cross=false``, their cross-attention
        counterparts where the model has a cross-attention (T5's decoder)."""
        return list(self.points) + (anat.cross_points(self.points) if self.config.cross else [])

    def _check_points(self, anat: Anatomy) -> None:
        self.require_points(anat, self.placement_points())
        sides = {"ffn_in": "in", "ffn_out": "out", "attn_out": "out", "cross_attn_out": "out"}
        for point in (self.placement_points() if self.beside else self._points(anat)):
            for p in anat.placements(point):
                if p.side != sides[point] or not p.whole:
                    raise PlacementError(f"{self.name}: placement {point!r} of {anat.model_type!r} is {p.side}put "
                                         f"features [{p.start}, {p.stop}) of {p.name}; an adapter needs the whole "
                                         f"{sides[point]}put of a layer")

    def _bottleneck(self, in_f: int, out_f: int) -> Bottleneck:
        cfg = self.config
        like = next(self._model().parameters())
        m = cfg.width(in_f)
        return Bottleneck(_linear(in_f, m, like, zero=False), _linear(m, out_f, like, zero=True),
                          cfg.non_linearity, cfg.scale)

    def num_changed(self) -> int:
        return self.num_trainable()  # additive: nothing of the base changes; the added tensors are the change

    # -- Light-PEFT's pruning interface: modules by ‖adapter(z)‖ / ‖z‖, bottleneck width by Taylor scores ----------
    def prune_units(self) -> dict[str, AdapterUnit]:
        return {n: AdapterUnit(layer, a.down.weight, a.up.weight, a, term_module=a) for n, layer, a in self.children()}

    def prune_widths(self) -> dict[str, int]:
        return {n: a.down.weight.shape[0] for n, _layer, a in self.children()}

    @torch.no_grad()
    def keep_widths(self, name: str, idx: list[int]) -> None:
        """Keep bottleneck units ``idx``: rows of W_down and b_down, columns of W_up."""
        a = self.child(name)
        i = torch.tensor(idx, dtype=torch.long, device=a.down.weight.device)
        a.down.weight = nn.Parameter(a.down.weight[i].contiguous())
        a.down.bias = nn.Parameter(a.down.bias[i].contiguous())
        a.up.weight = nn.Parameter(a.up.weight[:, i].contiguous())
        a.down.out_features = a.up.in_features = len(idx)

    def follow_slice(self, layer: nn.Module, side: str, idx: torch.Tensor) -> None:
        """Adapters read and write hidden-size features (a layer's output after attention or the FFN, the FFN's
        input), which foundation pruning never slices; a slice there means a layout this adapter does not follow."""
        a = getattr(layer, self.child_name, None)
        if a is not None and side == "out":
            raise ValueError(f"{self.name}: foundation pruning sliced the output of {type(layer).__name__}, which an "
                             "adapter reads; prune only heads and FFN channels with adapters")


@register("houlsby")
class Houlsby(BottleneckAdapters):
    description = "Houlsby adapters: two sequential bottlenecks per block, after attention and after the FFN."
    config_cls = HoulsbyConfig
    points = ("attn_out", "ffn_out")


@register("pfeiffer")
class Pfeiffer(BottleneckAdapters):
    description = "Pfeiffer adapter: one sequential bottleneck per block, after the FFN."
    points = ("ffn_out",)


@register("parallel")
class Parallel(BottleneckAdapters):
    description = "Parallel adapter: a bottleneck beside the FFN, from its input to its output (He et al. 2022)."
    beside = True


@register("scaled_parallel")
class ScaledParallel(BottleneckAdapters):
    description = "Scaled parallel adapter: a parallel adapter whose output is multiplied by s = 4 (He et al. 2022)."
    config_cls = ScaledParallelConfig
    beside = True


class _CompacterBase(BottleneckAdapters):
    config_cls = CompacterConfig
    default_lr = 3e-3

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(mergeable=False, restores_base=True, prunable=False, inference_overhead="extra_ffn",
                            fsdp=False, fsdp_refusal="Compacter's slow weights are shared by every block's adapters, "
                            "and FSDP shards each block as its own unit", quantized_base=True)

    def _apply(self, model, anat):
        like = next(model.parameters())
        n = self.config.phm_dim
        self.rules = {"down": PHMRule(n, like), "up": PHMRule(n, like)}  # shared by every layer
        super()._apply(model, anat)

    def _bottleneck(self, in_f: int, out_f: int) -> Bottleneck:
        cfg = self.config
        m = cfg.width(in_f, multiple=cfg.phm_dim)
        return Bottleneck(PHMLinear(in_f, m, self.rules["down"], zero=False),
                          PHMLinear(m, out_f, self.rules["up"], zero=True), cfg.non_linearity, cfg.scale)


@register("compacter")
class Compacter(_CompacterBase):
    family = "hybrid"
    description = "Compacter: Houlsby adapters whose matrices are PHM layers (shared n×n slow weights, rank-1 fast)."
    points = ("attn_out", "ffn_out")


@register("compacter_pp")
class CompacterPP(_CompacterBase):
    family = "hybrid"
    description = "Compacter++: one PHM adapter per block, after the FFN (Pfeiffer placement)."
    points = ("ffn_out",)
