"""Bank terms: a fine-tune's effect on one layer as data, so an adapter bank (``serve/bank.py``) can compute many
adapters in one batch and fold any of them into the weights without knowing which method made it.

A method that can be served side by side returns ``{layer name: [term, ...]}`` from ``Method.bank_terms()``; the
layer computes ``y = (layer(x ⊙ in_scale)) ⊙ out_scale + Σ additive terms(x)`` where the additive terms see the
layer's unscaled input. Every tensor here is in the (out, in) orientation of ``anatomy.weight_2d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """``y += scale · (x Aᵀ) Bᵀ`` (LoRA, rsLoRA). A: (r, in), B: (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def dense(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class Columns:
    """``y += x[..., idx] Dᵀ``: a dense block on k input columns (S²FT's input slice). D: (out, k)."""

    idx: torch.Tensor
    D: torch.Tensor

    def dense(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.D.device).index_copy_(1, self.idx, self.D.float())


@dataclass
class Rows:
    """``y[..., idx] += x Dᵀ``: a dense block on k output rows (S²FT's output slice). D: (k, in)."""

    idx: torch.Tensor
    D: torch.Tensor

    def dense(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.D.device).index_copy_(0, self.idx, self.D.float())


@dataclass
class InScale:
    """``x ← x ⊙ v`` before the layer ((IA)³'s FFN activation). v: (in,), ones where nothing is scaled."""

    v: torch.Tensor


@dataclass
class OutScale:
    """``y ← y ⊙ v`` after the layer, bias included ((IA)³'s keys and values). v: (out,)."""

    v: torch.Tensor


@dataclass
class Bias:
    """``y += b``: a change of the layer's bias (BitFit; the whole bias where the base has none). b: (out,)."""

    b: torch.Tensor


ADDITIVE = (LowRank, Columns, Rows, Bias)
SCALES = (InScale, OutScale)
