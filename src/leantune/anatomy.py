"""Where things are in a transformer.

The only place in leantune that knows model families. Methods ask for roles (``q``, ``o``, ``down``, ``norm``,
``embed`` ...) and get modules back; they never spell module names.

Roles of a block's linear layers:
  ``q k v o``          attention projections (GPT-2, Phi-3, GPT-NeoX, Falcon have one fused ``qkv`` instead)
  ``gate up down``     the FFN (gate only in gated families; Phi-3 has one fused ``gate_up``)
  ``cross_q cross_k cross_v cross_o``  an encoder-decoder's cross-attention (T5's decoder blocks): queries from
                       the decoder, keys and values from the encoder's output
Stacks: an encoder-decoder (T5) has two stacks of blocks; the spec's own ``blocks``/``roles``/``norms`` describe the
first (``stack``, e.g. "encoder"), ``FamilySpec.stacks`` the others (:class:`Stack`). ``Anatomy.blocks`` holds them
all, first stack first, numbered on (``Block.stack`` says which).
Weights are read through :func:`weight_2d`, which always returns the (out, in) view, also for GPT-2's Conv1D
layers that store (in, out).

Layouts: where a fused layer keeps each part is the spec's business, not the methods'. ``qkv_layout`` says how the
rows of a fused ``qkv`` are ordered (see ``QKV_LAYOUTS``); a fused ``gate_up`` is ``[gate | up]``. Methods and
``prune/`` ask :meth:`Anatomy.head_rows`, :meth:`Anatomy.ffn_rows` and :meth:`Anatomy.head_columns` for indices.
Head counts and sizes are read from the weights where the config may not tell the truth (Falcon's multi-query
attention has one KV head whatever ``num_kv_heads`` says).

Placement points (where an attached module reads or writes, :meth:`Anatomy.placements`), each a linear role, a
side of it (``in``: its input, ``out``: its output) and a feature range on that side:
  ``attn_out``  after the attention output projection (the output of ``o``, before the residual add)
  ``ffn_out``   after the FFN (the output of ``down``, before the residual add)
  ``ffn_in``    the FFN's input (the input of ``up``); "beside the FFN" reads here and writes at ``ffn_out``
  ``keys``      the keys (the output of ``k``; rows of a fused ``qkv``)
  ``values``    the values (the output of ``v``; rows of a fused ``qkv``)
  ``ffn_act``   the FFN's intermediate activation (the input of ``down``)
  ``cross_attn_out``, ``cross_keys``, ``cross_values``  the cross-attention's (``CROSS_PLACEMENTS``): only in the
                blocks that have one (T5's decoder); a method adds them beside ``attn_out`` / ``keys`` / ``values``

The attention entry point (``FamilySpec.attention``, :meth:`Anatomy.attention_modules`): the block's attention
module that hands its queries, keys (per KV head, after the cache update) and values to transformers' attention
interface; soft-prompt methods add their key/value prefixes there. None where the family computes attention by itself
(Falcon, DeBERTa): a method that needs the point refuses at apply.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

CROSS_ROLES = ("cross_q", "cross_k", "cross_v", "cross_o")
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down", *CROSS_ROLES)
FUSED_ROLES = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}  # a fused role stands for these roles
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
# the cross-attention's points, in the blocks that have one (an encoder-decoder's decoder; other blocks skip them):
# after its output projection, its keys, its values; CROSS_OF names the self-attention point each mirrors
CROSS_PLACEMENTS: dict[str, tuple[str, str]] = {
    "cross_attn_out": ("cross_o", "out"),
    "cross_keys": ("cross_k", "out"),
    "cross_values": ("cross_v", "out"),
}
CROSS_OF = {"attn_out": "cross_attn_out", "keys": "cross_keys", "values": "cross_values"}

# Row order of a fused qkv projection (heads of head_dim rows each; g = query heads per KV head):
QKV_LAYOUTS = {
    "blocked": "[q heads | k heads | v heads] (GPT-2, Phi-3, Falcon multi-query)",
    "per_head": "for each head [q | k | v] (GPT-NeoX, Falcon without multi-query; as many KV heads as query heads)",
    "grouped": "for each KV head [its g query heads | k | v] (Falcon's new decoder architecture)",
}


@dataclass(frozen=True)
class Stack:
    """A further stack of blocks (an encoder-decoder's decoder), paths as in :class:`FamilySpec`."""

    name: str
    blocks: str
    roles: dict[str, str]
    norms: tuple[str, ...]


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
    # Row order of the fused "qkv" role, a key of QKV_LAYOUTS, or a function config -> key (Falcon's depends on it)
    qkv_layout: str | Callable = "blocked"
    # Norms applied to the queries / keys inside attention (per block); their size says per head (head_dim, shared
    # by all heads: Qwen3, Gemma 3) or whole projection (heads x head_dim: OLMo 2, sliced with the heads)
    q_norm: str | None = None
    k_norm: str | None = None
    # Mixture of experts (per block): the module whose 3-D parameters gate_up_proj [E, 2I, H] and down_proj
    # [E, H, I] are the routed experts, and the router (not a Linear, never a role; frozen unless a method's option
    # says otherwise). A shared expert, where there is one, plays the gate/up/down roles.
    experts: str | None = None
    router: str | None = None
    # placement point -> (role, side) where it differs from PLACEMENTS, or None where the family has no such point
    # (an attached method that needs it refuses at apply)
    placements: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    # Encoder-decoder (T5): the first stack's name, the further stacks, norms outside the blocks that are not the
    # final norm before the head (the encoder's output norm); ``seq2seq``: trained and evaluated as a seq2seq LM
    stack: str = ""
    stacks: tuple[Stack, ...] = ()
    extra_norms: tuple[str, ...] = ()
    seq2seq: bool = False
    # the spec for this model's config, where the family's layout depends on it (T5's gated or plain FFN)
    by_config: Callable | None = None
    # the block's attention module, when it calls transformers' attention interface (the attention entry point)
    attention: str | None = None
    # the attention modules take and pass on a per-head position bias (keyword ``position_bias``, the second item of
    # their output), made by a stack's first block and shared by the later ones (T5's relative position bias)
    shared_position_bias: bool = False


_ATTN_BIAS = dict.fromkeys(("q", "k", "v", "o"), "attention_bias")
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
    bias_switches={**_ATTN_BIAS, **dict.fromkeys(("gate", "up", "down"), "mlp_bias")},
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    attention="self_attn",
)
# Mistral and Qwen2 build their layers' biases in code (Qwen2: q, k, v always; nothing else): no config switch.
_FIXED_BIAS = replace(_LLAMA, bias_switches={})
_QWEN3 = replace(_LLAMA, bias_switches=_ATTN_BIAS)  # attention_bias only; the MLP never has one
# Gemma 1/2/3: LLaMA's names, extra norms around the FFN (Gemma 2/3), per-head q/k norms (Gemma 3)
_GEMMA = replace(_LLAMA, bias_switches=_ATTN_BIAS,
                 norms=_LLAMA.norms + ("pre_feedforward_layernorm", "post_feedforward_layernorm"))
_OLMO2 = replace(_LLAMA, bias_switches=_ATTN_BIAS, norms=("post_attention_layernorm", "post_feedforward_layernorm",
                                                         "self_attn.q_norm", "self_attn.k_norm"))
_PHI3 = FamilySpec(
    blocks="layers",
    embed="embed_tokens",
    final_norm="norm",
    roles={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
           "down": "mlp.down_proj"},
    norms=("input_layernorm", "post_attention_layernorm"),
    attention="self_attn",
)
_GPT_NEOX = FamilySpec(
    blocks="layers",
    embed="embed_in",
    final_norm="final_layer_norm",
    roles={"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
           "down": "mlp.dense_4h_to_h"},
    norms=("input_layernorm", "post_attention_layernorm"),
    qkv_layout="per_head",
    bias_switches={"qkv": "attention_bias", "o": "attention_bias"},
    attention="attention",
)
_OPT = FamilySpec(
    blocks="decoder.layers",
    embed="decoder.embed_tokens",
    extra_embeds=("decoder.embed_positions",),
    final_norm="decoder.final_layer_norm",
    roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
           "up": "fc1", "down": "fc2"},
    norms=("self_attn_layer_norm", "final_layer_norm"),
    intermediate_attr=("ffn_dim",),
    bias_switches=dict.fromkeys(("q", "k", "v", "o", "up", "down"), "enable_bias"),
    attention="self_attn",
)


def _falcon_layout(config) -> str:
    if getattr(config, "new_decoder_architecture", False):
        return "grouped"
    return "blocked" if getattr(config, "multi_query", True) else "per_head"


_FALCON = FamilySpec(
    blocks="h",
    embed="word_embeddings",
    final_norm="ln_f",
    roles={"qkv": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
           "down": "mlp.dense_4h_to_h"},
    norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"),
    n_kv_heads_attr=("num_kv_heads",),
    intermediate_attr=("ffn_hidden_size",),
    qkv_layout=_falcon_layout,
    bias_switches=dict.fromkeys(("qkv", "o", "up", "down"), "bias"),
)
_DEBERTA_V2 = FamilySpec(
    blocks="encoder.layer",
    embed="embeddings.word_embeddings",
    extra_embeds=("embeddings.position_embeddings", "embeddings.token_type_embeddings", "encoder.rel_embeddings"),
    final_norm=None,
    roles={
        "q": "attention.self.query_proj",
        "k": "attention.self.key_proj",
        "v": "attention.self.value_proj",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    },
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    causal=False,
)

_GPT2 = FamilySpec(
    blocks="h",
    embed="wte",
    extra_embeds=("wpe",),
    final_norm="ln_f",
    roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    norms=("ln_1", "ln_2"),
    attention="attn",
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
    attention="attention.self",
)

def _t5_roles(attn: str, ffn: str, gated: bool, cross: str | None = None) -> dict[str, str]:
    roles = {r: f"{attn}.{r}" for r in ("q", "k", "v", "o")}
    if cross:
        roles.update({f"cross_{r}": f"{cross}.{r}" for r in ("q", "k", "v", "o")})
    ffn_roles = {"gate": "wi_0", "up": "wi_1", "down": "wo"} if gated else {"up": "wi", "down": "wo"}
    return {**roles, **{r: f"{ffn}.{m}" for r, m in ffn_roles.items()}}


def _t5_spec(gated: bool) -> FamilySpec:
    """T5 (and T5 v1.1 / Flan-T5 with ``is_gated_act``: wi_0, wi_1, wo as gate, up, down): an encoder stack, a decoder
    stack with cross-attention, no biases, one relative position bias per stack (block 0; no role: methods leave it)."""
    return FamilySpec(
        blocks="encoder.block",
        embed="shared",
        final_norm="decoder.final_layer_norm",
        roles=_t5_roles("layer.0.SelfAttention", "layer.1.DenseReluDense", gated),
        norms=("layer.0.layer_norm", "layer.1.layer_norm"),
        causal=False,
        n_heads_attr=("num_heads",),
        hidden_attr=("d_model",),
        intermediate_attr=("d_ff",),
        stack="encoder",
        stacks=(Stack("decoder", "decoder.block",
                      _t5_roles("layer.0.SelfAttention", "layer.2.DenseReluDense", gated, cross="layer.1.EncDecAttention"),
                      ("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm")),),
        extra_norms=("encoder.final_layer_norm",),
        seq2seq=True,
        shared_position_bias=True,
        by_config=lambda config: _T5_GATED if getattr(config, "is_gated_act", False) else _T5_PLAIN,
    )


_T5_PLAIN, _T5_GATED = _t5_spec(False), _t5_spec(True)


FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
}
_MIXTRAL = replace(_FIXED_BIAS, roles={r: p for r, p in _LLAMA.roles.items() if r in ("q", "k", "v", "o")},
                   experts="mlp.experts", router="mlp.gate")
_QWEN2_MOE = replace(_FIXED_BIAS, roles={**{r: p for r, p in _LLAMA.roles.items() if r in ("q", "k", "v", "o")},
                                         "gate": "mlp.shared_expert.gate_proj", "up": "mlp.shared_expert.up_proj",
                                         "down": "mlp.shared_expert.down_proj"},
                     experts="mlp.experts", router="mlp.gate")
FAMILIES.update({"mixtral": _MIXTRAL, "qwen2_moe": _QWEN2_MOE})
FAMILIES.update({"mistral": _FIXED_BIAS, "qwen2": _FIXED_BIAS, "qwen3": _QWEN3, "gemma": _GEMMA, "gemma2": _GEMMA,
                 "gemma3_text": _GEMMA, "olmo2": _OLMO2, "phi3": _PHI3, "gpt_neox": _GPT_NEOX, "opt": _OPT,
                 "falcon": _FALCON, "deberta-v2": _DEBERTA_V2, "t5": _T5_GATED})


def register_family(model_type: str, spec: FamilySpec, model: nn.Module | None = None) -> None:
    """Teach leantune a new family: ``register_family("my_llama", FamilySpec(blocks="layers", ...), model)``.

    With ``model``, the spec is checked against it first (every role found, shapes that add up for the layouts it
    names) and refused with the reason if it does not fit; nothing is registered then."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family({model_type!r}, ...): spec must be a FamilySpec, got {type(spec).__name__}")
    if isinstance(spec.qkv_layout, str) and spec.qkv_layout not in QKV_LAYOUTS:
        raise UnsupportedModelError(f"family {model_type!r}: qkv_layout {spec.qkv_layout!r} is not one of "
                                    f"{', '.join(QKV_LAYOUTS)}")
    if model is not None:
        check_anatomy(anatomy(model, spec))
    FAMILIES[model_type] = spec


class UnsupportedModelError(ValueError):
    pass


# -- families from outside: a YAML file (--family-spec) or an installed package's entry point -----------------

ENTRY_POINT_GROUP = "leantune.families"
SPEC_ENV = "LEANTUNE_FAMILY_SPECS"  # family-spec files (os.pathsep-separated), read by this process and its children
_TUPLE_FIELDS = ("norms", "extra_embeds", "head_names", "n_heads_attr", "n_kv_heads_attr", "hidden_attr",
                 "intermediate_attr", "extra_norms")
_loaded_outside = False


def spec_from_dict(d: dict, where: str = "family spec") -> tuple[str, FamilySpec]:
    """``{"model_type": ..., <FamilySpec fields>}`` -> (model_type, spec); unknown or missing keys are refused."""
    if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
        raise UnsupportedModelError(f"{where}: a family is a mapping with model_type, blocks, embed, roles, norms")
    d = dict(d)
    model_type = d.pop("model_type")
    known = set(FamilySpec.__dataclass_fields__)
    unknown, missing = sorted(set(d) - known), sorted({"blocks", "embed", "roles", "norms"} - set(d))
    if unknown or missing:
        raise UnsupportedModelError(f"{where} ({model_type!r}): unknown key(s) {unknown}, missing {missing}; "
                                    f"known keys: model_type, {', '.join(sorted(known))}")
    if not isinstance(d["roles"], dict) or not all(isinstance(v, str) for v in d["roles"].values()):
        raise UnsupportedModelError(f"{where} ({model_type!r}): roles must map role names to module paths")
    bad = sorted(set(d["roles"]) - set(LINEAR_ROLES) - set(FUSED_ROLES))
    if bad:
        raise UnsupportedModelError(f"{where} ({model_type!r}): unknown role(s) {bad}; roles are "
                                    f"{', '.join((*LINEAR_ROLES, *FUSED_ROLES))}")
    if d.get("qkv_layout", "blocked") not in QKV_LAYOUTS:
        raise UnsupportedModelError(f"{where} ({model_type!r}): qkv_layout {d['qkv_layout']!r} is not one of "
                                    f"{', '.join(QKV_LAYOUTS)}")
    if "by_config" in d:
        raise UnsupportedModelError(f"{where} ({model_type!r}): by_config is a Python function; describe one layout "
                                    "per file (or register the family from Python)")
    for k in _TUPLE_FIELDS:
        if k in d:
            d[k] = (d[k],) if isinstance(d[k], str) else tuple(d[k])
    if "stacks" in d:  # further stacks (an encoder-decoder's decoder): name, blocks, roles, norms each
        stacks = d["stacks"] if isinstance(d["stacks"], list) else [d["stacks"]]
        try:
            d["stacks"] = tuple(Stack(**{**st, "norms": tuple(st.get("norms", ()))}) for st in stacks)
        except TypeError as e:
            raise UnsupportedModelError(f"{where} ({model_type!r}): each of stacks is a mapping with name, blocks, "
                                        f"roles, norms ({e})") from None
        bad = sorted({r for st in d["stacks"] for r in st.roles} - set(LINEAR_ROLES) - set(FUSED_ROLES))
        if bad:
            raise UnsupportedModelError(f"{where} ({model_type!r}): unknown role(s) {bad} in stacks")
    return model_type, FamilySpec(**d)


def load_family_specs(path) -> list[str]:
    """Register the families a YAML file describes (one mapping, or a list of them); returns their model types."""
    from pathlib import Path

    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UnsupportedModelError(f"family spec {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise UnsupportedModelError(f"family spec {str(path)!r} is not valid YAML: {e}") from None
    items = data if isinstance(data, list) else [data]
    specs = [spec_from_dict(item, f"family spec {str(path)!r}") for item in items]
    for model_type, spec in specs:
        register_family(model_type, spec)
    return [t for t, _ in specs]


def use_family_specs(paths) -> None:
    """Register the families of these YAML files here and in child processes (the bench's runs)."""
    import os

    paths = [str(os.path.abspath(p)) for p in paths]
    for p in paths:
        load_family_specs(p)
    if paths:
        before = [p for p in os.environ.get(SPEC_ENV, "").split(os.pathsep) if p]
        os.environ[SPEC_ENV] = os.pathsep.join(dict.fromkeys(before + paths))


def _load_outside_families() -> None:
    """Once per process: the specs named by $LEANTUNE_FAMILY_SPECS and the ``leantune.families`` entry points (name:
    the model_type; value: a FamilySpec, or a function returning one)."""
    global _loaded_outside
    if _loaded_outside:
        return
    _loaded_outside = True
    import os
    from importlib.metadata import entry_points

    for p in [p for p in os.environ.get(SPEC_ENV, "").split(os.pathsep) if p]:
        load_family_specs(p)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in FAMILIES:
            continue
        obj = ep.load()
        spec = obj() if callable(obj) and not isinstance(obj, FamilySpec) else obj
        if not isinstance(spec, FamilySpec):
            raise UnsupportedModelError(f"entry point {ep.name!r} in {ENTRY_POINT_GROUP!r} ({ep.value}) gives a "
                                        f"{type(spec).__name__}, not a FamilySpec")
        register_family(ep.name, spec)


def known_family(model_type: str | None) -> FamilySpec | None:
    """The spec of ``model_type``: built in, registered, from a family-spec file or an installed entry point."""
    if model_type not in FAMILIES:
        _load_outside_families()
    return FAMILIES.get(model_type)


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
    linears: dict[str, nn.Module]  # role -> module; fused families have "qkv" / "gate_up" instead of the parts
    norms: list[nn.Module]
    qk_norms: dict[str, nn.Module] = field(default_factory=dict)  # "q" / "k" -> the norm on queries / keys
    experts: nn.Module | None = None  # mixture of experts: the module with 3-D gate_up_proj / down_proj
    router: nn.Module | None = None
    stack: str = ""  # which stack it belongs to ("encoder" / "decoder" in an encoder-decoder)
    attention: nn.Module | None = None  # the attention entry point (FamilySpec.attention), None where undefined

    def linear(self, role: str) -> nn.Module | None:
        """A role's module; q/k/v and gate/up fall back to the fused module that holds them."""
        if role in self.linears:
            return self.linears[role]
        fused = fused_role(role)
        return self.linears.get(fused) if fused else None

    def holder(self, role: str) -> str | None:
        """The role of the module that holds ``role`` here (``"qkv"`` for q on GPT-2), None if absent."""
        if role in self.linears:
            return role
        fused = fused_role(role)
        return fused if fused in self.linears else None


def fused_role(role: str) -> str | None:
    """The fused role that stands for ``role`` (``"qkv"`` for q, k, v; ``"gate_up"`` for gate, up)."""
    return next((f for f, parts in FUSED_ROLES.items() if role in parts), None)


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
    qkv_layout: str = "blocked"  # the fused qkv's row order (QKV_LAYOUTS), resolved for this model's config
    n_experts: int = 0  # routed experts per block (0: a dense FFN)
    extra_norms: list[nn.Module] = field(default_factory=list)  # outside the blocks, not before the head (T5's encoder)

    @property
    def causal(self) -> bool:
        return self.spec.causal

    @property
    def seq2seq(self) -> bool:
        """An encoder-decoder LM (T5): trained on (encoder input, decoder labels), evaluated by decoder generation."""
        return self.spec.seq2seq

    @property
    def generative(self) -> bool:
        """Generates text (a causal or a seq2seq LM), as training and `leantune eval` need."""
        return self.spec.causal or self.spec.seq2seq

    def name_of(self, module: nn.Module) -> str:
        return self.names[id(module)]

    def linears(self, roles) -> list[tuple[str, str, int, nn.Module]]:
        """(qualified name, role, block index, module) for the requested roles, each module once; a fused module
        comes with its own role (``qkv``, ``gate_up``)."""
        wanted = resolve_roles(roles)
        out, seen = [], set()
        for block in self.blocks:
            for role in wanted:
                mod = block.linear(role)
                if mod is None or id(mod) in seen:
                    continue
                seen.add(id(mod))
                out.append((self.name_of(mod), block.holder(role), block.index, mod))
        return out

    def routers(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every block's MoE router (empty for dense models)."""
        return [(self.name_of(b.router), b.router) for b in self.blocks if b.router is not None]

    def expert_params(self) -> list[tuple[str, str, int, nn.Parameter]]:
        """(qualified name, "gate_up" or "down", block index, 3-D parameter) of the routed experts."""
        out = []
        for b in self.blocks:
            if b.experts is not None:
                for part, attr in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                    out.append((f"{self.name_of(b.experts)}.{attr}", part, b.index, getattr(b.experts, attr)))
        return out

    def placement_role(self, point: str) -> tuple[str, str] | None:
        """(role, side) of a placement point in this family, or None where it has none."""
        known = {**PLACEMENTS, **CROSS_PLACEMENTS}
        if point not in known:
            raise ValueError(f"unknown placement point {point!r}; known: {', '.join(known)}")
        return self.spec.placements.get(point, known[point])

    def missing_placements(self, points) -> list[str]:
        """The points of ``points`` this model does not define (a cross-attention point: in no block)."""
        out = []
        for point in points:
            where = self.placement_role(point)
            found = [b.linear(where[0]) is not None for b in self.blocks] if where else [False]
            if not (any(found) if point in CROSS_PLACEMENTS else all(found)):
                out.append(point)
        return out

    def cross_points(self, points) -> list[str]:
        """The cross-attention counterparts (:data:`CROSS_OF`) of ``points`` that this model defines, in order."""
        mirrored = [CROSS_OF[p] for p in points if p in CROSS_OF]
        return [p for p in mirrored if not self.missing_placements([p])]

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
            if mod is None:  # a cross-attention point in a block without cross-attention (the encoder's)
                continue
            in_f, out_f = in_out_features(mod)
            width = in_f if side == "in" else out_f
            start, stop = 0, width
            if role in ("q", "k", "v") and "qkv" in block.linears and side == "out":
                start, stop = self._qkv_rows(role, out_f, point)
            out.append(Placement(point, block.index, self.name_of(mod), mod, side, start, stop, width))
        return out

    def _qkv_rows(self, role: str, out_f: int, point: str) -> tuple[int, int]:
        """A fused qkv layer's output rows of q, k or v, in this family's layout (:meth:`head_rows`); a placement
        reads or writes one contiguous range, so a layout that interleaves the parts per head refuses."""
        rows = self.head_rows(role)
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if stop - start != len(rows) or not torch.equal(rows, torch.arange(start, stop)) or stop > out_f:
            raise PlacementError(
                f"model_type {self.model_type!r}: its fused qkv layer keeps the {role} rows interleaved per head "
                f"({self.qkv_layout!r} layout), so placement {point!r} is not one range of its outputs; use a method "
                "that targets linear roles (lora, s2ft) on this family"
            )
        return start, stop

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every block's attention entry point (PlacementError, with what to do, where
        the family defines none)."""
        if not self.blocks or any(b.attention is None for b in self.blocks):
            raise PlacementError(
                f"model_type {self.model_type!r} defines no attention entry point (its attention does not go through "
                "transformers' attention interface, or its FamilySpec does not name the module); describe it in its "
                "FamilySpec: attention='self_attn' (the block's attention module)")
        return [(self.name_of(b.attention), b.attention) for b in self.blocks]

    def norms(self, include_final: bool = True) -> list[tuple[str, nn.Module]]:
        mods = [n for b in self.blocks for n in b.norms] + list(self.extra_norms)
        if include_final and self.final_norm is not None:
            mods.append(self.final_norm)
        return [(self.name_of(m), m) for m in mods]

    # -- where the parts are: indices for methods and surgery -------------------------------------------------
    def head_rows(self, part: str, heads=None) -> torch.Tensor:
        """Output rows of ``part``'s heads (``q``: query heads, ``k``/``v``: KV heads; all when ``heads`` is None)
        in the module that holds ``part`` (its own projection, or the fused qkv in this family's layout), in head
        order."""
        if part not in ("q", "k", "v"):
            raise ValueError(f"head_rows: part must be q, k or v, not {part!r}")
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        count = nq if part == "q" else nkv
        h = torch.arange(count) if heads is None else torch.as_tensor(heads, dtype=torch.long).reshape(-1)
        if len(h) and (h.min() < 0 or h.max() >= count):
            raise ValueError(f"head_rows: {part} heads {h.tolist()} out of range (this model has {count})")
        within = torch.arange(hd)
        if not any("qkv" in b.linears for b in self.blocks):
            start = h * hd
        elif self.qkv_layout == "blocked":
            start = {"q": 0, "k": nq * hd, "v": (nq + nkv) * hd}[part] + h * hd
        elif self.qkv_layout == "per_head":
            start = h * 3 * hd + {"q": 0, "k": hd, "v": 2 * hd}[part]
        else:  # grouped: per KV head, its g query heads, then k, then v
            g = nq // nkv
            if part == "q":
                start = (h // g) * (g + 2) * hd + (h % g) * hd
            else:
                start = h * (g + 2) * hd + (g if part == "k" else g + 1) * hd
        return (start[:, None] + within).reshape(-1)

    def qkv_rows(self, q_heads, kv_heads) -> torch.Tensor:
        """Rows of a fused qkv that hold query heads ``q_heads`` and KV heads ``kv_heads``, in the fused order
        (keeping them keeps the layout: every layout orders its parts the same way after a cut)."""
        rows = torch.cat([self.head_rows("q", q_heads), self.head_rows("k", kv_heads), self.head_rows("v", kv_heads)])
        return torch.sort(rows).values

    def head_columns(self, heads=None) -> torch.Tensor:
        """Input columns of ``o`` for query heads ``heads`` (all when None): head h covers [h*hd, (h+1)*hd)."""
        h = torch.arange(self.n_heads) if heads is None else torch.as_tensor(heads, dtype=torch.long).reshape(-1)
        return (h[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)

    def ffn_rows(self, part: str, channels=None) -> torch.Tensor:
        """Output rows of FFN ``part`` (``gate`` or ``up``) channels in the module that holds it (a fused gate_up
        is [gate | up]); all channels when None."""
        if part not in ("gate", "up"):
            raise ValueError(f"ffn_rows: part must be gate or up, not {part!r}")
        ch = torch.arange(self.intermediate) if channels is None else torch.as_tensor(channels, dtype=torch.long)
        fused = any("gate_up" in b.linears for b in self.blocks)
        return ch.reshape(-1) + (self.intermediate if fused and part == "up" else 0)

    def expert_ffn_rows(self, part: str, channels=None) -> torch.Tensor:
        """Rows of FFN ``part`` (``gate`` or ``up``) channels in the routed experts' 3-D ``gate_up_proj`` [E, 2I, H]:
        ``[gate | up]`` along its rows (transformers' ``chunk(2)``), or interleaved per channel where the experts
        module says ``is_concatenated=False``; all I channels when None."""
        if part not in ("gate", "up"):
            raise ValueError(f"expert_ffn_rows: part must be gate or up, not {part!r}")
        experts = next((b.experts for b in self.blocks if b.experts is not None), None)
        if experts is None:
            raise ValueError(f"expert_ffn_rows: model_type {self.model_type!r} has no routed experts")
        if getattr(experts, "is_transposed", False):  # transformers' flag: [E, H, 2I], rows are not channels
            raise UnsupportedModelError(f"model_type {self.model_type!r}: its experts store gate_up_proj transposed "
                                        "([E, H, 2I]); expert channels are not rows there")
        inter = experts.gate_up_proj.shape[1] // 2
        ch = torch.arange(inter) if channels is None else torch.as_tensor(channels, dtype=torch.long).reshape(-1)
        if not getattr(experts, "is_concatenated", True):  # interleaved [gate_0, up_0, gate_1, up_1, ...]
            return 2 * ch + (1 if part == "up" else 0)
        return ch + (inter if part == "up" else 0)

    def qk_norm_entries(self, heads) -> torch.Tensor:
        """Entries of a whole-projection q/k norm's weight (and output) that belong to ``heads`` (of its own
        projection)."""
        h = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
        return (h[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)

    def qk_norm_kind(self) -> str | None:
        """``"per_head"`` (one head_dim-sized norm shared by the heads), ``"whole"`` (one weight per projection row,
        sliced with the heads) or None (no q/k norm)."""
        b = self.blocks[0] if self.blocks else None
        norm = b.qk_norms.get("q") if b else None
        if norm is None or getattr(norm, "weight", None) is None:
            return None
        return "per_head" if norm.weight.shape[-1] == self.head_dim else "whole"


def resolve_roles(roles) -> list[str]:
    """``"all-linear"``, ``"q,v"`` or ``["q", "v"]`` -> a list of known roles (clear error otherwise)."""
    if isinstance(roles, str):
        roles = list(LINEAR_ROLES) if roles == ALL_LINEAR else [r.strip() for r in roles.split(",") if r.strip()]
    roles = list(roles)
    if ALL_LINEAR in roles:
        return list(LINEAR_ROLES)
    bad = [r for r in roles if r not in LINEAR_ROLES + tuple(FUSED_ROLES)]
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
        return spec.by_config(model.config) if spec.by_config else spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = known_family(model_type)
    if known is not None:
        return known.by_config(model.config) if known.by_config else known
    raise UnsupportedModelError(
        f"leantune does not know model_type {model_type!r} (class {type(model).__name__}). Known: "
        f"{', '.join(sorted(FAMILIES))}. Describe it once with "
        "leantune.anatomy.register_family(model_type, FamilySpec(blocks='layers', embed='embed_tokens', "
        "final_norm='norm', roles={'q': 'self_attn.q_proj', ...}, norms=('input_layernorm', ...)), model), or "
        "with --family-spec spec.yaml on the command line"
    )


def _kv_heads_from_weights(blocks: list[Block], layout: str, n_heads: int, head_dim: int) -> int | None:
    """The KV-head count the first block's weights hold (None when they do not say)."""
    if not blocks:
        return None
    b = blocks[0]
    if "k" in b.linears:
        return in_out_features(b.linears["k"])[1] // head_dim
    if "qkv" in b.linears:
        rows = in_out_features(b.linears["qkv"])[1]
        return n_heads if layout == "per_head" else (rows // head_dim - n_heads) // 2
    return None


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
    stacks = [(spec.stack, blocks_mod, spec.roles, spec.norms)]
    for st in spec.stacks:
        mod = _get(base, st.blocks)
        if mod is None:
            raise UnsupportedModelError(f"model_type {config.model_type!r}: no {st.name} blocks at "
                                        f"{type(base).__name__}.{st.blocks}; pass a FamilySpec whose paths match")
        stacks.append((st.name, mod, st.roles, st.norms))
    in_order = [(name, bmod, roles, norm_paths) for name, mods, roles, norm_paths in stacks for bmod in mods]
    for i, (stack_name, bmod, roles, norm_paths) in enumerate(in_order):
        linears = {}
        for role, path in roles.items():
            mod = _get(bmod, path)
            if mod is None:
                raise UnsupportedModelError(
                    f"model_type {config.model_type!r}: block {i} has no module at {path!r} (role {role!r})"
                )
            inner = getattr(mod, "base_layer", None)  # a layer wrapped in place by PEFT (the bridge): its original
            if not (isinstance(mod, nn.Linear) or is_conv1d(mod)) and (isinstance(inner, nn.Linear) or is_conv1d(inner)):
                mod = inner
            if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
                raise UnsupportedModelError(
                    f"model_type {config.model_type!r}: {path!r} (role {role!r}) is a {type(mod).__name__}, not a "
                    "linear layer; a role names a Linear (or Conv1D) module (an MoE router or experts module is "
                    "named by the spec's router / experts fields)"
                )
            linears[role] = mod
        norms = [m for p in norm_paths if (m := _get(bmod, p)) is not None]
        qk = {part: m for part, p in (("q", spec.q_norm), ("k", spec.k_norm)) if p and (m := _get(bmod, p)) is not None}
        experts = _get(bmod, spec.experts) if spec.experts else None
        if experts is not None and not all(getattr(getattr(experts, a, None), "dim", lambda: 0)() == 3
                                           for a in ("gate_up_proj", "down_proj")):
            raise UnsupportedModelError(
                f"model_type {config.model_type!r}: block {i} {spec.experts!r} ({type(experts).__name__}) has no 3-D "
                "gate_up_proj [experts, 2*I, H] and down_proj [experts, H, I] parameters")
        blocks.append(Block(i, bmod, linears, norms, qk, experts, _get(bmod, spec.router) if spec.router else None,
                            stack_name, _get(bmod, spec.attention) if spec.attention else None))

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((m for h in spec.head_names if (m := _get(model, h)) is not None and m is not base), None)

    layout = spec.qkv_layout(config) if callable(spec.qkv_layout) else spec.qkv_layout
    n_heads = _config_int(config, spec.n_heads_attr)
    hidden = _config_int(config, spec.hidden_attr)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
    # the weights are the truth where the config's attribute may not be (Falcon multi-query: 1 KV head)
    n_kv = _kv_heads_from_weights(blocks, layout, n_heads, head_dim) or _config_int(config, spec.n_kv_heads_attr, n_heads)
    down = blocks[0].linears.get("down") if blocks else None
    experts = next((b.experts for b in blocks if b.experts is not None), None)
    if experts is not None:  # the roles' FFN is a shared expert's (or none); the intermediate size is the experts'
        down = None
    intermediate = (in_out_features(down)[0] if down is not None else None) or (
        experts.down_proj.shape[-1] if experts is not None else None) or _config_int(
        config, spec.intermediate_attr) or 4 * hidden
    embed = _get(base, spec.embed)
    return Anatomy(
        model_type=config.model_type,
        spec=spec,
        embed=embed,
        extra_embeds=[m for p in spec.extra_embeds if (m := _get(base, p)) is not None],
        final_norm=_get(base, spec.final_norm) if spec.final_norm else None,
        extra_norms=[m for p in spec.extra_norms if (m := _get(base, p)) is not None],
        head=head,
        blocks=blocks,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden=hidden,
        intermediate=intermediate,
        names=names,
        qkv_layout=layout,
        n_experts=experts.gate_up_proj.shape[0] if experts is not None else 0,
    )


def check_anatomy(anat: Anatomy) -> Anatomy:
    """Refuse an anatomy whose shapes do not add up for the layouts its spec names (clear message, which layer and
    what was expected). Run on an unpruned model: every block must have the same shapes."""
    where = f"model_type {anat.model_type!r}"
    if anat.embed is None:
        raise UnsupportedModelError(f"{where}: no embedding at {anat.spec.embed!r}")
    if not anat.blocks:
        raise UnsupportedModelError(f"{where}: no blocks at {anat.spec.blocks!r}")
    if anat.qkv_layout not in QKV_LAYOUTS:
        raise UnsupportedModelError(f"{where}: qkv_layout {anat.qkv_layout!r} is not one of {', '.join(QKV_LAYOUTS)}")
    hd, nq, nkv, inter = anat.head_dim, anat.n_heads, anat.n_kv_heads, anat.intermediate
    if nkv < 1 or nq % nkv:
        raise UnsupportedModelError(f"{where}: {nq} query heads do not group over {nkv} KV heads")
    if anat.qkv_layout == "per_head" and nq != nkv:
        raise UnsupportedModelError(f"{where}: qkv_layout 'per_head' needs as many KV heads as query heads "
                                    f"({nq} vs {nkv})")
    for b in anat.blocks:
        ffn = in_out_features(b.linears["down"])[0] if b.experts is not None and "down" in b.linears else inter
        expect_out = {"q": nq * hd, "k": nkv * hd, "v": nkv * hd, "qkv": (nq + 2 * nkv) * hd, "up": ffn,
                      "gate": ffn, "gate_up": 2 * ffn, "cross_q": nq * hd, "cross_k": nkv * hd, "cross_v": nkv * hd}
        expect_in = {"o": nq * hd, "down": ffn, "cross_o": nq * hd}
        for role, mod in b.linears.items():
            in_f, out_f = in_out_features(mod)
            if role in expect_out and out_f != expect_out[role]:
                raise UnsupportedModelError(
                    f"{where}: block {b.index} role {role!r} ({anat.name_of(mod)}) has {out_f} outputs, expected "
                    f"{expect_out[role]} ({nq} query / {nkv} KV heads of {hd}, FFN {inter}); check the spec's "
                    "roles, qkv_layout and the config's head attributes")
            if role in expect_in and in_f != expect_in[role]:
                raise UnsupportedModelError(
                    f"{where}: block {b.index} role {role!r} ({anat.name_of(mod)}) has {in_f} inputs, expected "
                    f"{expect_in[role]}")
        for part, norm in b.qk_norms.items():
            weight = getattr(norm, "weight", None)
            size = weight.shape[-1] if weight is not None else hd  # a norm without a scale fits either kind
            whole = (nq if part == "q" else nkv) * hd
            if size not in (hd, whole):
                raise UnsupportedModelError(f"{where}: block {b.index} {part}_norm has size {size}; expected {hd} "
                                            f"(per head) or {whole} (whole projection)")
    return anat


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D"


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view for Conv1D; a quantized layer's dequantized (a new tensor, no view)."""
    if is_quantized_layer(module):
        return dequantized_weight(module)
    return module.weight.t() if is_conv1d(module) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if is_quantized_layer(module):  # packed storage: the layer knows its shape
        return module.in_features, module.out_features
    out_f, in_f = weight_2d(module).shape
    return in_f, out_f


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (leantune.quant) whose weight is stored quantized."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ in ("Linear4bit", "Linear8bitLt") and isinstance(w, torch.Tensor)
            and not w.is_floating_point())


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A quantized layer's weight as (out, in) floats, in the dtype it was quantized from (4-bit) or float32 (int8)."""
    import bitsandbytes.functional as bnbf  # only reached with a quantized layer, so bitsandbytes is there

    w = module.weight
    if type(module).__name__ == "Linear8bitLt":  # the row scales move to the layer's state at its first forward
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb)
    return bnbf.dequantize_4bit(w.data, w.quant_state)
