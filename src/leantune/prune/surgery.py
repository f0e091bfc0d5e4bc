"""Physical surgery: slice attention heads and FFN channels out of the base model, in place.

Heads: output rows of q/k/v (GPT-2: the q, k and v parts of the fused ``c_attn``) and input columns of ``o``,
in blocks of the model's explicit ``head_dim``. FFN channels: output rows of gate/up and input columns of down.
Biases follow their rows. Attention modules read some head counts at forward time (``num_key_value_groups``
for GQA, GPT-2's ``split_size``), so those attributes are set to the new per-layer values; the model config is
shared by all layers and stays as it was (``export.save_merged`` writes an updated one where it fits).

Every slice is reported to ``on_slice(layer, side, index)`` (side "out" or "in") so that an adapter sitting on
the layer can follow.
"""

from __future__ import annotations

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
    "all_head_size": lambda q, kv, hd: q * hd,
    "split_size": lambda q, kv, hd: q * hd,  # GPT-2 splits c_attn's output in three parts of this size
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


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Feature indices of whole heads: head h covers [h*head_dim, (h+1)*head_dim)."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _noop(layer, side, idx):
    return None


def prune_heads(anat: Anatomy, block: Block, q_heads: list[int], kv_heads: list[int], on_slice: OnSlice = _noop):
    """Keep query heads ``q_heads`` and KV heads ``kv_heads`` (original indices) of one block."""
    hd, n_q, n_kv = anat.head_dim, anat.n_heads, anat.n_kv_heads
    q_rows, kv_rows = head_rows(q_heads, hd), head_rows(kv_heads, hd)
    if "qkv" in block.linears:  # fused: [q (n_q*hd) | k (n_kv*hd) | v (n_kv*hd)]
        rows = torch.cat([q_rows, n_q * hd + kv_rows, (n_q + n_kv) * hd + kv_rows])
        _slice(block.linears["qkv"], "out", rows, on_slice)
    else:
        _slice(block.linear("q"), "out", q_rows, on_slice)
        _slice(block.linear("k"), "out", kv_rows, on_slice)
        _slice(block.linear("v"), "out", kv_rows, on_slice)
    _slice(block.linear("o"), "in", q_rows, on_slice)
    _set_attrs(block, {k: f(len(q_heads), len(kv_heads), hd) for k, f in _HEAD_ATTRS.items()})


def prune_ffn(block: Block, channels: list[int], on_slice: OnSlice = _noop) -> None:
    """Keep FFN channels ``channels`` of one block (gate/up rows, down columns)."""
    idx = torch.tensor(channels, dtype=torch.long)
    for role in ("gate", "up"):
        if role in block.linears:
            _slice(block.linears[role], "out", idx, on_slice)
    _slice(block.linear("down"), "in", idx, on_slice)
    _set_attrs(block, {"intermediate_size": len(channels)})


def apply_foundation_plan(anat: Anatomy, plan: PrunePlan, on_slice: OnSlice = _noop) -> None:
    """Slice every block as the plan says (heads, KV heads, FFN channels)."""
    plan.check_model(len(anat.blocks), anat.n_heads, anat.n_kv_heads, anat.head_dim, anat.intermediate)
    for i, block in enumerate(anat.blocks):
        if plan.heads is not None:
            prune_heads(anat, block, plan.heads[i], plan.kv_heads[i], on_slice)
        if plan.ffn is not None:
            prune_ffn(block, plan.ffn[i], on_slice)


def _slice(layer: nn.Module, side: str, idx: torch.Tensor, on_slice: OnSlice) -> None:
    (slice_out if side == "out" else slice_in)(layer, idx)
    on_slice(layer, side, idx)


def _set_attrs(block: Block, values: dict[str, int]) -> None:
    for module in block.module.modules():
        for name, value in values.items():
            current = module.__dict__.get(name)
            if isinstance(current, int) and not isinstance(current, bool):
                setattr(module, name, value)
