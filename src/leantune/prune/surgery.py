"""Physical surgery: slice attention heads and FFN channels out of the base model, in place.

Heads: output rows of q/k/v (a fused qkv: the rows the anatomy names for its layout) and input columns of ``o``,
in blocks of the model's explicit ``head_dim``. FFN channels: output rows of gate/up (a fused gate_up: both halves)
and input columns of down. Biases follow their rows. Whole-projection q/k norms (OLMo 2) normalize over every head's
queries (keys) at once, so there q/k and their norms stay whole and the norm's output keeps the kept heads' features
(:func:`keep_outputs`): the pruned model is then exactly the masked one (v and o are still sliced; the KV cache and
the attention hold the kept heads only, the q/k projections do not shrink). An encoder-decoder (T5) prunes its
decoder's cross-attention heads too (:func:`prune_cross_heads`); T5's relative position bias, one column per head,
is made by a stack's first block and shared by the others, so it stays whole and each block uses its kept heads'
part (:func:`keep_bias_heads`).
Attention modules read some head counts at forward time (``num_key_value_groups`` for GQA, GPT-2's ``split_size``,
Falcon's ``num_kv_heads``), so those attributes are set to the new per-layer values; modules that read them from
the config at forward time (Phi-3) get a copy of the config of their own. The model config is shared by all layers
and stays as it was (``export.save_merged`` writes an updated one where it fits).

Every slice is reported to ``on_slice(layer, side, index)`` (side "out" or "in") so that an adapter sitting on
the layer can follow.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable

import torch
from torch import nn

from ..anatomy import Anatomy, Block, is_conv1d
from .plan import PrunePlan

OnSlice = Callable[[nn.Module, str, torch.Tensor], None]

# Integer attributes that transformers' attention modules read at forward time (or keep for reference).
_HEAD_ATTRS = {
    "num_key_value_groups": lambda q, kv, hd: q // kv,
    "num_heads": lambda q, kv, hd: q,
    "num_attention_heads": lambda q, kv, hd: q,
    "num_key_value_heads": lambda q, kv, hd: kv,
    "num_kv_heads": lambda q, kv, hd: kv,  # Falcon
    "all_head_size": lambda q, kv, hd: q * hd,
    "split_size": lambda q, kv, hd: q * hd,  # GPT-2 splits c_attn's output in three parts of this size
    "n_heads": lambda q, kv, hd: q,  # T5
    "inner_dim": lambda q, kv, hd: q * hd,  # T5
}


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def slice_out(layer: nn.Module, idx: torch.Tensor) -> None:
    """Keep output features ``idx`` (rows of the (out, in) view) and their bias entries."""
    idx = idx.to(layer.weight.device)
    if is_conv1d(layer):
        _replace(layer, "weight", layer.weight[:, idx])
        layer.nf = len(idx)
    else:
        _replace(layer, "weight", layer.weight[idx])
        layer.out_features = len(idx)
    if getattr(layer, "bias", None) is not None:
        _replace(layer, "bias", layer.bias[idx])


@torch.no_grad()
def slice_in(layer: nn.Module, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` (columns of the (out, in) view)."""
    idx = idx.to(layer.weight.device)
    if is_conv1d(layer):
        _replace(layer, "weight", layer.weight[idx])
        layer.nx = len(idx)
    else:
        _replace(layer, "weight", layer.weight[:, idx])
        layer.in_features = len(idx)


def _noop(layer, side, idx):
    return None


KEPT_OUTPUTS = "leantune_kept_outputs"


def _keep_outputs_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.index_select(-1, getattr(module, KEPT_OUTPUTS).to(output.device))


def keep_outputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Pass on only output features ``idx`` of ``module`` (computed whole): a forward hook and a buffer that is not
    saved (``apply_foundation_plan`` puts both back when a pruned model is rebuilt from its plan)."""
    if hasattr(module, KEPT_OUTPUTS):
        raise RuntimeError(f"{type(module).__name__} already keeps a subset of its outputs; prune a fresh model")
    weight = getattr(module, "weight", None)
    # a skeleton's weights are on meta until loaded (load_merged): the indices are data, kept on a real device
    device = weight.device if weight is not None and weight.device.type != "meta" else "cpu"
    module.register_buffer(KEPT_OUTPUTS, idx.to(device), persistent=False)
    module.register_forward_hook(_keep_outputs_hook)


WHOLE_BIAS = "_leantune_whole_bias"


def _bias_in(module: nn.Module, args, kwargs):
    whole = kwargs.get("position_bias")
    module.__dict__[WHOLE_BIAS] = whole  # passed on unchanged by _bias_out
    if whole is not None:
        kwargs["position_bias"] = whole.index_select(1, getattr(module, KEPT_OUTPUTS).to(whole.device))
    return args, kwargs


def _compute_kept_bias(module: nn.Module, *args, **kwargs):
    whole = type(module).compute_bias(module, *args, **kwargs)
    module.__dict__[WHOLE_BIAS] = whole
    return whole.index_select(1, getattr(module, KEPT_OUTPUTS).to(whole.device))


def _bias_out(module: nn.Module, args, kwargs, output):
    return (output[0], module.__dict__.pop(WHOLE_BIAS, None), *output[2:])


def keep_bias_heads(attention: nn.Module, heads: torch.Tensor) -> None:
    """An attention module that takes and passes on a per-head position bias shared by its stack (T5): it uses the
    kept heads' part of the bias and passes the whole bias on to the next block, whose kept heads may differ. The
    stack's first block makes the bias (``compute_bias`` from its relative position table, kept whole); a zero bias
    that a block without the table makes for itself (T5's cross-attention) is not passed on, every block makes its own."""
    attention.register_buffer(KEPT_OUTPUTS, heads.clone(), persistent=False)
    attention.register_forward_pre_hook(_bias_in, with_kwargs=True)
    attention.register_forward_hook(_bias_out, with_kwargs=True)
    if getattr(attention, "relative_attention_bias", None) is not None:
        attention.compute_bias = types.MethodType(_compute_kept_bias, attention)


def _parent(root: nn.Module, child: nn.Module) -> nn.Module:
    return next(m for m in root.modules() if any(c is child for c in m.children()))


def prune_heads(anat: Anatomy, block: Block, q_heads: list[int], kv_heads: list[int], on_slice: OnSlice = _noop):
    """Keep query heads ``q_heads`` and KV heads ``kv_heads`` (original indices) of one block's (self-)attention."""
    if "cross_o" in block.linears or anat.spec.shared_position_bias:
        return _prune_attention_heads(anat, block, "", q_heads, on_slice)
    whole_norms = anat.qk_norm_kind() == "whole"
    if "qkv" in block.linears:
        if whole_norms:
            raise ValueError(f"model_type {anat.model_type!r}: a fused qkv with whole-projection q/k norms cannot be "
                             "pruned by heads (the norms need q and k whole)")
        _slice(block.linears["qkv"], "out", anat.qkv_rows(q_heads, kv_heads), on_slice)
    elif whole_norms:  # the norm spans all heads: q, k and the norms stay whole, the norms' outputs keep the heads
        keep_outputs(block.qk_norms["q"], anat.qk_norm_entries(q_heads))
        keep_outputs(block.qk_norms["k"], anat.qk_norm_entries(kv_heads))
        _slice(block.linear("v"), "out", anat.head_rows("v", kv_heads), on_slice)
    else:
        _slice(block.linear("q"), "out", anat.head_rows("q", q_heads), on_slice)
        _slice(block.linear("k"), "out", anat.head_rows("k", kv_heads), on_slice)
        _slice(block.linear("v"), "out", anat.head_rows("v", kv_heads), on_slice)
    _slice(block.linear("o"), "in", anat.head_columns(q_heads), on_slice)
    counts = {k: f(len(q_heads), len(kv_heads), anat.head_dim) for k, f in _HEAD_ATTRS.items()}
    _set_attrs(block.module, counts)
    spec = anat.spec
    _set_config(block, {**dict.fromkeys(spec.n_heads_attr, len(q_heads)),
                        **dict.fromkeys(spec.n_kv_heads_attr, len(kv_heads))})


def prune_cross_heads(anat: Anatomy, block: Block, heads: list[int], on_slice: OnSlice = _noop) -> None:
    """Keep cross-attention heads ``heads`` of one decoder block (an encoder-decoder's; as many KV heads as heads)."""
    _prune_attention_heads(anat, block, "cross_", heads, on_slice)


def _prune_attention_heads(anat: Anatomy, block: Block, prefix: str, heads: list[int], on_slice: OnSlice) -> None:
    """One attention of a block that holds two (self- and cross-attention, roles ``q..o`` / ``cross_q..cross_o``),
    separate q/k/v and as many KV heads as heads; its module's head counts are set on that module alone."""
    if anat.n_kv_heads != anat.n_heads or "qkv" in block.linears or anat.qk_norm_kind() is not None:
        raise ValueError(f"model_type {anat.model_type!r}: pruning the heads of a block with cross-attention needs "
                         "separate q/k/v, as many KV heads as heads and no q/k norms")
    for part in ("q", "k", "v"):
        _slice(block.linear(prefix + part), "out", anat.head_rows("q", heads), on_slice)
    o = block.linear(prefix + "o")
    _slice(o, "in", anat.head_columns(heads), on_slice)
    attention = _parent(block.module, o)
    _set_attrs(attention, {k: f(len(heads), len(heads), anat.head_dim) for k, f in _HEAD_ATTRS.items()})
    if anat.spec.shared_position_bias:
        keep_bias_heads(attention, torch.as_tensor(heads, dtype=torch.long))
    if not prefix:
        _set_config(block, {**dict.fromkeys(anat.spec.n_heads_attr, len(heads)),
                            **dict.fromkeys(anat.spec.n_kv_heads_attr, len(heads))})


def prune_ffn(anat: Anatomy, block: Block, channels: list[int], on_slice: OnSlice = _noop) -> None:
    """Keep FFN channels ``channels`` of one block (gate/up rows, down columns)."""
    if "gate_up" in block.linears:
        rows = torch.cat([anat.ffn_rows("gate", channels), anat.ffn_rows("up", channels)])
        _slice(block.linears["gate_up"], "out", rows, on_slice)
    for role in ("gate", "up"):
        if role in block.linears:
            _slice(block.linears[role], "out", anat.ffn_rows(role, channels), on_slice)
    _slice(block.linear("down"), "in", torch.as_tensor(channels, dtype=torch.long), on_slice)
    _set_attrs(block.module, {"intermediate_size": len(channels)})
    _set_config(block, dict.fromkeys(anat.spec.intermediate_attr, len(channels)))


def apply_foundation_plan(anat: Anatomy, plan: PrunePlan, on_slice: OnSlice = _noop) -> None:
    """Slice every block as the plan says (heads, KV heads, cross-attention heads, FFN channels)."""
    plan.check_model(len(anat.blocks), anat.n_heads, anat.n_kv_heads, anat.head_dim, anat.intermediate)
    for i, block in enumerate(anat.blocks):
        if plan.heads is not None:
            prune_heads(anat, block, plan.heads[i], plan.kv_heads[i], on_slice)
        if plan.cross_heads is not None and plan.cross_heads[i] is not None:
            prune_cross_heads(anat, block, plan.cross_heads[i], on_slice)
        if plan.ffn is not None:
            prune_ffn(anat, block, plan.ffn[i], on_slice)


def _slice(layer: nn.Module, side: str, idx: torch.Tensor, on_slice: OnSlice) -> None:
    (slice_out if side == "out" else slice_in)(layer, idx)
    on_slice(layer, side, idx)


def _set_attrs(root: nn.Module, values: dict[str, int]) -> None:
    for module in root.modules():
        for name, value in values.items():
            current = module.__dict__.get(name)
            if isinstance(current, int) and not isinstance(current, bool):
                setattr(module, name, value)


def _set_config(block: Block, values: dict[str, int]) -> None:
    """Give the block's modules that keep the model config (and may read sizes from it at forward time) one copy
    of their own with this block's sizes; the shared config stays as it was."""
    shared = None
    for module in block.module.modules():
        cfg = module.__dict__.get("config")
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        if shared is None:
            shared = copy.copy(cfg)
            for name, value in values.items():
                if isinstance(getattr(shared, name, None), int):
                    setattr(shared, name, value)
        module.config = shared
