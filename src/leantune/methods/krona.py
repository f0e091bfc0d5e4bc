"""KronA (Edalati et al. 2022): a Kronecker-product update ``ΔW = s · (A ⊗ B)`` beside each targeted linear layer.

A is (a1 × a2), B is (b1 × b2) with a1·b1 = out and a2·b2 = in. Factor shapes come from the layer's dimensions:
each of out and in is split into its divisor pair closest to its square root, the smaller divisor going to A
(``a1 ≤ b1``, ``a2 ≤ b2``; the rule PEFT's LoKr uses, so a KronA adapter is a LoKr adapter with full factors). A
64 → 96 layer gets A 8×8 and B 12×8. A is zero at initialisation (the model is unchanged at step 0), B is
kaiming-uniform.

The term is computed without forming ΔW: with x viewed as a (a2 × b2) matrix X (row-major), ``(A ⊗ B) x`` is
``A X Bᵀ`` read row-major. Merge adds ``s·(A ⊗ B)`` to the weight (unmerge subtracts it: the base returns within
float rounding, as for LoRA). A, B are float32 whatever the base dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import in_out_features, is_conv1d, resolve_roles
from ..precision import trainable_dtype
from ..quant import refuse_quantized_merge
from .attached import AttachedMethod, term_input
from .base import Capabilities, ConfigError, MethodConfig, register


def factor_pair(dim: int) -> tuple[int, int]:
    """(m, n) with m·n = dim, m ≤ n and m the largest divisor of dim not above √dim."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


@dataclass
class KronaConfig(MethodConfig):
    targets: str = "q,v"  # roles: q,k,v,o,gate,up,down or all-linear
    scale: float = 1.0  # s

    def validate(self):
        try:
            resolve_roles(self.targets)
        except ValueError as e:
            raise ConfigError(f"krona: {e}") from None


class KronaFactors(nn.Module):
    def __init__(self, in_f: int, out_f: int, scale: float, weight: torch.Tensor):
        super().__init__()
        (a1, b1), (a2, b2) = factor_pair(out_f), factor_pair(in_f)
        kw = {"dtype": trainable_dtype(weight), "device": weight.device}  # float32 beside a bf16 base
        self.A = nn.Parameter(torch.zeros(a1, a2, **kw))
        self.B = nn.Parameter(torch.empty(b1, b2, **kw))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.scale = scale
        self.merged = False

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """``s·(A ⊗ B) x`` for x (..., in), as ``A X Bᵀ`` (no ΔW formed), in the factors' dtype (under autocast,
        in autocast's)."""
        (a1, a2), (b1, b2) = self.A.shape, self.B.shape
        lead = x.shape[:-1]
        n = x[..., 0].numel()
        # two plain 2-D products (a batched matmul picks its algorithm by requires_grad: results would depend on it)
        t = (term_input(x, self.B.dtype).reshape(n * a2, b2) @ self.B.t()).view(n, a2, b1)  # X Bᵀ
        y = (t.transpose(1, 2).reshape(n * b1, a2) @ self.A.t()).view(n, b1, a1)  # (A X Bᵀ)ᵀ
        return y.transpose(1, 2).reshape(*lead, a1 * b1) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.A, self.B) * self.scale


def _krona_forward(layer: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    h = base_forward(x, *args, **kwargs)
    k: KronaFactors = layer.krona
    if k.merged:
        return h
    return h + k.term(x).to(h.dtype)


@register("krona")
class Krona(AttachedMethod):
    child_name = "krona"
    family = "reparametrization"
    description = "KronA: a Kronecker-product update s·(A ⊗ B) beside each targeted linear layer; mergeable."
    config_cls = KronaConfig
    default_lr = 1e-3

    @property
    def capabilities(self) -> Capabilities:
        # on a quantized base: the term beside the layer's own (quantized) product, as QLoRA; merge refused
        return Capabilities(mergeable=True, restores_base=False, inference_overhead="extra_ffn", quantized_base=True)

    def _apply(self, model, anat):
        self._start()
        targets = anat.linears(self.config.targets)
        if not targets:
            raise ValueError(f"krona: no layers for targets {self.config.targets!r} in this {anat.model_type} model")
        for name, _role, _i, mod in targets:
            in_f, out_f = in_out_features(mod)
            self.attach(name, mod, KronaFactors(in_f, out_f, self.config.scale, mod.weight), _krona_forward)

    def num_changed(self) -> int:
        return sum(in_out_features(m)[0] * in_out_features(m)[1] for m in self.layers.values())

    @torch.no_grad()
    def _add(self, sign: float) -> None:
        for _name, layer, _k in self.children():
            refuse_quantized_merge(layer, "krona")
        for _name, layer, k in self.children():
            delta = k.delta_weight() * sign
            w = layer.weight
            w.copy_((w.float() + (delta.t() if is_conv1d(layer) else delta)).to(w.dtype))
            k.merged = sign > 0

    def merge(self) -> None:
        if not self.merged:
            self._add(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add(-1.0)
            self.merged = False

    def peft_adapter(self) -> dict:
        """A PEFT LoKr adapter with full factors: ``lokr_w1`` = A, ``lokr_w2`` = B, one r large enough that PEFT
        keeps w2 whole (r ≥ max(B's shape) / 2) and alpha = s·r (LoKr's scale is alpha / r)."""
        conv = [n for n, layer in self.layers.items() if is_conv1d(layer)]
        if conv:
            raise ValueError(f"krona: PEFT's LoKr has no layer type for GPT-2's Conv1D ({conv[0]}); export this "
                             "adapter with --format merged instead")
        r = max(max(c.B.shape) for _, _, c in self.children())
        weights = {n: {"lokr_w1": c.A.detach().float(), "lokr_w2": c.B.detach().float()} for n, _, c in self.children()}
        config = {"peft_type": "LOKR", "r": r, "alpha": self.config.scale * r, "rank_dropout": 0.0,
                  "module_dropout": 0.0, "use_effective_conv2d": False, "decompose_both": False,
                  "decompose_factor": -1, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {},
                  "modules_to_save": None}
        return {"config": config, "weights": weights}
