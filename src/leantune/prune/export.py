"""The pruned, merged model as a folder for inference (``--save-merged``), and its loader.

Two kinds, and the folder says which (``leantune_merged.json``) and why:

* ``huggingface``: every layer has the same pruned shape and that shape fits the model's own config class
  (checked by building the config and the model skeleton and comparing every tensor shape). ``transformers``
  loads it by itself (``AutoModelForCausalLM.from_pretrained(dir)``).
* ``leantune``: otherwise (layers of different shapes; GPT-2 and BERT derive ``head_dim`` from
  ``hidden / heads``; LlamaConfig insists on ``hidden % heads == 0``; OLMo 2's pruned heads keep q/k whole and T5's
  keep the shared relative position bias whole, which no config describes). The folder holds ``base_config.json``
  (the unpruned config), ``leantune_pruned.json`` (architecture, per-layer plan) and ``model.safetensors``;
  ``load_merged(dir)`` builds the skeleton, slices it as the plan says and loads the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn

from ..anatomy import anatomy, family_spec
from ..io import atomic_save_tensors, atomic_write_text
from .plan import PrunePlan
from .surgery import apply_foundation_plan

MERGED_NOTE = "leantune_merged.json"
PRUNED_NOTE = "leantune_pruned.json"
BASE_CONFIG = "base_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class MergedExport:
    path: Path
    kind: str  # "huggingface" or "leantune"
    reason: str

    def describe(self) -> str:
        how = "loads in transformers alone" if self.kind == "huggingface" else "load it with leantune.prune.load_merged"
        return f"{self.path}: {self.kind} folder ({how}); {self.reason}"


def save_merged(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> MergedExport:
    """Write the pruned model with its adapter merged in. The model must carry a pruned ``light_peft`` method
    (anything with a ``plan`` and ``base_state_dict(merged=True)``); the live model is not changed."""
    method = getattr(model, "leantune_method", None)
    plan = getattr(method, "plan", None)
    if plan is None:
        raise ValueError(
            "save_merged needs a model pruned by light_peft (after its estimation phase, or loaded with "
            "leantune.load); this one carries " + (f"method {method.name!r} without a prune plan" if method else "no method")
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = method.base_state_dict(merged=True)  # merged copies: the live model stays bitwise as it was
    candidate, reason = _hf_candidate(model, plan, state)
    if candidate is not None:
        candidate.save_pretrained(directory)
        kind = "huggingface"
    else:
        _save_leantune(model, plan, state, directory, reason)
        kind = "leantune"
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    note = {"format_version": FORMAT_VERSION, "kind": kind, "reason": reason,
            "layers": plan.layer_shapes(), "counts": plan.counts}
    atomic_write_text(directory / MERGED_NOTE, json.dumps(note, indent=2) + "\n")
    return MergedExport(directory, kind, reason)


def _pruned_config(model: nn.Module, shape: dict):
    """The model's config with the pruned sizes written into the attributes the family reads."""
    config = model.config
    spec = family_spec(model)
    d = config.to_dict()
    for attrs, value in ((spec.n_heads_attr, shape["heads"]), (spec.n_kv_heads_attr, shape["kv_heads"]),
                         (spec.intermediate_attr, shape["ffn"])):
        name = next((a for a in attrs if a in d), None)
        if name is not None:
            d[name] = value
    if "head_dim" in d:  # explicit head_dim keeps its value whatever the head count
        d["head_dim"] = anatomy(model).head_dim
    d["use_cache"] = True  # training switches the cache off; a served model wants it
    return type(config).from_dict(d)


def fitting_config(model: nn.Module, plan: PrunePlan, shapes: dict[str, tuple]) -> tuple:
    """(a config of the model's own class that describes the pruned model, why) or (None, why not).

    ``shapes``: the pruned model's base tensors (name -> shape), checked against a skeleton built from the config."""
    cls_name = type(model.config).__name__
    if plan.heads is not None and anatomy(model).qk_norm_kind() == "whole":
        return None, (f"{model.config.model_type} normalizes queries and keys over all heads at once: the pruned model "
                      "keeps q/k and their norms whole and passes on the kept heads' features only, which a "
                      f"{cls_name} cannot describe (it would normalize over the kept heads alone); the folder loads "
                      "with leantune.prune.load_merged (train with head_ratio=0 for a plain Hugging Face folder)")
    if (plan.heads is not None or plan.cross_heads is not None) and family_spec(model).shared_position_bias:
        return None, (f"{model.config.model_type} shares one relative position bias (a column per head) between the "
                      "blocks of a stack: with heads pruned it stays whole and each block uses its kept heads' part, "
                      f"which a {cls_name} cannot describe; the folder loads with leantune.prune.load_merged (train "
                      "with head_ratio=0 for a plain Hugging Face folder)")
    shape = plan.uniform_shape()
    if shape is None:
        per_layer = ", ".join(f"{s['heads']}h/{s['ffn']}" for s in plan.layer_shapes())
        return None, (f"layers keep different numbers of heads / FFN channels ({per_layer}); a transformers config "
                      "holds one size for all layers (train with uniform=true for a plain Hugging Face folder)")
    try:
        config = _pruned_config(model, shape)
    except Exception as e:  # the config class refuses the pruned sizes
        return None, f"{cls_name} refuses the pruned sizes: {e}"
    try:
        with init_empty_weights():
            skeleton = type(model)(config)
    except Exception as e:
        return None, f"{type(model).__name__} cannot be built with the pruned sizes: {e}"
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for k, v in shapes.items():
        if wanted.get(k) != tuple(v):
            return None, (f"the pruned shapes do not fit a {cls_name}: {k} is {tuple(v)} here, the config gives "
                          f"{wanted.get(k, 'no such tensor')} ({cls_name} derives some sizes from others)")
    missing = sorted(set(wanted) - set(shapes))
    if missing:
        return None, f"a {cls_name} model has tensors the pruned model lacks: {missing[:3]}"
    return config, (f"every layer keeps {shape['heads']} heads ({shape['kv_heads']} KV) and {shape['ffn']} FFN "
                    f"channels, which a {cls_name} describes")


def _hf_candidate(model: nn.Module, plan: PrunePlan, state: dict):
    """(a skeleton of the model's class holding the merged tensors, why) when a config fits, else (None, why not)."""
    config, reason = fitting_config(model, plan, {k: tuple(v.shape) for k, v in state.items()})
    if config is None:
        return None, reason
    with init_empty_weights():
        skeleton = type(model)(config)
    skeleton.load_state_dict(state, assign=True)
    skeleton.tie_weights()
    return skeleton, reason


def _save_leantune(model: nn.Module, plan: PrunePlan, state: dict, directory: Path, reason: str) -> None:
    tensors, aliases, seen = {}, {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.device.type != "meta" else None
        if key is not None and key in seen:  # tied weights: stored once
            aliases[k] = seen[key]
        else:
            tensors[k] = v
            if key is not None:
                seen[key] = k
    atomic_save_tensors(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string())
    config["use_cache"] = True  # training switches the cache off; a served model wants it
    atomic_write_text(directory / BASE_CONFIG, json.dumps(config, indent=2) + "\n")
    note = {"format_version": FORMAT_VERSION, "kind": "leantune-pruned", "architecture": type(model).__name__,
            "model_type": model.config.model_type, "reason": reason, "plan": plan.foundation_dict(), "aliases": aliases}
    atomic_write_text(directory / PRUNED_NOTE, json.dumps(note) + "\n")


def load_merged(directory: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None) -> nn.Module:
    """Load a folder written by ``save_merged`` (either kind) for inference."""
    import transformers

    directory = Path(directory)
    if not (directory / PRUNED_NOTE).exists():
        if not (directory / "config.json").exists():
            raise ValueError(f"{str(directory)!r} is not a merged model folder (no {PRUNED_NOTE}, no config.json)")
        config = transformers.AutoConfig.from_pretrained(directory)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise ValueError(f"{directory}/config.json names no transformers architecture ({arch!r})")
        model = cls.from_pretrained(directory, **({"dtype": dtype} if dtype is not None else {}))
        return model.to(device).eval() if device else model.eval()

    note = json.loads((directory / PRUNED_NOTE).read_text())
    if note.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory}: {PRUNED_NOTE} format {note['format_version']} is newer than this leantune; upgrade")
    cls = getattr(transformers, note["architecture"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{directory}: architecture {note['architecture']!r} is not a transformers model class")
    config_dict = json.loads((directory / BASE_CONFIG).read_text())
    config = transformers.AutoConfig.for_model(**config_dict)
    with init_empty_weights():  # parameters on meta (no init cost); buffers such as rotary tables are real
        model = cls(config)
    apply_foundation_plan(anatomy(model), PrunePlan.from_dict(note["plan"]))
    tensors = load_file(directory / WEIGHTS)
    for alias, key in note.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    model.load_state_dict(tensors, assign=True, strict=True)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
