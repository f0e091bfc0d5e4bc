"""S²FT: structured sparse fine-tuning (Yang et al., NeurIPS 2024, arXiv 2412.06289).

"Select sparsely, compute densely": whole attention heads of ``o`` (blocks of ``head_dim`` input columns) and whole
FFN channels of ``down`` (input columns) train; optionally whole KV heads of ``v`` and channels of ``up`` (output
rows). Everything works in the original coordinates (no co-permutation of heads), so GQA, explicit ``head_dim``,
GPT-2's Conv1D and BERT need no special case beyond the anatomy.

A target layer gains a child module ``s2ft`` (``indices`` + a dense block ``delta``, zero at init) and a forward
that computes the layer and the block in one autograd function (``methods/fused.py``) where it can:
  input slice   ``y = x Wᵀ + x[..., idx] Dᵀ``     D: (out, k); only the k-column copy ``x[..., idx]`` is saved
  output slice  ``y[..., idx] += x Dᵀ``           D: (k, in); saves x, like LoRA does
The base weight never gets a gradient, and the block's input gradient is added into the base's in place. Merge adds D into the selected columns (saving the originals, so unmerge
is bitwise); the adapter bank (``serve/bank.py``) switches adapters by restoring k columns and ``index_add_``-ing
the next adapter's (cost independent of the layer's width); ``fuse`` sums adapters' states; ``to_lora`` / ``save_peft`` export a rank-k LoRA that ``peft`` loads.

The adapter state is, per module, ``<name>.in_indices`` + ``<name>.in_delta`` (input slice) or ``<name>.out_indices``
+ ``<name>.out_delta`` (output slice); loading a state adopts its k, so fused adapters save and load like any other.

Mixture of experts: ``down`` also selects channels per routed expert in the 3-D ``experts.down_proj`` [E, H, I]:
expert e trains a dense block D_e (H, k) on its own k channels idx_e, ``W_e[:, idx_e] += D_e`` (a parametrization of
the experts module, computed once per forward); the state holds ``<experts>.down_proj.expert_indices`` [E, k] and
``.expert_delta`` [E, H, k]; ``up`` likewise trains k output rows of the up half of each expert's fused
``experts.gate_up_proj`` [E, 2I, H] (rows from the anatomy's ``expert_ffn_rows``; block [E, k, H]). Selection: random,
weight norms, gradient norms or activation norms (per expert: act(gate)·up and the gate_up output over the tokens
routed to it, recomputed from the experts module's ``act_fn`` in a hook); ``exclude=`` and ``fuse`` work per expert
(``_fuse_experts``); no LoRA/PEFT form.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Anatomy, in_out_features, is_conv1d, resolve_roles, weight_2d
from ..precision import trainable_dtype
from ..quant import refuse_quantized_merge
from . import fused
from .attached import AttachedMethod
from .base import Capabilities, ConfigError, MethodConfig, register
from .lora import _experts_forward
from .terms import Columns, Rows

S2FT_ROLES = ("o", "down", "v", "up")
_SIDE = {"o": "in", "down": "in", "v": "out", "up": "out"}  # which axis of the (out, in) weight is sliced
_KIND = {"o": "head", "v": "head", "down": "channel", "up": "channel"}
BUDGETS = ("lora", "ratio", "count")
SELECTIONS = ("random", "activation", "weight", "gradient")
DATA_SELECTIONS = ("activation", "gradient")
ORDERS = ("smallest", "largest")


@dataclass
class S2FTConfig(MethodConfig):
    targets: str = "o,down"  # any of o, down (input slices), v, up (output slices)
    budget: str = "lora"  # lora: match a LoRA's parameter count | ratio: a fraction of units | count: per layer
    lora_r: int = 16  # budget=lora: the LoRA rank to match ...
    lora_targets: str = "all-linear"  # ... on these roles
    head_share: float = 0.5  # budget=lora: the part of each layer's budget that goes to attention heads
    ratio: float = 0.05  # budget=ratio: fraction of each target's heads / channels per layer (at least 1)
    heads: int = 0  # budget=count: heads per layer in o (KV heads in v, capped at n_kv_heads)
    channels: int = 0  # budget=count: channels per layer in down (and up)
    selection: str = "random"  # random | activation | weight | gradient (activation, gradient need calibrate())
    order: str = "smallest"  # activation/weight/gradient: pick the smallest or the largest norms
    seed: int = 0
    calibration_batches: int = 8  # activation/gradient: training micro-batches used when calibrate() was not called

    def validate(self):
        def bad(msg):
            raise ConfigError(f"s2ft: {msg}")

        roles = [r.strip() for r in self.targets.split(",") if r.strip()]
        if not roles or any(r not in S2FT_ROLES for r in roles):
            bad(f"targets {self.targets!r} must be a comma list of {', '.join(S2FT_ROLES)}")
        if self.budget not in BUDGETS:
            bad(f"budget {self.budget!r} must be one of {', '.join(BUDGETS)}")
        if self.selection not in SELECTIONS:
            bad(f"selection {self.selection!r} must be one of {', '.join(SELECTIONS)}")
        if self.order not in ORDERS:
            bad(f"order {self.order!r} must be smallest or largest")
        if self.lora_r < 1:
            bad(f"lora_r must be >= 1, got {self.lora_r}")
        try:
            resolve_roles(self.lora_targets)
        except ValueError as e:
            bad(f"lora_targets: {e}")
        if not 0.0 <= self.head_share <= 1.0:
            bad(f"head_share must be in [0, 1], got {self.head_share}")
        if not 0.0 < self.ratio <= 1.0:
            bad(f"ratio must be in (0, 1], got {self.ratio}")
        if self.heads < 0 or self.channels < 0:
            bad(f"heads and channels must be >= 0, got heads={self.heads}, channels={self.channels}")
        if self.budget == "count" and self.heads == 0 and self.channels == 0:
            bad("budget='count' needs heads > 0 or channels > 0 (per layer)")
        if self.calibration_batches < 1:
            bad(f"calibration_batches must be >= 1, got {self.calibration_batches}")

    @property
    def roles(self) -> list[str]:
        return [r.strip() for r in self.targets.split(",") if r.strip()]


# -- the layer ----------------------------------------------------------------------------------------------


class _InputSliceDelta(torch.autograd.Function):
    """``x[..., idx] @ Dᵀ``. Saves the k-column copy of x (not x) and D; D's gradient is ``gᵀ x[..., idx]``."""

    @staticmethod
    def forward(ctx, x, delta, idx):
        xs = x.index_select(-1, idx).to(delta.dtype)  # a copy of k columns: what backward keeps alive
        ctx.save_for_backward(xs, delta)
        ctx.idx, ctx.x_shape, ctx.x_dtype = idx, x.shape, x.dtype  # idx is the module's own buffer
        return F.linear(xs, delta)

    @staticmethod
    def backward(ctx, g):
        xs, delta = ctx.saved_tensors
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = g.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
            gx.index_add_(-1, ctx.idx, (g @ delta).to(ctx.x_dtype))
        if ctx.needs_input_grad[1]:
            gd = g.reshape(-1, g.shape[-1]).t() @ xs.reshape(-1, xs.shape[-1])
        return gx, gd, None


class S2FTSlice(nn.Module):
    """The trainable slice of one layer: ``indices`` into the (out, in) weight's ``side`` axis and the dense
    block ``delta``. Selection works in units: row u of ``unit_index`` holds unit u's ``unit`` indices on the sliced
    axis (a head's rows inside a fused qkv, wherever the family's layout puts them; a channel's one index)."""

    def __init__(self, side: str, count: int, unit_index: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        out_f, in_f = weight.shape
        k = count * unit_index.shape[1]
        shape = (out_f, k) if side == "in" else (k, in_f)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=trainable_dtype(weight), device=weight.device))
        self.register_buffer("indices", torch.zeros(k, dtype=torch.long, device=weight.device), persistent=False)
        self.register_buffer("saved", None, persistent=False)  # the original columns while merged
        self.register_buffer("unit_index", unit_index.to(dtype=torch.long, device=weight.device), persistent=False)
        self.side, self.n_units, self.unit = side, unit_index.shape[0], unit_index.shape[1]
        self.selected = False
        self.merged = False
        self.active = True

    @property
    def dim(self) -> int:
        return 1 if self.side == "in" else 0

    def set_indices(self, idx: torch.Tensor) -> None:
        self.indices = idx.to(dtype=torch.long, device=self.delta.device)
        self.selected = True

    def dense(self, weight_shape) -> torch.Tensor:
        """ΔW as an (out, in) matrix (zeros outside the slice)."""
        d = torch.zeros(weight_shape, dtype=self.delta.dtype, device=self.delta.device)
        return d.index_copy_(self.dim, self.indices, self.delta.detach())

    def _stored(self, mod: nn.Module) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(weight as stored, the sliced dim in it, delta in its orientation): index ops on a Conv1D's transposed
        view take a slow path, while its (out, in) columns are contiguous rows of the stored (in, out) weight."""
        if is_conv1d(mod):
            return mod.weight, 1 - self.dim, self.delta.t()
        return mod.weight, self.dim, self.delta

    @torch.no_grad()
    def merge_into(self, mod: nn.Module) -> None:
        refuse_quantized_merge(mod, "s2ft")
        w, dim, delta = self._stored(mod)
        self.saved = w.index_select(dim, self.indices)  # a new tensor: the original values, for a bitwise unmerge
        w.index_add_(dim, self.indices, delta.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def restore(self, mod: nn.Module) -> None:
        w, dim, _ = self._stored(mod)
        w.index_copy_(dim, self.indices, self.saved)
        self.saved = None
        self.merged = False


class ExpertChannels(nn.Module):
    """Per routed expert e, k channels of one 3-D expert weight and a dense block ``delta[e]``, zero at init; a child
    ``s2ft_<param>`` of the experts module. ``down_proj`` [E, H, I]: input columns ``indices[e]`` (``dim`` 2), block
    (H, k); ``gate_up_proj`` [E, 2I, H]: output rows ``indices[e]`` of its up half (``dim`` 1), block (k, H).
    ``unit_index[c]`` is channel c's index on the sliced axis (the anatomy's: ``expert_ffn_rows``)."""

    def __init__(self, weight: torch.Tensor, count: int, dim: int, unit_index: torch.Tensor):
        super().__init__()
        e, rows, cols = weight.shape
        shape = (e, rows, count) if dim == 2 else (e, count, cols)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=trainable_dtype(weight), device=weight.device))
        self.register_buffer("indices", torch.zeros(e, count, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.register_buffer("saved", None, persistent=False)
        self.register_buffer("unit_index", unit_index.to(dtype=torch.long, device=weight.device), persistent=False)
        self.dim, self.n_units = dim, len(unit_index)
        self.selected = self.merged = False
        self.active = True

    def spread(self, like: torch.Tensor) -> torch.Tensor:
        """The indices expanded over the other axis, for scatter/gather on the 3-D weight."""
        if self.dim == 2:
            return self.indices[:, None, :].expand(-1, like.shape[1], -1)
        return self.indices[:, :, None].expand(-1, -1, like.shape[2])

    def coord_sq(self, w3d: torch.Tensor) -> torch.Tensor:
        """[E, sliced axis]: each expert's squared L2 norm of every index's slice of ``w3d`` (a weight, a gradient)."""
        return w3d.detach().float().pow(2).sum(3 - self.dim)  # over the axis that is not sliced

    def unit_norms(self, coord_sq: torch.Tensor) -> torch.Tensor:
        """[E, channels]: per expert, each channel's L2 norm from squared norms along the sliced axis."""
        return coord_sq[:, self.unit_index.to(coord_sq.device)].sqrt()

    @torch.no_grad()
    def merge_into(self, w: torch.Tensor) -> None:
        idx = self.spread(w)
        self.saved = w.gather(self.dim, idx)  # the original values, for a bitwise unmerge
        w.scatter_add_(self.dim, idx, self.delta.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def restore(self, w: torch.Tensor) -> None:
        w.scatter_(self.dim, self.spread(w), self.saved)
        self.saved, self.merged = None, False


class _ExpertChannelsDelta(nn.Module):
    """The parametrization: W -> W with each expert's block added on its channels (its gradient is the full-weight
    gradient's selected slices; the channels are held by reference, so their delta stays under the experts module)."""

    def __init__(self, channels: ExpertChannels):
        super().__init__()
        self.__dict__["channels"] = channels

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        c = self.__dict__["channels"]
        if not c.active or c.merged:
            return w
        return w.scatter_add(c.dim, c.spread(w), c.delta.to(w.dtype))


def _s2ft_term(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The layer's output plus the slice's term, given the layer's own output (when the layer cannot be fused)."""
    s: S2FTSlice = module.s2ft
    if s.side == "in":
        delta = s.delta if s.delta.dtype == output.dtype else s.delta.to(output.dtype)  # autocast: compute dtype
        with torch.autocast(x.device.type, enabled=False):
            return output + _InputSliceDelta.apply(x, delta, s.indices)
    h = F.linear(x.to(s.delta.dtype), s.delta)  # under autocast F.linear casts both to the compute dtype
    return output.index_add(-1, s.indices, h.to(output.dtype))


def _s2ft_forward(module: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    """The forward of a layer that carries a slice: the layer and the slice in one autograd function where it can
    be (``methods/fused.py``: the slice's input gradient lands in the base's in place), else the layer plus the term."""
    s: S2FTSlice = module.s2ft
    if s.merged or not s.active:
        return base_forward(x, *args, **kwargs)
    if not s.selected:
        raise RuntimeError(
            "s2ft: no indices selected yet. selection='activation'/'gradient' needs calibration data: call "
            "method.calibrate(batches) before training, or build S2FT(config, calibration=batches)"
        )
    if fusable and fused.can_fuse(module, x, s.delta):
        return fused.slice_linear(module, x, s.delta, s.indices, s.side)
    return _s2ft_term(module, x, base_forward(x, *args, **kwargs))


# -- the method ---------------------------------------------------------------------------------------------


@register("s2ft")
class S2FT(AttachedMethod):
    """S²FT on a model. Besides the config: ``calibration`` (batches of ``input_ids`` / ``attention_mask`` /
    ``labels`` tensors) runs the data-driven selection at ``apply``; ``exclude`` (an s2ft state dict, adapter folder
    or S2FT method) keeps the new selection disjoint from that adapter's indices, for later fusion."""

    child_name = "s2ft"
    family = "selective"
    description = ("S²FT: whole attention heads (o) and FFN channels (down) train as dense blocks in the original "
                   "coordinates; partial backprop; adapters switch by index_add_ (serve/bank.py), fuse, and export as LoRA.")
    config_cls = S2FTConfig
    default_lr = 2e-3  # the paper's S²FT LR is about 4x LoRA's; leantune's LoRA default is 5e-4

    def __init__(self, config: S2FTConfig | None = None, *, calibration=None, exclude=None):
        super().__init__(config)
        self.calibration = calibration
        self.exclude = exclude

    @property
    def capabilities(self) -> Capabilities:
        # on a quantized layer the block is a term beside Q(W)x (the unfused path: fused.py's functions need a
        # plain weight); selection="gradient" needs W's own gradient, which a 4-bit/8-bit weight does not get
        gradient = self.config.selection == "gradient"
        return Capabilities(mergeable=True, restores_base=True, mixed_batch=True, inference_overhead="extra_ffn",
                            quantized_base=not gradient,
                            quantized_refusal="selection='gradient' needs the gradient of the base weight itself, "
                            "which a quantized weight does not get; use selection random, weight or activation")

    # -- apply: structure, budget, selection ---------------------------------------------------------------
    def _apply(self, model, anat):
        cfg = self.config
        self._start()
        self.experts: dict[str, nn.Module] = {}  # "<experts module>.<down_proj | gate_up_proj>" -> the module
        self._expert_hooks = []
        per_block = self._targets(anat)
        lora_params = self._lora_params(anat)
        for block in anat.blocks:
            targets = per_block[block.index]
            counts = self._layer_counts(targets, lora_params.get(block.index, 0), block.index)
            for t in targets:
                if counts[t["name"]] == 0:
                    continue
                mod = t["module"]
                if t.get("experts"):
                    self._attach_experts(t["name"], mod, counts[t["name"]], t["unit_index"])
                    continue
                self.attach(t["name"], mod, S2FTSlice(t["side"], counts[t["name"]], t["unit_index"], weight_2d(mod)),
                            _s2ft_forward)
        if not self.layers and not self.experts:
            raise ValueError(f"s2ft: the budget selects nothing on this {anat.model_type} model ({cfg}); "
                             "raise lora_r, ratio, heads or channels")
        if cfg.selection == "random":
            self._select(None)
        elif cfg.selection == "weight":
            self._select({n: self._unit_norms(m.s2ft, _coord_sq(weight_2d(m), m.s2ft.side))
                          for n, m in self.layers.items()})
        elif self.calibration is not None:
            self.calibrate(self.calibration)

    def _attach_experts(self, name: str, mod: nn.Module, count: int, unit_index: torch.Tensor) -> None:
        from torch.nn.utils import parametrize

        attr = name.rsplit(".", 1)[1]  # down_proj: input columns; gate_up_proj: output rows of its up half
        channels = ExpertChannels(getattr(mod, attr), count, 2 if attr == "down_proj" else 1, unit_index)
        mod.add_module(f"s2ft_{attr}", channels)
        if not hasattr(mod, "parametrizations"):  # the forward that computes the parametrized weights once per call
            self._expert_hooks.append(fused.override_forward(mod, _experts_forward))
        parametrize.register_parametrization(mod, attr, _ExpertChannelsDelta(channels), unsafe=True)
        self.experts[name] = mod

    def _expert_channels(self):
        """(name, experts module, ExpertChannels, the stored 3-D weight) per adapted expert parameter."""
        for name, mod in getattr(self, "experts", {}).items():
            attr = name.rsplit(".", 1)[1]
            yield name, mod, getattr(mod, f"s2ft_{attr}"), getattr(mod.parametrizations, attr).original

    def trainable_parameters(self):
        yield from self._named_child_parameters()
        for name, _mod, c, _w in self._expert_channels():
            module, attr = name.rsplit(".", 1)
            yield f"{module}.s2ft_{attr}.delta", c.delta

    def unload(self) -> nn.Module:
        """Take the expert channels off too (the weights as they are: merged values after merge_and_unload)."""
        from torch.nn.utils import parametrize

        self._model()
        for h in getattr(self, "_expert_hooks", []):
            h.remove()
        for name, mod, _c, _w in list(self._expert_channels()):
            attr = name.rsplit(".", 1)[1]
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
            delattr(mod, f"s2ft_{attr}")
        self.experts, self._expert_hooks = {}, []
        return super().unload()

    def check_model(self, anat: Anatomy) -> None:
        if not anat.n_experts or "down" not in self.config.roles and "up" not in self.config.roles:
            return
        where = f"s2ft: this {anat.model_type} model's FFN is a mixture of {anat.n_experts} experts held as 3-D parameters"
        experts = next(b.experts for b in anat.blocks if b.experts is not None)
        if self.config.selection == "activation" and not callable(getattr(experts, "act_fn", None)):
            raise ConfigError(f"{where}, whose experts module ({type(experts).__name__}) has no act_fn to compute "
                              "their activations from; per-expert channels are selected by activation norm only "
                              "where it has one: use selection=random, weight or gradient")

    def _targets(self, anat: Anatomy) -> dict[int, list[dict]]:
        """Per block, the target layers with their slicing geometry: the anatomy says where each unit's indices are
        (v heads inside a fused qkv, up channels inside a fused gate_up)."""
        hd, nh = anat.head_dim, anat.n_heads
        out: dict[int, list[dict]] = {b.index: [] for b in anat.blocks}
        for role in self.config.roles:
            for name, _real_role, i, mod in anat.linears([role]):
                in_f, out_f = in_out_features(mod)
                if role == "o":
                    if in_f != nh * hd:
                        raise ValueError(f"s2ft: {name} has {in_f} inputs, expected heads x head_dim = {nh}x{hd}")
                    unit_index = anat.head_columns().reshape(nh, hd)
                elif role == "v":
                    unit_index = anat.head_rows("v").reshape(anat.n_kv_heads, hd)
                    if int(unit_index.max()) >= out_f:
                        raise ValueError(f"s2ft: {name} has {out_f} outputs, too few for {anat.n_kv_heads} KV heads of "
                                         f"{hd} in the {anat.qkv_layout!r} layout (q/k/v layout not understood)")
                elif role == "up":  # the module's own channels (a shared expert's FFN is not the experts' size)
                    unit_index = anat.ffn_rows("up", torch.arange(out_f // 2 if _real_role == "gate_up" else out_f))
                    unit_index = unit_index[:, None]
                else:
                    unit_index = torch.arange(in_f)[:, None]
                side = _SIDE[role]
                unit, n_units = unit_index.shape[1], unit_index.shape[0]
                cost = unit * (out_f if side == "in" else in_f)  # parameters per selected unit
                out[i].append({"name": name, "role": role, "module": mod, "side": side, "unit_index": unit_index,
                               "n_units": n_units, "cost": cost, "kind": _KIND[role]})
        for role in [r for r in self.config.roles if r in ("down", "up")]:
            for b in anat.blocks:
                if b.experts is None:
                    continue
                # one channel in each expert costs E x H parameters: a column of down_proj, a row of gate_up_proj's up
                attr = "down_proj" if role == "down" else "gate_up_proj"
                e, h = b.experts.down_proj.shape[:2]
                unit_index = torch.arange(b.experts.down_proj.shape[2]) if role == "down" else anat.expert_ffn_rows("up")
                out[b.index].append({"name": f"{anat.name_of(b.experts)}.{attr}", "role": role, "module": b.experts,
                                     "side": _SIDE[role], "unit_index": unit_index, "n_units": len(unit_index),
                                     "cost": e * h, "kind": "channel", "experts": True})
        return out

    def _lora_params(self, anat: Anatomy) -> dict[int, int]:
        """Per block, the trainable parameters of a LoRA of rank lora_r on lora_targets: sum r*(in+out)."""
        out: dict[int, int] = {}
        for _name, _role, i, mod in anat.linears(self.config.lora_targets):
            in_f, out_f = in_out_features(mod)
            out[i] = out.get(i, 0) + self.config.lora_r * (in_f + out_f)
        return out

    def _layer_counts(self, targets: list[dict], budget: int, block: int) -> dict[str, int]:
        """Units per target in one layer (see docs/s2ft.md, "Budget")."""
        cfg = self.config
        counts: dict[str, int] = {}
        if cfg.budget == "count":
            for t in targets:
                want = cfg.heads if t["kind"] == "head" else cfg.channels
                if t["role"] == "v":
                    want = min(want, t["n_units"])  # GQA: fewer KV heads than query heads
                if want > t["n_units"]:
                    raise ConfigError(f"s2ft: {t['name']} has {t['n_units']} {t['kind']}s, asked for {want} per layer")
                counts[t["name"]] = want
            return counts
        if cfg.budget == "ratio":
            return {t["name"]: min(t["n_units"], max(1, math.floor(cfg.ratio * t["n_units"] + 0.5))) for t in targets}
        attn = [t for t in targets if t["kind"] == "head"]
        ffn = [t for t in targets if t["kind"] == "channel"]
        left = budget
        attn_share = budget * (cfg.head_share if ffn else 1.0) / max(1, len(attn))
        for t in attn:  # heads: nearest whole number of heads, never past the layer's budget
            n = min(t["n_units"], math.floor(attn_share / t["cost"] + 0.5), left // t["cost"])
            counts[t["name"]] = n
            left -= n * t["cost"]
        for j, t in enumerate(ffn):  # channels: what the heads left, rounded down, split over the FFN targets
            n = min(t["n_units"], int(left / (len(ffn) - j)) // t["cost"])
            counts[t["name"]] = n
            left -= n * t["cost"]
        if targets and all(counts[t["name"]] == t["n_units"] for t in targets) and left > 0 and block == 0:
            warnings.warn(f"s2ft: the LoRA r={cfg.lora_r} budget ({budget} parameters per layer) exceeds what "
                          f"targets {cfg.targets!r} hold; every head and channel of them trains", stacklevel=4)
        return counts

    @staticmethod
    def _unit_norms(s: S2FTSlice, coord_sq: torch.Tensor) -> torch.Tensor:
        """Per-unit L2 norm from per-index squared norms along the sliced axis."""
        return coord_sq[s.unit_index.to(coord_sq.device)].sum(1).sqrt()

    def _select(self, scores: dict[str, torch.Tensor] | None) -> None:
        """Pick each layer's units: random (seeded) when ``scores`` is None, else by score in ``order``."""
        self._select_layers(scores)
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        excluded = _expert_state_indices(_as_state(self.exclude)) if self.exclude is not None else {}
        for name, _mod, c, w in self._expert_channels():  # per expert: its own channels
            count = c.indices.shape[1]
            if scores is None:
                score = torch.rand(w.shape[0], c.n_units, generator=gen).double()
            else:  # [E, channels]: each expert's norms (of the weight, or of its gradient from calibration)
                score = (scores[name] if name in scores else c.unit_norms(c.coord_sq(w))).double().cpu()
                score = -score if self.config.order == "largest" else score
            if name in excluded:  # the other adapter's channels of each expert come last, and must not be needed
                ex = excluded[name]
                if ex.shape[0] != w.shape[0] or not bool(torch.isin(ex, c.unit_index.cpu()).all()):
                    raise ValueError(f"s2ft: exclude= holds {tuple(ex.shape)} expert indices for {name}, which do not "
                                     f"fit its {w.shape[0]} experts; exclude an adapter of this base model")
                blocked = torch.zeros(score.shape, dtype=torch.bool)
                blocked.scatter_(1, torch.searchsorted(c.unit_index.cpu(), ex), True)
                free = int((~blocked).sum(1).min())
                if free < count:
                    raise ValueError(f"s2ft: {name} needs {count} channels per expert but only {free} are outside the "
                                     "excluded adapter in some expert; lower the budget or exclude less")
                score = score.masked_fill(blocked, math.inf)
            units = torch.sort(torch.argsort(score, dim=1, stable=True)[:, :count], dim=1).values
            c.indices = c.unit_index[units.to(c.unit_index.device)]
            c.selected = True

    def _select_layers(self, scores: dict[str, torch.Tensor] | None) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        excluded = _state_indices(_as_state(self.exclude)) if self.exclude is not None else {}
        for name, mod in self.layers.items():
            s = mod.s2ft
            count = s.delta.shape[s.dim] // s.unit
            score = torch.rand(s.n_units, generator=gen) if scores is None else scores[name].detach().double().cpu()
            if self.config.order == "largest" and scores is not None:
                score = -score
            allowed = torch.ones(s.n_units, dtype=torch.bool)
            ex = excluded.get((name, s.side))
            if ex is not None:
                units = _unit_of(s, weight_2d(mod).shape[s.dim])[ex.to(torch.long).cpu()]
                allowed[units[units >= 0]] = False
            candidates = torch.nonzero(allowed).flatten()
            if len(candidates) < count:
                raise ValueError(f"s2ft: {name} needs {count} units but only {len(candidates)} of {s.n_units} are "
                                 "outside the excluded adapter; lower the budget or exclude less")
            order = torch.argsort(score[candidates], stable=True)
            units = torch.sort(candidates[order[:count]]).values
            idx = s.unit_index.cpu()[units].flatten()
            s.set_indices(idx)

    # -- calibration (activation / gradient selection) -----------------------------------------------------
    def calibrate(self, batches) -> S2FT:
        """Select indices from data, before training: ``batches`` of tensors (``input_ids``, ``attention_mask``;
        ``labels`` too for selection='gradient'). Activation norms skip padding (attention_mask == 0)."""
        cfg = self.config
        if cfg.selection not in DATA_SELECTIONS:
            raise ConfigError(f"s2ft: selection={cfg.selection!r} uses no calibration data; "
                              f"calibrate() is for {' or '.join(DATA_SELECTIONS)}")
        deltas = [m.s2ft.delta for m in self.layers.values()] + [c.delta for _n, _m, c, _w in self._expert_channels()]
        if any(bool(d.detach().ne(0).any()) for d in deltas):
            raise RuntimeError("s2ft: calibrate() re-selects indices and must run before training (deltas are not zero)")
        if self.merged:
            raise RuntimeError("s2ft: unmerge() before calibrate()")
        model = self._model()
        batches = list(batches)
        if not batches:
            raise ValueError("s2ft: calibrate() got no batches")
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items() if torch.is_tensor(v)} for b in batches]
        was_training = model.training
        model.eval()
        parts = [m.s2ft for m in self.layers.values()] + [c for _n, _m, c, _w in self._expert_channels()]
        for part in parts:
            part.active = False  # calibrate the base alone
        try:
            scores = self._activation_scores(batches) if cfg.selection == "activation" else self._gradient_scores(batches)
        finally:
            for part in parts:
                part.active = True
            model.train(was_training)
        self._select(scores)
        return self

    @torch.no_grad()
    def _activation_scores(self, batches) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        current: dict[str, dict] = {"masks": {}}
        # an encoder-decoder's decoder layers see the decoder's tokens: their padding is the decoder_attention_mask
        anat = self.anatomy
        first = anat.blocks[0].stack if anat.blocks else ""
        decoder_side = {anat.name_of(m) for b in anat.blocks if b.stack != first for m in b.linears.values()}

        def record(name, t):
            mask = current["masks"]["decoder" if name in decoder_side else "input"]
            if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
                t = t * mask[..., None].to(t.dtype)
            sq = t.float().pow(2).reshape(-1, t.shape[-1]).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

        def record_experts(mod, args, kwargs, _out):
            """Per routed expert, the squared norms of its FFN's intermediate activation act(gate)·up (down's input
            columns) and of its gate_up output (up's rows), over the real tokens routed to it."""
            x = args[0] if args else kwargs["hidden_states"]
            routes = args[1] if len(args) > 1 else kwargs["top_k_index"]
            mask = current["masks"]["input"]
            real = mask.reshape(-1).bool() if mask is not None and mask.numel() == x.shape[0] else None
            gate_up = mod.gate_up_proj  # the base's weights: the channels are inactive during calibration
            for name, c in expert_parts[id(mod)]:
                sq = sums.setdefault(name, torch.zeros(c.indices.shape[0], gate_up.shape[1] // (2 if c.dim == 2 else 1),
                                                       device=x.device))
                for e in range(gate_up.shape[0]):
                    hit = (routes == e).any(-1) if real is None else (routes == e).any(-1) & real
                    h = F.linear(x[hit], gate_up[e]).float()
                    if c.dim == 2:  # down's inputs, from the [gate | up] halves where the anatomy puts them
                        h = mod.act_fn(h[:, rows["gate"]]) * h[:, rows["up"]]
                    sq[e] += h.pow(2).sum(0)

        rows = {p: anat.expert_ffn_rows(p) for p in ("gate", "up")} if anat.n_experts else {}
        expert_parts: dict[int, list] = {}  # experts module -> its adapted parameters' (name, channels)
        expert_mods = {}
        for name, mod, c, _w in self._expert_channels():
            expert_parts.setdefault(id(mod), []).append((name, c))
            expert_mods[id(mod)] = mod
        handles = [mod.register_forward_hook(record_experts, with_kwargs=True) for mod in expert_mods.values()]
        for name, mod in self.layers.items():
            if mod.s2ft.side == "in":
                handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: record(name, a[0])))
            else:
                handles.append(mod.register_forward_hook(lambda m, a, o, name=name: record(name, o)))
        try:
            for b in batches:
                current["masks"] = {"input": b.get("attention_mask"), "decoder": b.get("decoder_attention_mask")}
                self.model(**b)
        finally:
            for h in handles:
                h.remove()
        scores = {n: self._unit_norms(m.s2ft, sums[n]) for n, m in self.layers.items()}
        scores.update({n: c.unit_norms(sums[n]) for n, _m, c, _w in self._expert_channels()})
        return scores

    def _gradient_scores(self, batches) -> dict[str, torch.Tensor]:
        """Per layer the norm of each unit's slice of the full weight gradient (per expert: [E, channels])."""
        weights = {n: m.weight for n, m in self.layers.items()}
        weights.update({n: w for n, _m, _c, w in self._expert_channels()})  # through the parametrization
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)  # calibration only: the full gradient of the target layers, once
        try:
            with torch.enable_grad():
                for b in batches:
                    if "labels" not in b:
                        raise ValueError("s2ft: selection='gradient' needs batches with labels")
                    self.model(**b).loss.backward()
            scores = {}
            for n, m in self.layers.items():
                g = m.weight.grad.t() if is_conv1d(m) else m.weight.grad
                scores[n] = self._unit_norms(m.s2ft, _coord_sq(g, m.s2ft.side))
            for n, _m, c, w in self._expert_channels():
                scores[n] = c.unit_norms(c.coord_sq(w.grad))
        finally:
            for w in weights.values():
                w.grad = None
                w.requires_grad_(False)
        return scores

    def schedule(self):
        return _SelectionGuard() if self.config.selection in DATA_SELECTIONS else None

    # -- what trains, what changes ---------------------------------------------------------------------------
    def num_changed(self) -> int:
        return (sum(m.s2ft.delta.numel() for m in self.layers.values())
                + sum(c.delta.numel() for _n, _m, c, _w in self._expert_channels()))

    def selected_units(self) -> dict[str, list[int]]:
        """Per layer, the selected heads / channels (unit numbers, not indices)."""
        out = {n: _unit_of(m.s2ft, weight_2d(m).shape[m.s2ft.dim])[m.s2ft.indices[:: m.s2ft.unit].cpu()].tolist()
               for n, m in self.layers.items()}
        out.update({n: torch.searchsorted(c.unit_index, c.indices).tolist()  # per expert: channel numbers
                    for n, _m, c, _w in self._expert_channels()})
        return out

    # -- state -------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, mod in self.layers.items():
            s = mod.s2ft
            if not s.selected:
                raise RuntimeError(f"s2ft: {name} has no indices yet; call calibrate(batches) first")
            out[f"{name}.{s.side}_indices"] = s.indices
            out[f"{name}.{s.side}_delta"] = s.delta.data
        for name, _mod, c, _w in self._expert_channels():
            out[f"{name}.expert_indices"] = c.indices
            out[f"{name}.expert_delta"] = c.delta.data
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take indices and deltas from ``state`` (k may differ from this config's: fused adapters). On a merged
        model this is the exact switch: restore the current columns, then ``index_add_`` the new ones."""
        expected = {f"{n}.{m.s2ft.side}_{part}" for n, m in self.layers.items() for part in ("indices", "delta")}
        expected |= {f"{n}.expert_{part}" for n, *_ in self._expert_channels() for part in ("indices", "delta")}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"s2ft adapter does not match this model's s2ft layers: missing {missing[:4]}, "
                             f"unexpected {extra[:4]}; it was made with other targets or for another base model")
        checked = {}
        for name, mod in self.layers.items():
            s = mod.s2ft
            idx, delta = state[f"{name}.{s.side}_indices"], state[f"{name}.{s.side}_delta"]
            checked[name] = (_check_slice(name, s, weight_2d(mod).shape, idx, delta), delta)
        experts = {}
        for name, _mod, c, w in self._expert_channels():
            idx, delta = state[f"{name}.expert_indices"], state[f"{name}.expert_delta"]
            e, k = w.shape[0], idx.shape[-1]
            want = (e, w.shape[1], k) if c.dim == 2 else (e, k, w.shape[2])
            if (idx.dim() != 2 or idx.shape[0] != e or tuple(delta.shape) != want or idx.dtype.is_floating_point
                    or not bool(torch.isin(idx.cpu(), c.unit_index.cpu()).all())):
                raise ValueError(f"s2ft: {name}: expert channels {tuple(idx.shape)} / block {tuple(delta.shape)} do "
                                 f"not fit {e} experts of {c.n_units} channels (block {want}); made for another "
                                 "base model?")
            experts[name] = (idx.to(torch.long), delta)
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        for name, (idx, delta) in checked.items():
            s = self.layers[name].s2ft
            s.set_indices(idx)
            if delta.shape == s.delta.shape:
                s.delta.copy_(delta.to(s.delta.dtype))
            else:
                s.delta = nn.Parameter(delta.to(s.delta.dtype, copy=True).to(s.delta.device),
                                       requires_grad=s.delta.requires_grad)
        for name, _mod, c, _w in list(self._expert_channels()):
            idx, delta = experts[name]
            c.indices, c.selected = idx.to(c.delta.device), True
            if delta.shape == c.delta.shape:
                c.delta.copy_(delta.to(c.delta.dtype))
            else:
                c.delta = nn.Parameter(delta.to(c.delta.dtype, copy=True).to(c.delta.device),
                                       requires_grad=c.delta.requires_grad)
        if was_merged:
            self.merge()

    def bank_terms(self) -> dict | None:
        """Per layer, its block on k input columns (o, down) or k output rows (v, up); None with per-expert channels
        (a parametrization of the 3-D expert weight is no per-layer term)."""
        if getattr(self, "experts", None):
            return None
        kind = {"in": Columns, "out": Rows}
        return {n: [kind[m.s2ft.side](m.s2ft.indices, m.s2ft.delta.data)] for n, m in self.layers.items()}

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense (out, in) ΔW of one layer."""
        mod = self.layers[name]
        return mod.s2ft.dense(weight_2d(mod).shape)

    # -- merge ---------------------------------------------------------------------------------------------
    def merge(self) -> None:
        if self.merged:
            return
        for mod in self.layers.values():
            mod.s2ft.merge_into(mod)
        for _n, _m, c, w in self._expert_channels():
            c.merge_into(w)
        self.merged = True

    def unmerge(self) -> None:
        """Put back the columns saved at merge: the base weights return bitwise."""
        if not self.merged:
            return
        for mod in self.layers.values():
            mod.s2ft.restore(mod)
        for _n, _m, c, w in self._expert_channels():
            c.restore(w)
        self.merged = False

    # -- LoRA / PEFT export --------------------------------------------------------------------------------
    def to_lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (A, B)}`` with ``B @ A == ΔW`` at scale 1: an input slice gives A = one-hot rows of
        idx (k x in), B = D (out x k); an output slice gives A = D (k x in), B = one-hot columns (out x k)."""
        if getattr(self, "experts", None):
            raise ValueError("s2ft: per-expert channels (MoE down_proj) have no LoRA form in leantune yet; export "
                             "--format merged, or save the leantune adapter")
        out = {}
        for name, mod in self.layers.items():
            s = mod.s2ft
            out_f, in_f = weight_2d(mod).shape
            d = s.delta.detach().clone()
            k, rows = len(s.indices), torch.arange(len(s.indices), device=d.device)
            if s.side == "in":
                a = torch.zeros(k, in_f, dtype=d.dtype, device=d.device)
                a[rows, s.indices] = 1
                out[name] = (a, d)
            else:
                b = torch.zeros(out_f, k, dtype=d.dtype, device=d.device)
                b[s.indices, rows] = 1
                out[name] = (d, b)
        return out

    def lora_factors(self) -> dict | None:
        if getattr(self, "experts", None):  # a per-expert block is no Linear layer's LoRA
            return None
        return {"modules": self.to_lora(), "alpha": None, "use_rslora": False, "magnitudes": None, "dropout": 0.0}

    def save_peft(self, directory: str | os.PathLike) -> Path:
        """Write the adapter as a Hugging Face PEFT LoRA folder (rank k per module, scale 1)."""
        if len({is_conv1d(m) for m in self.layers.values()}) > 1:
            raise ValueError("s2ft: cannot export a mix of Conv1D and Linear targets as one PEFT LoRA")
        from ..interop.peft import export_peft

        return export_peft(self._model(), directory)


class _SelectionGuard:
    """A data-driven selection that was never calibrated calibrates on the first training batches (the loop
    offers them); without them, training does not start."""

    def on_train_begin(self, ctx):
        method = ctx.method
        if all(m.s2ft.selected for m in method.layers.values()) and all(
                c.selected for _n, _m, c, _w in method._expert_channels()):
            return
        if getattr(ctx, "_batches", None) is None:
            raise RuntimeError(f"s2ft: selection={method.config.selection!r} needs calibration data: call "
                               "method.calibrate(batches) before training")
        method.calibrate(ctx.training_batches(method.config.calibration_batches))

    def on_step_begin(self, ctx): ...

    def extra_loss(self, ctx):
        return None

    def on_step_end(self, ctx): ...

    def on_train_end(self, ctx): ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _unit_of(s: S2FTSlice, size: int) -> torch.Tensor:
    """For every index of the sliced axis (``size`` of them), the unit that holds it (-1: none)."""
    pos = torch.full((size,), -1, dtype=torch.long)
    pos[s.unit_index.cpu().flatten()] = torch.arange(s.n_units).repeat_interleave(s.unit)
    return pos


def _coord_sq(w2d: torch.Tensor, side: str) -> torch.Tensor:
    """Squared L2 norm of every column (input slice) or row (output slice) of an (out, in) matrix."""
    return w2d.detach().float().pow(2).sum(0 if side == "in" else 1)


def _check_slice(name, s: S2FTSlice, weight_shape, idx, delta) -> torch.Tensor:
    out_f, in_f = weight_shape
    size = in_f if s.side == "in" else out_f
    idx = idx.long().flatten()
    want = (out_f, len(idx)) if s.side == "in" else (len(idx), in_f)
    if tuple(delta.shape) != want:
        raise ValueError(f"s2ft adapter: {name} delta has shape {tuple(delta.shape)}, expected {want} for "
                         f"{len(idx)} indices; the file is damaged or for another base model")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= size or len(torch.unique(idx)) != len(idx)):
        raise ValueError(f"s2ft adapter: {name} indices must be distinct and in [0, {size}); "
                         "the file is damaged or for another base model")
    return idx


# -- adapters as data: fuse (the switch is the adapter bank's: serve/bank.py) -------------------------------------------


def read_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an s2ft adapter folder (checked like ``leantune.load`` checks them)."""
    from ..io import AdapterError, read_meta, read_weights

    meta = read_meta(directory)
    if meta["method"] != "s2ft":
        raise AdapterError(f"{directory}: holds a {meta['method']!r} adapter, not an s2ft one")
    return read_weights(directory, meta)


def _as_state(adapter) -> dict[str, torch.Tensor]:
    if isinstance(adapter, S2FT):
        return adapter.state()
    if isinstance(adapter, (str, os.PathLike)):
        return read_state(adapter)
    if isinstance(adapter, dict):
        return adapter
    raise TypeError(f"s2ft: expected a state dict, an adapter folder or an S2FT method, got {type(adapter).__name__}")


def _state_indices(state: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """``{(module name, side): indices}`` of an s2ft state."""
    out = {}
    for key, v in state.items():
        for side in ("in", "out"):
            if key.endswith(f".{side}_indices"):
                out[(key[: -len(f".{side}_indices")], side)] = v.long().flatten().cpu()
    if not out and not _expert_state_indices(state):
        raise ValueError("s2ft: this state has no '<module>.in_indices' / '<module>.out_indices' tensors")
    return out


def _expert_state_indices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<experts>.<parameter>": [E, k] indices}`` of an s2ft state's per-expert channels."""
    return {k[: -len(".expert_indices")]: v.long().cpu() for k, v in state.items() if k.endswith(".expert_indices")}


def _fuse_experts(name: str, idxs: list[torch.Tensor], deltas: list[torch.Tensor], weights: list[float]):
    """Per expert, the union of the adapters' channels and ``sum w_i D_i`` on it, as one [E, k] / block pair; k is
    the largest union, and an expert whose union is smaller is padded with channels other experts use (valid indices
    of this parameter) carrying a zero block. Returns (indices, delta, shared indices summed over experts)."""
    dim = 2 if name.endswith("down_proj") else 1  # down_proj [E, H, k]: columns; gate_up_proj [E, k, H]: rows
    n_exp = idxs[0].shape[0]
    if any(i.shape[0] != n_exp for i in idxs):
        raise ValueError(f"s2ft.fuse: {name}: the adapters hold different expert counts")
    unions = [torch.unique(torch.cat([i[e] for i in idxs])) for e in range(n_exp)]
    shared = sum(sum(i.shape[1] for i in idxs) - len(u) for u in unions)
    k = max(len(u) for u in unions)
    every = torch.unique(torch.cat(unions))
    for e, u in enumerate(unions):
        if len(u) < k:
            spare = every[~torch.isin(every, u)][: k - len(u)]
            unions[e] = torch.sort(torch.cat([u, spare])).values
    fused_idx = torch.stack(unions)
    shape = list(deltas[0].shape)
    shape[dim] = k
    fused = torch.zeros(shape, dtype=deltas[0].dtype)
    for idx, d, w in zip(idxs, deltas, weights, strict=True):
        d = d.detach().cpu().to(fused.dtype)
        for e in range(n_exp):
            fused[e].index_add_(dim - 1, torch.searchsorted(fused_idx[e], idx[e]), d[e], alpha=w)
    return fused_idx, fused, shared


def fuse(adapters, weights=None) -> dict[str, torch.Tensor]:
    """Weighted sum of s2ft adapters (state dicts, folders or methods with the same layers) as one s2ft state:
    per layer the union of indices, ``sum w_i D_i`` on it. Warns when index sets overlap (overlapping columns
    add up; disjoint channels fuse best, paper Table 5)."""
    states = [_as_state(a) for a in adapters]
    if not states:
        raise ValueError("s2ft.fuse: no adapters given")
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states):
        raise ValueError(f"s2ft.fuse: {len(states)} adapters but {len(weights)} weights")
    layers = [_state_indices(s) for s in states]
    if any(set(ly) != set(layers[0]) for ly in layers):
        raise ValueError("s2ft.fuse: the adapters adapt different layers; fuse adapters made with the same targets")
    out, overlaps = {}, []
    for name, side in sorted(layers[0]):
        idxs = [ly[(name, side)] for ly in layers]
        union = torch.unique(torch.cat(idxs))  # sorted
        if len(union) < sum(len(i) for i in idxs):
            overlaps.append((name, sum(len(i) for i in idxs) - len(union)))
        deltas = [s[f"{name}.{side}_delta"] for s in states]
        dim = 1 if side == "in" else 0
        shape = list(deltas[0].shape)
        shape[dim] = len(union)
        fused = torch.zeros(shape, dtype=deltas[0].dtype)
        for idx, d, w in zip(idxs, deltas, weights, strict=True):
            fused.index_add_(dim, torch.searchsorted(union, idx), d.detach().cpu().to(fused.dtype), alpha=w)
        out[f"{name}.{side}_indices"] = union
        out[f"{name}.{side}_delta"] = fused
    experts = [_expert_state_indices(s) for s in states]
    if any(set(ex) != set(experts[0]) for ex in experts):
        raise ValueError("s2ft.fuse: the adapters adapt different expert parameters; fuse adapters made with the same "
                         "targets")
    for name in sorted(experts[0]):
        fused_idx, fused_delta, shared = _fuse_experts(name, [ex[name] for ex in experts],
                                                       [s[f"{name}.expert_delta"] for s in states], weights)
        if shared:
            overlaps.append((name, shared))
        out[f"{name}.expert_indices"], out[f"{name}.expert_delta"] = fused_idx, fused_delta
    if overlaps:
        name, n = overlaps[0]
        warnings.warn(f"s2ft.fuse: index sets overlap in {len(overlaps)} of {len(layers[0]) + len(experts[0])} "
                      f"layers (e.g. {name}: "
                      f"{n} shared indices); their deltas add up there. Disjoint selections fuse best: train the "
                      "next adapter with S2FT(config, exclude=<first adapter>)", stacklevel=2)
    return out
