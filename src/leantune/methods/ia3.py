"""(IA)³ (Liu et al. 2022): learned scales on the keys, the values and the FFN's intermediate activation.

``k ← l_k ⊙ k``, ``v ← l_v ⊙ v``, ``FFN(x) = W_down (l_ff ⊙ f(W_up x))``; every vector starts at 1 (the model is
unchanged at step 0). The points are anatomy placements: ``keys``/``values`` are output rows of ``k``/``v`` (rows
of a fused ``qkv`` on GPT-2), ``ffn_act`` the input of ``down``. An encoder-decoder's cross-attention (T5's decoder)
gets its own ``l_k``/``l_v`` on its keys and values too, as in the paper (T0 is a T5; PEFT's T5 default ``k, v, wo``
does the same); ``cross=false`` leaves it out. Merge scales the k/v weight rows and biases and
the down projection's input columns; unmerge divides them back (the base returns within float rounding). The
vectors are float32 whatever the base dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import Placement, is_conv1d, weight_2d
from ..precision import trainable_dtype
from ..quant import refuse_quantized_merge
from .attached import AttachedMethod, term_input
from .base import Capabilities, ConfigError, MethodConfig, register
from .terms import InScale, OutScale


@dataclass
class IA3Config(MethodConfig):
    points: str = "keys,values,ffn_act"  # any of keys, values, ffn_act
    cross: bool = True  # keys/values: the cross-attention's too, where the model has one (an encoder-decoder)

    def validate(self):
        pts = self.point_list
        if not pts or any(p not in ("keys", "values", "ffn_act") for p in pts):
            raise ConfigError(f"ia3: points {self.points!r} must be a comma list of keys, values, ffn_act")

    @property
    def point_list(self) -> list[str]:
        return [p.strip() for p in self.points.split(",") if p.strip()]


# the paper's names for the vectors (a cross-attention's live on its own k/v layers)
_NAMES = {"keys": "l_k", "values": "l_v", "ffn_act": "l_ff", "cross_keys": "l_k", "cross_values": "l_v"}


class IA3Scales(nn.Module):
    """The scale vectors of one layer (``l_k``, ``l_v``, ``l_ff``) over features ``[start, stop)`` of its input or
    output."""

    def __init__(self):
        super().__init__()
        self.segments: dict[str, tuple[str, int, int, int]] = {}  # point -> (side, start, stop, width)
        self.merged = False

    def add(self, p: Placement) -> None:
        w = p.module.weight
        self.register_parameter(_NAMES[p.point], nn.Parameter(torch.ones(p.size, dtype=trainable_dtype(w),
                                                                          device=w.device)))
        self.segments[p.point] = (p.side, p.start, p.stop, p.width)

    def scale(self, point: str) -> nn.Parameter:
        return getattr(self, _NAMES[point])

    def vector(self, side: str) -> torch.Tensor | None:
        """The full-width scale vector of one side (ones outside the scaled features), or None."""
        parts = sorted((start, stop, width, self.scale(pt)) for pt, (s, start, stop, width) in self.segments.items()
                       if s == side)
        if not parts:
            return None
        if len(parts) == 1 and parts[0][0] == 0 and parts[0][1] == parts[0][2]:
            return parts[0][3]
        width, pieces, at = parts[0][2], [], 0
        for start, stop, _w, vec in parts:
            if start > at:
                pieces.append(vec.new_ones(start - at))
            pieces.append(vec)
            at = stop
        if at < width:
            pieces.append(parts[0][3].new_ones(width - at))
        return torch.cat(pieces)


def _ia3_forward(layer: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    c: IA3Scales = layer.ia3
    if c.merged:
        return base_forward(x, *args, **kwargs)
    v_in = c.vector("in")
    if v_in is not None:
        x = (term_input(x, v_in.dtype) * v_in).to(x.dtype)
    h = base_forward(x, *args, **kwargs)
    v_out = c.vector("out")
    if v_out is not None:
        h = (term_input(h, v_out.dtype) * v_out).to(h.dtype)
    return h


@register("ia3")
class IA3(AttachedMethod):
    child_name = "ia3"
    family = "additive"
    description = "(IA)³: learned scales on keys, values and the FFN's intermediate activation (init 1); mergeable."
    config_cls = IA3Config
    default_lr = 3e-3  # Liu et al. 2022 (T-Few)

    @classmethod
    def placement_points(cls, config: IA3Config | None = None) -> tuple[str, ...]:
        return tuple((config or cls.config_cls()).point_list)

    def required_points(self) -> tuple[str, ...]:
        return tuple(self.config.point_list)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(mergeable=True, restores_base=False, mixed_batch=True, inference_overhead="extra_ffn",
                            quantized_base=True)

    def _apply(self, model, anat):
        self._start()
        self.require_points(anat, self.config.point_list)
        cross = anat.cross_points(self.config.point_list) if self.config.cross else []
        for point in self.config.point_list + cross:
            for p in anat.placements(point):
                if p.name not in self.layers:
                    self.attach(p.name, p.module, IA3Scales(), _ia3_forward)
                self.child(p.name).add(p)

    def num_changed(self) -> int:
        """Weight entries a merge rescales: whole rows of k/v, whole input columns of down (biases of k/v too)."""
        n = 0
        for _name, layer, c in self.children():
            out_f, in_f = weight_2d(layer).shape
            for side, start, stop, _w in c.segments.values():
                rows = stop - start
                n += rows * (in_f if side == "out" else out_f)
                if side == "out" and layer.bias is not None:
                    n += rows
        return n

    @torch.no_grad()
    def _rescale(self, invert: bool) -> None:
        for _name, layer, c in self.children():
            refuse_quantized_merge(layer, "ia3")
            w2d = weight_2d(layer)
            for point, (side, start, stop, _w) in c.segments.items():
                vec = c.scale(point).detach()
                vec = 1.0 / vec if invert else vec
                if side == "out":
                    rows = w2d[start:stop]
                    rows.copy_((rows.float() * vec[:, None]).to(rows.dtype))
                    if layer.bias is not None:
                        b = layer.bias[start:stop]
                        b.copy_((b.float() * vec).to(b.dtype))
                else:
                    cols = w2d[:, start:stop]
                    cols.copy_((cols.float() * vec[None, :]).to(cols.dtype))
            c.merged = not invert

    def merge(self) -> None:
        if not self.merged:
            self._rescale(invert=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale(invert=True)
            self.merged = False

    def bank_terms(self) -> dict:
        """Per layer, the full-width scale of its input and/or its output (ones where nothing is scaled)."""
        out = {}
        for name, _layer, c in self.children():
            terms = []
            if (v := c.vector("in")) is not None:
                terms.append(InScale(v.detach()))
            if (v := c.vector("out")) is not None:
                terms.append(OutScale(v.detach()))
            out[name] = terms
        return out

    def peft_adapter(self) -> dict:
        """A PEFT IA3 adapter: ``ia3_l`` per layer, (out, 1) on k/v layers (ones on a fused layer's q rows),
        (1, in) on the feedforward (down) layers."""
        weights, feedforward = {}, []
        for name, _layer, c in self.children():
            sides = {seg[0] for seg in c.segments.values()}
            if len(sides) > 1:
                raise ValueError(f"ia3: {name} is scaled on its input and its output; PEFT's IA3 scales one side")
            side = sides.pop()
            vec = c.vector(side).detach().float()
            weights[name] = {"ia3_l": vec[:, None] if side == "out" else vec[None, :]}
            if side == "in":
                feedforward.append(name)
        config = {"peft_type": "IA3", "fan_in_fan_out": all(is_conv1d(m) for m in self.layers.values()),
                  "init_ia3_weights": True, "modules_to_save": None}
        return {"config": config, "weights": weights, "module_fields": {"feedforward_modules": feedforward}}
