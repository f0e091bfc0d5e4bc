"""A quantized base (QLoRA and kin): the frozen linear layers stored in 4 bits (NF4 / FP4) or 8 bits (LLM.int8)
through bitsandbytes, on the GPU or the CPU.

The base is loaded in its own dtype, its fingerprint is taken from those (unquantized) weights, and then every
linear layer of the blocks becomes a ``bitsandbytes`` ``Linear4bit`` / ``Linear8bitLt`` (the LM head only with
``quantize_head``; embeddings, norms and biases stay in the loaded dtype: they are small, and BitFit / LN tuning
train them). A method that works on a quantized base says so in its capabilities (``quantized_base``); the others
refuse at ``apply`` with the reason.

The quantization travels with the model as ``model.leantune_quantization`` (a plain attribute: not in
``state_dict``) and with an adapter in its ``leantune.json``, so eval, generate and export load the base the same
way. The fingerprint stored beside it (read by ``files.fingerprint``) is the
full-precision one, so an adapter trained on a 4-bit base also loads on the full-precision base.

Peak memory at load is the base in its loaded dtype: the conversion happens after loading (what makes the
fingerprint exact and the built-in models quantizable); the layers are converted one by one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .anatomy import anatomy, dequantized_weight, is_conv1d, is_quantized_layer
from .files import UNQUANTIZED_FINGERPRINT, fingerprint
from .precision import DTYPES

QUANT_TYPES = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install 'leantune[quant]' (or: pip install bitsandbytes>=0.49)"
ATTR = "leantune_quantization"
_ORIGINAL = "_leantune_quantized_as"  # on a layer dequantized in place: how to quantize it again
_CONV1D = "_leantune_conv1d_class"  # on a quantized layer made from a Conv1D: that class


@dataclass(frozen=True)
class QuantizeConfig:
    """How the base is quantized. ``compute_dtype``: the dtype 4-bit layers compute in (``auto``: the base's
    loaded dtype); ``double_quant``: quantize the 4-bit block scales too (QLoRA's double quantization, about 0.4
    bits per weight less); ``quantize_head``: the LM head too (default off: it is the one layer whose rounding
    every token's logits see, as in QLoRA and transformers' default); ``threshold``: LLM.int8's outlier threshold
    (0: pure int8; the paper's 6.0 keeps outlier columns in 16 bits)."""

    type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    quantize_head: bool = False
    threshold: float = 0.0
    # the checkpoint came quantized (its config.json's quantization_config, e.g. a hub "...-bnb-4bit" model): leantune
    # did not convert it, and the fields above describe what the checkpoint holds
    prequantized: bool = False

    def __post_init__(self):
        if self.type not in QUANT_TYPES:
            raise ValueError(f"--quantize {self.type!r} is not one of {', '.join(QUANT_TYPES)} (or none)")
        if self.compute_dtype != "auto" and self.compute_dtype not in DTYPES:
            raise ValueError(f"quantization compute_dtype {self.compute_dtype!r} is not one of auto, fp32, bf16, fp16")
        if self.threshold < 0:
            raise ValueError(f"quantization threshold must be >= 0, got {self.threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, value) -> QuantizeConfig | None:
        """None / "none" / "" -> None; "nf4" -> defaults; a dict (a recipe's or leantune.json's) -> its fields;
        a QuantizeConfig as it is."""
        if value is None or isinstance(value, QuantizeConfig):
            return value
        if isinstance(value, str):
            v = value.strip().lower()
            return None if v in ("", "none", "no", "off") else cls(type=v)
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ValueError(f"quantization: unknown option(s) {bad}; known: {sorted(known)}")
            return cls(**value)
        raise ValueError(f"quantize must be nf4, fp4, int8, none or a mapping of options, got {value!r}")


def bitsandbytes():
    """The bitsandbytes module, or a clear error saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError(f"--quantize needs bitsandbytes, which is not installed ({e}): {INSTALL_HINT}") from None
    return bnb


def quantization_of(model: nn.Module) -> QuantizeConfig | None:
    return model.__dict__.get(ATTR)


def _compute_dtype(cfg: QuantizeConfig, like: torch.dtype) -> torch.dtype:
    return like if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]


def quantize_layer(mod: nn.Module, cfg: QuantizeConfig, weight: torch.Tensor | None = None) -> nn.Module:
    """A new bitsandbytes layer holding ``mod``'s weight (or ``weight``, as (out, in)) quantized, and its bias."""
    bnb = bitsandbytes()
    w = (weight if weight is not None else (mod.weight.t() if is_conv1d(mod) else mod.weight)).detach()
    out_f, in_f = w.shape
    bias = mod.bias
    device = w.device
    if cfg.type == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                threshold=cfg.threshold, device="meta")
        q.weight = bnb.nn.Int8Params(w.contiguous().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=_compute_dtype(cfg, w.dtype),
                              compress_statistics=cfg.double_quant, quant_type=cfg.type, device="meta")
        q.weight = bnb.nn.Params4bit(w.contiguous().clone(), requires_grad=False, quant_type=cfg.type,
                                     compress_statistics=cfg.double_quant, module=q)
        # bitsandbytes repacks a 4-bit weight in place for AVX512-BF16 CPUs on its first no-grad eval forward (only
        # for out_features % 32 == 0): off, so every machine computes alike and the weight stays readable
        q.support_avx512bf16_for_cpu = False
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    q = q.to(device)  # bitsandbytes quantizes when the weight moves to a device
    q.train(mod.training)
    return q


def _targets(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    """Every linear layer inside the blocks (and the head with ``quantize_head``), by qualified name."""
    anat = anatomy(model)
    blocks = {id(b.module) for b in anat.blocks}
    head = anat.head
    out, inside = [], set()
    for mod in model.modules():
        if id(mod) in blocks:
            inside |= {id(m) for m in mod.modules()}
    for name, mod in model.named_modules():
        plain = type(mod) is nn.Linear or is_conv1d(mod)
        if plain and (id(mod) in inside or (cfg.quantize_head and mod is head)):
            out.append((name, mod))
    return out


# -- a pre-quantized checkpoint (config.json carries quantization_config) ----------------------------------------


_TORCH_TO_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def stored_quantization(config) -> dict | None:
    """A model config's ``quantization_config`` as a dict (a checkpoint stored quantized), or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return {**qc, "quant_method": str(getattr(qc.get("quant_method"), "value", qc.get("quant_method")))}


def checkpoint_quantization(model: nn.Module) -> QuantizeConfig | None:
    """What a checkpoint that transformers loaded quantized holds (its ``quantization_config`` and layers), as a
    QuantizeConfig with ``prequantized``; None for a plain checkpoint. Only bitsandbytes' formats are known."""
    qc = stored_quantization(getattr(model, "config", None))
    if qc is None:
        return None
    method = qc["quant_method"]
    if method != "bitsandbytes":
        raise ValueError(f"this checkpoint is quantized with {method!r}; leantune trains on bitsandbytes "
                         "checkpoints (4-bit NF4/FP4, LLM.int8) only: use the full-precision checkpoint with --quantize")
    head = getattr(getattr(model, "get_output_embeddings", lambda: None)(), "weight", None)
    quantize_head = head is not None and not head.is_floating_point()
    if qc.get("load_in_8bit"):
        return QuantizeConfig(type="int8", double_quant=False, quantize_head=quantize_head,
                              threshold=float(qc.get("llm_int8_threshold") or 0.0), prequantized=True)
    dt = qc.get("bnb_4bit_compute_dtype") or "float32"
    dt = getattr(torch, str(dt).removeprefix("torch."), torch.float32)
    return QuantizeConfig(type=str(qc.get("bnb_4bit_quant_type", "fp4")), double_quant=bool(qc.get("bnb_4bit_use_double_quant")),
                          compute_dtype=_TORCH_TO_NAME.get(dt, "fp32"), quantize_head=quantize_head, prequantized=True)


class _Lazy:
    """A quantized layer's weight as the fingerprint reads it: the shape and dtype of its dequantized (out, in)
    matrix, dequantized only if the fingerprint samples it."""

    def __init__(self, mod: nn.Module):
        self.mod = mod
        w = mod.weight
        qs = getattr(w, "quant_state", None)
        self.shape = torch.Size(qs.shape) if qs is not None else w.shape
        self.dtype = qs.dtype if qs is not None else torch.float32

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def detach(self) -> torch.Tensor:
        return dequantized_weight(self.mod).to(self.dtype)


class _FingerprintView:
    def __init__(self, model: nn.Module):
        self.config = getattr(model, "config", None)
        self.model = model

    def named_parameters(self, remove_duplicate: bool = True):
        owners = {id(m.weight): m for m in self.model.modules() if is_quantized_layer(m)}
        for n, p in self.model.named_parameters(remove_duplicate=remove_duplicate):
            yield n, (_Lazy(owners[id(p)]) if id(p) in owners else p)


def adopt_prequantized(model: nn.Module, quantize=None) -> bool:
    """A checkpoint that came quantized: take it as it is (no second quantization). Records its quantization on
    the model (``prequantized``) and its fingerprint, taken from its dequantized weights (no full-precision
    checkpoint exists: an adapter trained on it binds to this checkpoint, and to a model dequantized from it, not to
    the full-precision model it was once quantized from). ``quantize`` (the user's ``--quantize``, or an adapter's
    record) must agree with the checkpoint, or it is a clear error. Returns whether the model was pre-quantized."""
    found = checkpoint_quantization(model)
    if found is None:
        return False
    wanted = quantize if isinstance(quantize, dict) else None
    cfg = QuantizeConfig.from_any(quantize)
    if quantize is not None and cfg is None:
        raise ValueError(f"this checkpoint is stored quantized ({found.type}, its config.json's quantization_config); "
                         "it cannot be loaded in full precision (--quantize none): use the full-precision checkpoint")
    if cfg is not None:
        given = {k: v for k, v in (wanted or {"type": cfg.type}).items() if k != "prequantized"}
        differ = {k: (v, getattr(found, k)) for k, v in given.items() if getattr(found, k) != v}
        if differ:
            raise ValueError(
                "--quantize disagrees with the checkpoint, which is stored quantized (its config.json's "
                f"quantization_config): {', '.join(f'{k} {a!r} asked, {b!r} stored' for k, (a, b) in differ.items())}. "
                "Leave --quantize out (the checkpoint's own is used), or load the full-precision checkpoint")
    bitsandbytes()
    for mod in model.modules():
        if type(mod).__name__ == "Linear4bit":  # as quantize_layer: no in-place repacking for AVX512-BF16 CPUs
            mod.support_avx512bf16_for_cpu = False
    fp = fingerprint(_FingerprintView(model))
    fp["architecture"] = type(model).__name__
    model.__dict__[UNQUANTIZED_FINGERPRINT] = fp
    model.__dict__[ATTR] = found
    return True


def quantize_model(model: nn.Module, quantize) -> nn.Module:
    """Quantize ``model``'s frozen linear layers in place (see the module's doc); returns it. Its full-precision
    fingerprint is kept first, so adapters made on it match the unquantized base."""
    cfg = QuantizeConfig.from_any(quantize)
    if cfg is None:
        return model
    if quantization_of(model) is not None:
        raise ValueError("this model is quantized already")
    if cfg.prequantized:
        raise ValueError("the adapter was trained on a checkpoint stored quantized (prequantized in its leantune.json "
                         "base.quantization); this base is not: load that checkpoint as the base")
    if getattr(model, "leantune_method", None) is not None:
        raise ValueError("quantize the base before applying a method (leantune.load_model(..., quantize=...))")
    bitsandbytes()
    model.__dict__[UNQUANTIZED_FINGERPRINT] = fingerprint(model)  # before conversion: the full-precision weights
    tied = getattr(getattr(model, "get_input_embeddings", lambda: None)(), "weight", None)
    for name, mod in _targets(model, cfg):
        if tied is not None and mod.weight is tied:
            continue  # a head tied to the embedding stays as it is (the embedding cannot be 4-bit)
        parent, _, child = name.rpartition(".")
        q = quantize_layer(mod, cfg)
        if is_conv1d(mod):  # GPT-2's Conv1D, quantized as (out, in): a full dequantization gives its class back
            q.__dict__[_CONV1D] = type(mod)
        setattr(model.get_submodule(parent) if parent else model, child, q)
    model.__dict__[ATTR] = cfg
    return model


# -- dequantizing: a layer in place (LISA's active blocks, a merged export), the whole model -------------------


@torch.no_grad()
def dequantize_layer_(mod: nn.Module, dtype: torch.dtype | None = None) -> nn.Parameter:
    """Turn a quantized layer into a plain ``nn.Linear`` in place (the same module object, so what a method
    attached to it stays attached) holding the dequantized weight in ``dtype`` (default: the dtype it was
    quantized from); returns the new weight parameter. :func:`requantize_layer_` turns it back."""
    if not is_quantized_layer(mod):
        raise ValueError(f"{type(mod).__name__} is not a quantized layer")
    w = dequantized_weight(mod)
    how = {"cls": type(mod), "dtype": w.dtype}
    if type(mod).__name__ == "Linear8bitLt":
        how["threshold"] = mod.state.threshold
    else:
        how.update(compute_dtype=mod.compute_dtype, quant_type=mod.weight.quant_type,
                   double_quant=mod.weight.compress_statistics)
    mod.__dict__[_ORIGINAL] = how
    mod.__class__ = nn.Linear
    mod.weight = nn.Parameter(w.to(dtype or w.dtype).contiguous(), requires_grad=False)
    for stale in ("state", "quant_state"):
        mod.__dict__.pop(stale, None)
    return mod.weight


@torch.no_grad()
def requantize_layer_(mod: nn.Module) -> None:
    """Quantize a layer that :func:`dequantize_layer_` made plain again, in place, from its current weight."""
    how = mod.__dict__.pop(_ORIGINAL)
    cls = how["cls"]
    if cls.__name__ == "Linear8bitLt":
        cfg = QuantizeConfig(type="int8", threshold=how["threshold"])
    else:
        cfg = QuantizeConfig(type=how["quant_type"], double_quant=how["double_quant"])
    fresh = quantize_layer(mod, cfg, weight=mod.weight.detach().to(how["dtype"]))
    if cls.__name__ != "Linear8bitLt":
        fresh.compute_dtype = how["compute_dtype"]
    # the module keeps its identity (children, installed forward): take the fresh layer's class and tensors
    mod.__class__ = cls
    for k, v in fresh.__dict__.items():
        if k not in ("_modules", "_parameters", "_buffers", "training") and not k.startswith("_leantune"):
            mod.__dict__[k] = v
    mod._parameters["weight"] = fresh.weight
    if cls.__name__ != "Linear8bitLt":
        mod.weight.module = mod
    if mod.bias is not None:
        mod.bias.requires_grad_(False)


def was_quantized(mod: nn.Module) -> bool:
    """A layer dequantized in place by :func:`dequantize_layer_` (it can be quantized again)."""
    return _ORIGINAL in mod.__dict__


def dequantize_model_(model: nn.Module) -> int:
    """Every quantized layer of ``model`` becomes a plain ``nn.Linear`` with the dequantized weight in the base's
    full-precision dtype (the one it was quantized from), in place; returns how many. The model no longer counts
    as quantized (a merge then writes into real weights); its full-precision fingerprint stays."""
    n = 0
    for mod in list(model.modules()):
        if is_quantized_layer(mod):
            dequantize_layer_(mod)
            mod.__dict__.pop(_ORIGINAL, None)
            conv1d = mod.__dict__.pop(_CONV1D, None)
            if conv1d is not None:  # back to GPT-2's (in, out) layout, so the architecture is the plain one
                w = mod.weight.detach()
                mod.__class__ = conv1d
                mod.nf, mod.nx = w.shape
                mod.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
            n += 1
    model.__dict__.pop(ATTR, None)
    hf = getattr(model, "hf_quantizer", None)
    if hf is not None:  # a checkpoint transformers loaded quantized: its quantization state goes too (a plain model)
        hf.remove_quantization_config(model)
        # the load's weight conversions include the quantizer's (packed -> Params4bit), which cannot be reverted at
        # save: the model's default mapping serves a plain model
        model.__dict__.pop("_weight_conversions", None)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return n


# -- sizes ----------------------------------------------------------------------------------------------------


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """What the model's weights take in memory, quantized ones at their real size: ``{"quantized": bytes of the
    packed weights and their scales (double-quantized statistics included), "other": every other parameter and
    buffer, "total": both}``."""
    quantized = other = 0
    seen = set()
    for mod in model.modules():
        for p in list(mod._parameters.values()) + list(mod._buffers.values()):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            if is_quantized_layer(mod) and p is mod.weight:
                quantized += size + _stats_bytes(mod)
            else:
                other += size
    return {"quantized": quantized, "other": other, "total": quantized + other}


def scale_bytes(model: nn.Module) -> int:
    """Bytes of the quantization scales of every quantized layer (kept beside the packed weight, not parameters)."""
    return sum(_stats_bytes(m) for m in model.modules() if is_quantized_layer(m))


def _stats_bytes(mod: nn.Module) -> int:
    w = mod.weight
    scb = getattr(w, "SCB", None)
    if scb is None and type(mod).__name__ == "Linear8bitLt":
        scb = mod.state.SCB
    if scb is not None:
        return scb.numel() * scb.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return 0
    total = qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
    if getattr(qs, "state2", None) is not None:
        s2 = qs.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
    return total


class QuantizedMergeError(ValueError):
    """A merge into a 4-bit/8-bit layer, refused (:func:`refuse_quantized_merge`)."""


def is_quantized_model(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a bitsandbytes quantized layer (``--quantize`` or a pre-quantized
    checkpoint)."""
    return any(is_quantized_layer(m) for m in model.modules())


def refuse_quantized_merge(mod: nn.Module, method: str) -> None:
    """A merge writes into the base weights; a 4-bit/8-bit one would be silently re-quantized (rounding most of
    the update away), so it is refused. A merged export dequantizes the base first (:func:`dequantize_model_`)."""
    if is_quantized_layer(mod):
        raise QuantizedMergeError(
            f"{method}: cannot merge into a quantized layer ({type(mod).__name__}): that would re-quantize the "
            "update silently. Dequantize the base first (leantune.quant.dequantize_model_(model), what "
            "`leantune export --format merged` does) or keep the adapter unmerged"
        )
