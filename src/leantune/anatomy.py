"""Where things are in a transformer.

The only place in leantune that knows model families. Methods ask for roles (``q``, ``o``, ``down``, ``norm``,
``embed`` ...) and get modules back; they never spell module names.

Roles of a block's linear layers:
  ``q k v o``          attention projections (GPT-2 has one fused ``qkv`` instead of q, k, v)
  ``gate up down``     the FFN (gate only in SwiGLU families)
Weights are read through :func:`weight_2d`, which always returns the (out, in) view, also for GPT-2's Conv1D
layers that store (in, out).

Placement points (where an attached module reads or writes, :meth:`Anatomy.placements`), each a linear role, a
side of it (``in``: its input, ``out``: its output) and a feature range on that side:
  ``attn_out``  after the attention output projection (the output of ``o``, before the residual add)
  ``ffn_out``   after the FFN (the output of ``down``, before the residual add)
  ``ffn_in``    the FFN's input (the input of ``up``); "beside the FFN" reads here and writes at ``ffn_out``
  ``keys``      the keys (the output of ``k``; rows of a fused ``qkv``)
  ``values``    the values (the output of ``v``; rows of a fused ``qkv``)
  ``ffn_act``   the FFN's intermediate activation (the input of ``down``)
"""


from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ALL_LINEAR = "all-linear"
# placement point -> (linear role, side): the default for every family (FamilySpec.placements overrides)
PLACEMENTS: dict[str, tuple[str, str]] = {
    "attn_out": ("o", "out"),
    "ffn_out": ("down", "out"),
    "ffn_in": ("up", "in"),
    "keys": ("k", "out"),
    "values": ("v", "out"),
    "ffn_act": ("down", "in"),
}


@dataclass(frozen=True)
class FamilySpec:
    """Dotted paths for one model family, relative to ``model.base_model`` (blocks, embed, final norm) or to
    one block (roles, norms). ``head`` is found through ``get_output_embeddings()`` or ``head_names``."""

    blocks: str
    embed: str
    roles: dict[str, str]
    norms: tuple[str, ...]
    final_norm: str | None = None
    extra_embeds: tuple[str, ...] = ()
    head_names: tuple[str, ...] = ("lm_head", "classifier", "score", "cls")
    causal: bool = True
    # Config attribute names, tried in order.
    n_heads_attr: tuple[str, ...] = ("num_attention_heads", "n_head")
    n_kv_heads_attr: tuple[str, ...] = ("num_key_value_heads",)
    hidden_attr: tuple[str, ...] = ("hidden_size", "n_embd")
    intermediate_attr: tuple[str, ...] = ("intermediate_size", "n_inner")
    # role -> config switch that gives that role's linear layers a bias (a merged BitFit export turns it on)
    bias_switches: dict[str, str] = field(default_factory=dict)
    # placement point -> (role, side) where it differs from PLACEMENTS, or None where the family has no such point
    # (an attached method that needs it refuses at apply)
    placements: dict[str, tuple[str, str] | None] = field(default_factory=dict)


_LLAMA = FamilySpec(
    blocks="layers",
    embed="embed_tokens",
    final_norm="norm",
    roles={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    norms=("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"),
    bias_switches={**dict.fromkeys(("q", "k", "v", "o"), "attention_bias"), **dict.fromkeys(("gate", "up", "down"), "mlp_bias")},
)

_GPT2 = FamilySpec(
    blocks="h",
    embed="wte",
    extra_embeds=("wpe",),
    final_norm="ln_f",
    roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    norms=("ln_1", "ln_2"),
)

_BERT = FamilySpec(
    blocks="encoder.layer",
    embed="embeddings.word_embeddings",
    extra_embeds=("embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    final_norm=None,
    roles={
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    },
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    causal=False,
)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
}


def register_family(model_type: str, spec: FamilySpec) -> None:
    """Teach leantune a new family: ``register_family("my_llama", FamilySpec(blocks="layers", ...))``."""
    FAMILIES[model_type] = spec


class UnsupportedModelError(ValueError):
    pass


class PlacementError(UnsupportedModelError):
    """A method needs a placement point that this model family does not define."""


@dataclass(frozen=True)
class Placement:
    """One placement point in one block: the features ``[start, stop)`` of ``module``'s input (``side="in"``) or
    output (``side="out"``); the whole side unless the layer is fused (GPT-2's keys: rows of ``c_attn``)."""

    point: str
    block: int
    name: str  # the layer's qualified name in the model
    module: nn.Module
    side: str
    start: int
    stop: int
    width: int  # the layer's full size on that side

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.width


@dataclass
class Block:
    index: int
    module: nn.Module
    linears: dict[str, nn.Module]  # role -> module; GPT-2 has "qkv" instead of q/k/v
    norms: list[nn.Module]

    def linear(self, role: str) -> nn.Module | None:
        """A role's module; q/k/v fall back to a fused qkv module."""
        if role in self.linears:
            return self.linears[role]
        if role in ("q", "k", "v") and "qkv" in self.linears:
            return self.linears["qkv"]
        return None


@dataclass
class Anatomy:
    model_type: str
    spec: FamilySpec
    embed: nn.Module
    extra_embeds: list[nn.Module]
    final_norm: nn.Module | None
    head: nn.Module | None
    blocks: list[Block]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    names: dict[int, str] = field(default_factory=dict)  # id(module) -> qualified name in the model

    @property
    def causal(self) -> bool:
        return self.spec.causal

    def name_of(self, module: nn.Module) -> str:
        return self.names[id(module)]

    def linears(self, roles) -> list[tuple[str, str, int, nn.Module]]:
        """(qualified name, role, block index, module) for the requested roles, each module once."""
        wanted = resolve_roles(roles)
        out, seen = [], set()
        for block in self.blocks:
            for role in wanted:
                mod = block.linear(role)
                if mod is None or id(mod) in seen:
                    continue
                seen.add(id(mod))
                real_role = "qkv" if (role in ("q", "k", "v") and "qkv" in block.linears) else role
                out.append((self.name_of(mod), real_role, block.index, mod))
        return out

    def placement_role(self, point: str) -> tuple[str, str] | None:
        """(role, side) of a placement point in this family, or None where it has none."""
        if point not in PLACEMENTS:
            raise ValueError(f"unknown placement point {point!r}; known: {', '.join(PLACEMENTS)}")
        return self.spec.placements.get(point, PLACEMENTS[point])

    def missing_placements(self, points) -> list[str]:
        """The points of ``points`` this model does not define."""
        out = []
        for point in points:
            where = self.placement_role(point)
            if where is None or any(b.linear(where[0]) is None for b in self.blocks):
                out.append(point)
        return out

    def placements(self, point: str) -> list[Placement]:
        """The point in every block (PlacementError, with what to do, where the family has none)."""
        missing = self.missing_placements([point])
        if missing:
            raise PlacementError(
                f"model_type {self.model_type!r} defines no placement point {point!r} (needed here); describe it in "
                f"its FamilySpec: placements={{{point!r}: (role, 'in' or 'out')}}"
            )
        role, side = self.placement_role(point)
        out = []
        for block in self.blocks:
            mod = block.linear(role)
            in_f, out_f = in_out_features(mod)
            width = in_f if side == "in" else out_f
            start, stop = 0, width
            if role in ("q", "k", "v") and "qkv" in block.linears and side == "out":
                start, stop = self._qkv_rows(role, out_f, point)
            out.append(Placement(point, block.index, self.name_of(mod), mod, side, start, stop, width))
        return out

    def _qkv_rows(self, role: str, out_f: int, point: str) -> tuple[int, int]:
        """A fused qkv layer's output rows of q, k or v: the blocked layout [q | k | v] (GPT-2's c_attn)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if out_f != q + 2 * kv:
            raise PlacementError(f"model_type {self.model_type!r}: the fused qkv layer has {out_f} outputs, expected "
                                 f"{q + 2 * kv} for a blocked [q|k|v] layout; placement {point!r} is not understood")
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[role]

    def norms(self, include_final: bool = True) -> list[tuple[str, nn.Module]]:
        mods = [n for b in self.blocks for n in b.norms]
        if include_final and self.final_norm is not None:
            mods.append(self.final_norm)
        return [(self.name_of(m), m) for m in mods]


def resolve_roles(roles) -> list[str]:
    """``"all-linear"``, ``"q,v"`` or ``["q", "v"]`` -> a list of known roles (clear error otherwise)."""
    if isinstance(roles, str):
        roles = list(LINEAR_ROLES) if roles == ALL_LINEAR else [r.strip() for r in roles.split(",") if r.strip()]
    roles = list(roles)
    if ALL_LINEAR in roles:
        return list(LINEAR_ROLES)
    bad = [r for r in roles if r not in LINEAR_ROLES + ("qkv",)]
    if bad or not roles:
        raise ValueError(
            f"unknown target role(s) {bad or roles!r}: use any of {', '.join(LINEAR_ROLES)} or '{ALL_LINEAR}'"
        )
    return roles


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def _config_int(config, attrs, default=None):
    for a in attrs:
        v = getattr(config, a, None)
        if v is not None:
            return int(v)
    return default


def family_spec(model: nn.Module, spec: FamilySpec | None = None) -> FamilySpec:
    if spec is not None:
        return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UnsupportedModelError(
        f"leantune does not know model_type {model_type!r} (class {type(model).__name__}). Known: "
        f"{', '.join(sorted(FAMILIES))}. Describe it once with "
        "leantune.anatomy.register_family(model_type, FamilySpec(blocks='layers', embed='embed_tokens', "
        "final_norm='norm', roles={'q': 'self_attn.q_proj', ...}, norms=('input_layernorm', ...)))"
    )


def anatomy(model: nn.Module, spec: FamilySpec | None = None) -> Anatomy:
    """Read a Hugging Face model's anatomy (works on ``*ForCausalLM``, ``*ForMaskedLM``, heads, bare models)."""
    spec = family_spec(model, spec)
    config = model.config
    names = {id(m): n for n, m in model.named_modules()}
    base = getattr(model, "base_model", model)
    blocks_mod = _get(base, spec.blocks)
    if blocks_mod is None:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r}: no blocks at {type(base).__name__}.{spec.blocks}; "
            "pass a FamilySpec whose paths match this model"
        )
    blocks = []
    for i, bmod in enumerate(blocks_mod):
        linears = {}
        for role, path in spec.roles.items():
            mod = _get(bmod, path)
            if mod is None:
                raise UnsupportedModelError(
                    f"model_type {config.model_type!r}: block {i} has no module at {path!r} (role {role!r})"
                )
            linears[role] = mod
        norms = [m for p in spec.norms if (m := _get(bmod, p)) is not None]
        blocks.append(Block(i, bmod, linears, norms))

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((m for h in spec.head_names if (m := _get(model, h)) is not None and m is not base), None)

    n_heads = _config_int(config, spec.n_heads_attr)
    n_kv = _config_int(config, spec.n_kv_heads_attr, n_heads)
    hidden = _config_int(config, spec.hidden_attr)
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    intermediate = _config_int(config, spec.intermediate_attr) or 4 * hidden
    embed = _get(base, spec.embed)
    return Anatomy(
        model_type=config.model_type,
        spec=spec,
        embed=embed,
        extra_embeds=[m for p in spec.extra_embeds if (m := _get(base, p)) is not None],
        final_norm=_get(base, spec.final_norm) if spec.final_norm else None,
        head=head,
        blocks=blocks,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(head_dim),
        hidden=hidden,
        intermediate=intermediate,
        names=names,
    )


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D"


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view for Conv1D."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = weight_2d(module).shape
    return in_f, out_f
