"""The prune plan (what stays) and the rules that turn ratios into counts.

Count rule, everywhere: a kept count is the achievable count nearest to ``keep_fraction * n`` (ties go to keeping
more), and never below the stated minimum (one head group per layer, one FFN channel per layer, one adapter
module, one rank per kept module). The counts are stored in the plan and logged, so "40 %" is never ambiguous.

GQA: attention repeats each KV head for a fixed number of query heads, so within a layer every kept KV head keeps
the same number ``c`` of its query heads; a layer keeps ``k`` KV groups and ``k * c`` query heads. The achievable
head counts are the products ``k * c`` (for plain multi-head attention, every count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PLAN_VERSION = 1


class PlanError(ValueError):
    pass


def kept_count(keep_fraction: float, n: int, minimum: int = 1) -> int:
    """``keep_fraction * n`` rounded half up, clamped to ``[minimum, n]``."""
    return max(min(minimum, n), min(n, math.floor(keep_fraction * n + 0.5 + 1e-9)))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores (lower index first among ties), sorted ascending."""
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return sorted(order.tolist())


# -- heads --------------------------------------------------------------------------------------------------


def group_shapes(n_heads: int, n_kv: int, keep_fraction: float, divisor_of: int | None = None) -> list[tuple[int, int]]:
    """The (kept KV groups k, query heads per group c) pairs whose product is the head count nearest to
    ``keep_fraction * n_heads`` among the achievable ones. ``divisor_of``: prefer counts that divide it (a
    model config that needs ``hidden % heads == 0``)."""
    if n_heads % n_kv:
        raise PlanError(f"{n_heads} query heads do not split evenly over {n_kv} KV heads")
    g = n_heads // n_kv
    pairs = [(k, c) for k in range(1, n_kv + 1) for c in range(1, g + 1)]
    if divisor_of:
        fitting = [p for p in pairs if divisor_of % (p[0] * p[1]) == 0]
        pairs = fitting or pairs
    target = keep_fraction * n_heads
    best = min({k * c for k, c in pairs}, key=lambda n: (abs(n - target), -n))
    return [(k, c) for k, c in pairs if k * c == best]


def _heads_for_shape(scores: torch.Tensor, n_kv: int, k: int, c: int) -> tuple[float, list[int], list[int]]:
    """Best k groups keeping their c best query heads each: (total score, kept q heads, kept KV heads)."""
    g = scores.numel() // n_kv
    per_group = scores.double().abs().view(n_kv, g)
    top_c = [_top(per_group[j], c) for j in range(n_kv)]
    group_score = torch.stack([per_group[j, top_c[j]].sum() for j in range(n_kv)])
    groups = _top(group_score, k)
    q = sorted(j * g + i for j in groups for i in top_c[j])
    return float(group_score[groups].sum()), q, groups


def select_heads(
    scores: list[torch.Tensor], n_kv: int, ratio: float, uniform: bool = False, divisor_of: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Rank heads within each layer by |score| and remove about ``ratio`` of them, GQA-aware (see module doc).

    Returns (kept query heads, kept KV heads) per layer. ``uniform``: every layer keeps the same (k, c)."""
    n_heads = scores[0].numel()
    shapes = group_shapes(n_heads, n_kv, 1.0 - ratio, divisor_of if uniform else None)
    if uniform:
        best = max(shapes, key=lambda s: sum(_heads_for_shape(sc, n_kv, *s)[0] for sc in scores))
        chosen = [_heads_for_shape(sc, n_kv, *best) for sc in scores]
    else:
        chosen = [max((_heads_for_shape(sc, n_kv, *s) for s in shapes), key=lambda t: t[0]) for sc in scores]
    return [q for _, q, _ in chosen], [kv for _, _, kv in chosen]


# -- FFN channels -------------------------------------------------------------------------------------------


def select_channels(scores: list[torch.Tensor], ratio: float, uniform: bool = False) -> list[list[int]]:
    """Rank FFN channels by |score| across all layers (``uniform``: within each layer, equal counts) and remove
    about ``ratio`` of them; every layer keeps at least one channel."""
    if uniform:
        return [_top(sc.abs(), kept_count(1.0 - ratio, sc.numel())) for sc in scores]
    sizes = [sc.numel() for sc in scores]
    total = kept_count(1.0 - ratio, sum(sizes), minimum=len(sizes))
    flat = torch.cat([sc.double().abs() for sc in scores])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    forced = [off + _top(sc.abs(), 1)[0] for off, sc in zip(offsets, scores, strict=True)]  # one per layer
    rest = flat.clone()
    rest[forced] = -math.inf
    picked = set(forced) | set(_top(rest, total - len(forced)))
    return [sorted(i - off for i in picked if off <= i < off + n) for off, n in zip(offsets, sizes, strict=True)]


# -- adapter modules and ranks ------------------------------------------------------------------------------


def select_modules(scores: dict[str, float], keep_fraction: float) -> list[str]:
    """The top ``keep_fraction`` of adapter modules by score, globally (at least one); in their given order."""
    names = list(scores)
    keep = _top(torch.tensor([scores[n] for n in names], dtype=torch.float64), kept_count(keep_fraction, len(names)))
    return [names[i] for i in keep]


def select_ranks(scores: dict[str, torch.Tensor], keep_fraction: float) -> dict[str, list[int]]:
    """Keep ``keep_fraction`` of all ranks of these modules, ranked globally; every module keeps its best rank."""
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    total = kept_count(keep_fraction, sum(sizes), minimum=len(names))
    flat = torch.cat([scores[n].double() for n in names])
    offsets = [sum(sizes[:i]) for i in range(len(names))]
    forced = [off + _top(scores[n], 1)[0] for off, n in zip(offsets, names, strict=True)]
    rest = flat.clone()
    rest[forced] = -math.inf
    picked = set(forced) | set(_top(rest, total - len(forced)))
    return {n: sorted(i - off for i in picked if off <= i < off + k) for n, off, k in zip(names, offsets, sizes, strict=True)}


# -- the plan -----------------------------------------------------------------------------------------------


@dataclass
class PrunePlan:
    """What stays after pruning: kept query heads, KV heads and FFN channels per layer (None: untouched), kept
    adapter modules and their kept ranks (None: all), the original sizes (checked against the model) and the
    explicit counts. JSON-able through ``to_dict`` / ``from_dict``. ``cross_heads``: an encoder-decoder's kept
    cross-attention heads per layer (None for a layer without cross-attention; it has as many KV heads as heads)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    heads: list[list[int]] | None = None
    kv_heads: list[list[int]] | None = None
    ffn: list[list[int]] | None = None
    modules: list[str] | None = None
    ranks: dict[str, list[int]] | None = None
    counts: dict = field(default_factory=dict)
    cross_heads: list[list[int] | None] | None = None

    def to_dict(self) -> dict:
        d = {"plan_version": PLAN_VERSION, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        if d["cross_heads"] is None:  # a decoder-only plan reads as before (older leantune knows no cross_heads)
            del d["cross_heads"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        d = dict(d)
        version = d.pop("plan_version", PLAN_VERSION)
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise PlanError(f"prune plan version {version!r} is newer than this leantune reads ({PLAN_VERSION}); upgrade")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise PlanError(f"prune plan: unknown field(s) {unknown}")
        plan = cls(**d)
        plan.validate()
        return plan

    def foundation_dict(self) -> dict:
        """The plan without the adapter part (what a merged model needs)."""
        d = self.to_dict()
        d.update(modules=None, ranks=None)
        return d

    def validate(self) -> None:
        L = self.n_layers
        if self.heads is not None or self.kv_heads is not None:
            if self.heads is None or self.kv_heads is None or len(self.heads) != L or len(self.kv_heads) != L:
                raise PlanError(f"prune plan: heads and kv_heads need one list per layer ({L} layers)")
            g = self.n_heads // self.n_kv_heads
            for i, (q, kv) in enumerate(zip(self.heads, self.kv_heads, strict=True)):
                _check_indices(q, self.n_heads, f"layer {i} heads")
                _check_indices(kv, self.n_kv_heads, f"layer {i} kv_heads")
                per_group = [sum(1 for h in q if h // g == j) for j in kv]
                if sorted({h // g for h in q}) != kv or len(set(per_group)) != 1:
                    raise PlanError(
                        f"prune plan: layer {i} keeps query heads {q} on KV heads {kv}; every kept KV head must keep "
                        "the same number of its query heads (and only kept KV heads may have query heads)"
                    )
        if self.cross_heads is not None:
            if len(self.cross_heads) != L:
                raise PlanError(f"prune plan: cross_heads needs one entry per layer ({L} layers), got "
                                f"{len(self.cross_heads)}")
            if self.n_kv_heads != self.n_heads:
                raise PlanError("prune plan: cross_heads needs as many KV heads as query heads")
            for i, q in enumerate(self.cross_heads):
                if q is not None:
                    _check_indices(q, self.n_heads, f"layer {i} cross_heads")
        if self.ffn is not None:
            if len(self.ffn) != L:
                raise PlanError(f"prune plan: ffn needs one list per layer ({L} layers), got {len(self.ffn)}")
            for i, ch in enumerate(self.ffn):
                _check_indices(ch, self.intermediate, f"layer {i} ffn")
        if self.ranks is not None:
            for name, idx in self.ranks.items():
                if not idx or idx != sorted(set(idx)) or min(idx) < 0:
                    raise PlanError(f"prune plan: ranks of {name!r} must be a sorted, non-empty list, got {idx}")

    def check_model(self, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, intermediate: int) -> None:
        mine = (self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.intermediate)
        theirs = (n_layers, n_heads, n_kv_heads, head_dim, intermediate)
        if mine != theirs:
            raise PlanError(
                f"prune plan was made for (layers, heads, kv heads, head_dim, intermediate) = {mine}, this model has "
                f"{theirs}; load it onto the base model it was trained on"
            )

    def layer_shapes(self) -> list[dict]:
        """Per layer: kept query heads, KV heads and FFN channels (counts)."""
        shapes = [
            {
                "heads": len(self.heads[i]) if self.heads else self.n_heads,
                "kv_heads": len(self.kv_heads[i]) if self.kv_heads else self.n_kv_heads,
                "ffn": len(self.ffn[i]) if self.ffn else self.intermediate,
            }
            for i in range(self.n_layers)
        ]
        for shape, cross in zip(shapes, self.cross_heads or [], strict=False):
            if cross is not None:
                shape["cross_heads"] = len(cross)
        return shapes

    def uniform_shape(self) -> dict | None:
        """The one per-layer shape when every layer has it, else None."""
        shapes = self.layer_shapes()
        return shapes[0] if all(s == shapes[0] for s in shapes) else None


def _check_indices(idx: list[int], n: int, what: str) -> None:
    if not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
        raise PlanError(f"prune plan: {what} must be a sorted, non-empty list of distinct indices below {n}, got {idx}")
