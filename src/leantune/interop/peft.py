"""Hugging Face PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``), written and read
with JSON and safetensors only: PEFT need not be installed and nothing is unpickled.

The format: tensor keys ``base_model.model.<module>.lora_A.weight`` (r x in), ``<module>.lora_B.weight``
(out x r) and, for DoRA, ``<module>.lora_magnitude_vector`` (out,); a module's update is
``lora_alpha / r * B A`` (``/ sqrt(r)`` with ``use_rslora``), its r and alpha overridden per module by
``rank_pattern`` / ``alpha_pattern`` (regular expressions matched against the module name, as PEFT does). GPT-2's
Conv1D layers store (in, out), but the factors keep the Linear orientation; the config says ``fan_in_fan_out``.

Methods with another PEFT equivalent say so in ``Method.peft_adapter()`` ((IA)³ as IA3, KronA as LoKr with full
factors) and :func:`save_peft_adapter` writes that adapter type; reading back is for LoRA folders only.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..anatomy import FUSED_ROLES, LINEAR_ROLES, anatomy, in_out_features, is_conv1d, weight_2d
from ..io import AdapterError, atomic_save_tensors, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude"}

# Config fields that change what the adapter computes in ways leantune's LoRA does not: refused when set.
_UNSUPPORTED = ("modules_to_save", "lora_bias", "layer_replication", "trainable_token_indices", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "velora_config", "kasa_config",
                "monteclora_config")
# Fields read on import, and fields that only matter for creating or training an adapter in PEFT.
_HANDLED = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
            "bias", "init_lora_weights", "fan_in_fan_out", "target_modules", "target_parameters")
_IGNORED = ("task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
            "exclude_modules", "layers_to_transform", "layers_pattern", "megatron_config", "megatron_core",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
            "runtime_config")
# init_lora_weights values that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA change them);
# MiCA starts B from the base's minor singular vectors with A = 0 and only freezes B: plain LoRA once trained.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# -- writing ------------------------------------------------------------------------------------------------


def save_peft_lora(
    directory: str | os.PathLike,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float | dict[str, float] | None = None,
    use_rslora: bool = False,
    magnitudes: dict[str, torch.Tensor] | None = None,
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    target_modules: list[str] | None = None,
    parameters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    target_parameters: list[str] | None = None,
) -> Path:
    """Write a PEFT LoRA folder from LoRA factors; returns the folder.

    ``modules``: ``{qualified module name in the base model, e.g. "model.layers.0.self_attn.q_proj": (A, B)}``
        with A of shape (r, in) and B of shape (out, r); the rank r may differ from module to module.
    ``alpha``: one value for every module, ``{name: value}``, or None for a scale of exactly 1 (alpha = r, or
        sqrt(r) with ``use_rslora``): the module's update is ``alpha / r * B A`` (``alpha / sqrt(r)`` with
        ``use_rslora``). An S²FT delta D on columns S exports as A = one-hot rows of S, B = D, alpha None.
    ``magnitudes``: DoRA magnitude vectors ``{name: (out,)}`` for every module (writes ``use_dora``), or None.
    ``fan_in_fan_out``: True when the target layers are Conv1D, storing (in, out) (GPT-2).
    ``target_modules``: the config's target list; default the qualified names of ``modules``.
    ``parameters``: LoRA on 3-D expert parameters, PEFT's ``target_parameters``: ``{"<module>.<parameter>": (A, B)}``
        with A (E, r, in) and B (E, out, r), one pair per expert, the update ``scale * B_e A_e`` added to W [E, out,
        in]; a module's parameters in the order the module registers them (PEFT nests one wrapper per parameter,
        the first innermost, and the tensor keys say ``base_layer`` once per wrapper outside). Their rank and
        alpha must be the config's ``r`` / ``lora_alpha`` (PEFT has no per-parameter pattern).
    ``target_parameters``: the config's list for them; default their qualified names.
    The most common rank and alpha become ``r`` / ``lora_alpha``; the others go to ``rank_pattern`` /
    ``alpha_pattern``. Weights are written first and the config last, each atomically.
    """
    parameters = parameters or {}
    if not modules and not parameters:
        raise ValueError("save_peft_lora: no modules to write")
    ranks = {}
    for name, (a, b) in modules.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"save_peft_lora: {name!r}: A must be (r, in) and B (out, r) with the same r; got "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        ranks[name] = int(a.shape[0])
    if magnitudes is not None and set(magnitudes) != set(modules):
        raise ValueError("save_peft_lora: DoRA magnitudes must be given for exactly the modules given")

    def unit_alpha(r):
        return math.sqrt(r) if use_rslora else float(r)

    if alpha is None:
        alphas = {n: unit_alpha(r) for n, r in ranks.items()}
    elif isinstance(alpha, dict):
        missing = sorted(set(modules) - set(alpha))
        if missing:
            raise ValueError(f"save_peft_lora: alpha is missing for module(s) {missing[:5]}")
        alphas = {n: float(alpha[n]) for n in modules}
    else:
        alphas = dict.fromkeys(modules, float(alpha))
    param_ranks = {}
    for name, (a, b) in parameters.items():
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise ValueError(f"save_peft_lora: parameter {name!r}: A must be (E, r, in) and B (E, out, r); got "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        param_ranks[name] = int(a.shape[1])
    r_default = _most_common(ranks.values()) if ranks else _most_common(param_ranks.values())
    alpha_default = _most_common(alphas.values()) if alphas else (
        unit_alpha(r_default) if alpha is None else float(alpha))
    odd = sorted(n for n, r in param_ranks.items() if r != r_default)
    if odd or isinstance(alpha, dict) and parameters:
        raise ValueError(f"save_peft_lora: expert parameters {odd or sorted(parameters)} need the config's one rank "
                         f"r={r_default} and one alpha (PEFT has no rank_pattern for target_parameters)")

    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
        if magnitudes is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitudes[name]
    by_module: dict[str, list[str]] = {}
    for name in parameters:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    for module, names in by_module.items():
        for k, name in enumerate(names):
            a, b = parameters[name]
            e, r, _ = a.shape
            key = f"{PREFIX}{module}{'.base_layer' * (len(names) - 1 - k)}"
            tensors[f"{key}.lora_A.weight"] = a.reshape(e * r, a.shape[2]).contiguous()  # rows e*r .. (e+1)*r - 1
            # PEFT's lora_B.weight is (out, r * E) with expert e in columns e, E + e, 2E + e, ...
            tensors[f"{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r_default,
        "lora_alpha": _json_number(alpha_default),
        "lora_dropout": float(dropout),
        "target_modules": list(target_modules) if target_modules is not None else sorted(modules),
        **({"target_parameters": list(target_parameters) if target_parameters is not None else sorted(parameters)}
           if parameters else {}),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "use_rslora": bool(use_rslora),
        "use_dora": magnitudes is not None,
        "rank_pattern": {n: r for n, r in sorted(ranks.items()) if r != r_default},
        "alpha_pattern": {n: _json_number(a) for n, a in sorted(alphas.items()) if a != alpha_default},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return directory


def _most_common(values):
    counts = Counter(values)
    top = max(counts.values())
    return max(v for v, c in counts.items() if c == top)  # ties: the larger value


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# the LoRA ranks vLLM's engine accepts (--max-lora-rank); an adapter of another rank is refused at load
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_factors(model: nn.Module) -> dict:
    """The carried fine-tune's LoRA factors in the form vLLM serves: every module at one rank from
    :data:`VLLM_RANKS` (zero rows of A and columns of B pad it: the update is unchanged), each module's scale folded
    into B (so ``lora_alpha = r``, no ``rank_pattern`` or ``alpha_pattern``), no DoRA, ``nn.Linear`` layers only.
    Raises ValueError with the reason for what vLLM would refuse."""
    method = model.leantune_method
    if method.peft_adapter() is not None:
        raise ValueError(f"vLLM serves LoRA adapters only, and a {method.name!r} adapter exports as another PEFT type; "
                         "export --format merged and serve the merged model")
    factors = method.lora_factors()
    if factors is None:
        raise ValueError(f"method {method.name!r} has no exact LoRA form, so vLLM cannot serve it as an adapter; "
                         "export --format merged")
    if factors.get("parameters"):
        raise ValueError("the adapter has LoRA pairs on expert parameters (experts=true, PEFT's target_parameters), "
                         "which leantune does not know vLLM to load; export --format peft without --target, or "
                         "--format merged")
    if factors.get("magnitudes"):
        raise ValueError("vLLM does not load DoRA adapters (use_dora); export --format merged, or train without dora")
    named = dict(model.named_modules())
    conv = sorted(n for n in factors["modules"] if is_conv1d(named[n]))
    if conv:
        raise ValueError(f"vLLM serves LoRA on nn.Linear layers; {conv[0]} is a GPT-2-style Conv1D (fan_in_fan_out), "
                         "whose adapters vLLM does not load: export --format merged")
    top = max(int(a.shape[0]) for a, _ in factors["modules"].values())
    rank = next((r for r in VLLM_RANKS if r >= top), None)
    if rank is None:
        raise ValueError(f"rank {top} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}; export --format merged")
    alpha, rslora = factors.get("alpha"), factors.get("use_rslora", False)
    modules = {}
    for name, (a, b) in factors["modules"].items():
        r = int(a.shape[0])
        scale = 1.0 if alpha is None else (alpha[name] if isinstance(alpha, dict) else alpha) / (
            math.sqrt(r) if rslora else r)
        a2 = a.new_zeros(rank, a.shape[1])
        b2 = b.new_zeros(b.shape[0], rank)
        a2[:r], b2[:, :r] = a, b * scale
        modules[name] = (a2, b2)
    return {"modules": modules, "alpha": None, "use_rslora": False, "dropout": factors.get("dropout", 0.0),
            "rank": rank}


def export_peft(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                target: str = "peft") -> Path:
    """Write the fine-tune that ``model`` carries as a PEFT LoRA folder (methods with exact LoRA factors:
    LoRA, rsLoRA, DoRA; others through their ``lora_factors()``). ``target="vllm"``: in the form vLLM loads
    (:func:`vllm_factors`), or a ValueError saying why it cannot be."""
    method = getattr(model, "leantune_method", None)
    if method is None:
        raise ValueError("this model carries no leantune method: load or apply one first")
    if target not in ("peft", "vllm"):
        raise ValueError(f"unknown export target {target!r}; use peft or vllm")
    if method.peft_native and target == "peft":  # its fine-tune already is a PEFT adapter: PEFT's own files
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        method.write_peft_files(directory, method.state())
        return directory
    if target == "vllm":
        factors = vllm_factors(model)
        factors.pop("rank")
        return save_peft_lora(
            directory, **factors, fan_in_fan_out=False,
            base_model_name_or_path=base_model_name_or_path or _model_name(model),
            task_type=_task_type(method.anatomy),
            target_modules=_short_targets(model, set(factors["modules"])),
        )
    other = method.peft_adapter()
    if other is not None:
        config = dict(other["config"])
        for key, names in other.get("module_fields", {}).items():  # module lists named like the targets
            config[key] = _short_targets(model, set(names))
        return save_peft_adapter(directory, config, other["weights"],
                                 base_model_name_or_path=base_model_name_or_path or _model_name(model),
                                 task_type=_task_type(method.anatomy),
                                 target_modules=_short_targets(model, set(other["weights"])))
    factors = method.lora_factors()
    if factors is None:
        raise ValueError(
            f"method {method.name!r} has no exact LoRA form, so it cannot be written as a PEFT LoRA adapter"
            + ("; export it with --format merged instead" if method.capabilities.mergeable else "")
        )
    named = dict(model.named_modules())
    layers = [named[n] for n in factors["modules"]]
    params = factors.get("parameters") or {}
    return save_peft_lora(
        directory, **factors,
        target_parameters=_short_targets(model, set(params), parameters=True) if params else None,
        fan_in_fan_out=bool(layers) and all(is_conv1d(m) for m in layers),
        base_model_name_or_path=base_model_name_or_path or _model_name(model),
        task_type=_task_type(method.anatomy),
        target_modules=_short_targets(model, set(factors["modules"])),
    )


def _task_type(anat) -> str | None:
    """PEFT's task type for this model (a plain PeftModel, None, for encoders)."""
    return "CAUSAL_LM" if anat.causal else "SEQ_2_SEQ_LM" if anat.seq2seq else None


def _model_name(model: nn.Module) -> str | None:
    from ..models import model_name

    return model_name(model)


def save_peft_adapter(directory: str | os.PathLike, config: dict, weights: dict[str, dict[str, torch.Tensor]], *,
                      base_model_name_or_path: str | None, task_type: str | None, target_modules: list[str]) -> Path:
    """Write a PEFT adapter folder of any type from its config fields and its tensors by module: keys
    ``base_model.model.<module>.<tensor name>``. Weights first, the config last, each atomically."""
    if not weights:
        raise ValueError("save_peft_adapter: no modules to write")
    tensors = {f"{PREFIX}{name}.{part}": t.detach().contiguous() for name, parts in weights.items()
               for part, t in parts.items()}
    full = {"task_type": task_type, "base_model_name_or_path": base_model_name_or_path, "revision": None,
            "target_modules": list(target_modules), "inference_mode": True, **config}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(full, indent=2) + "\n")
    return directory


def _short_targets(model: nn.Module, names: set[str], parameters: bool = False) -> list[str]:
    """Last name parts (``q_proj``; for parameters ``experts.down_proj``) when they pick exactly these modules (or
    parameters) in the model, as PEFT and vLLM write them; the qualified names otherwise."""
    parts = 2 if parameters else 1

    def tail(n):
        return ".".join(n.split(".")[-parts:])

    short = {tail(n) for n in names}
    if parameters:  # a parametrized parameter lives under parametrizations.<name>.original
        every = {f"{m}.{p}" if m else p for m, mod in model.named_modules()
                 for p in (*(n for n, _ in mod.named_parameters(recurse=False)),
                           *getattr(mod, "parametrizations", {}))}
    else:
        every = {n for n, _ in model.named_modules()}
    picked = {n for n in every if tail(n) in short}
    return sorted(short) if picked == names else sorted(names)


# -- reading ------------------------------------------------------------------------------------------------


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """A PEFT adapter folder (``adapter_config.json``) that is not also a leantune one."""
    d = Path(directory)
    return (d / CONFIG_NAME).is_file() and not (d / "leantune.json").exists()


def read_peft_config(directory: str | os.PathLike) -> dict:
    """``adapter_config.json``, checked to describe a plain LoRA that leantune computes the same way."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{str(directory)!r} has no {CONFIG_NAME}: not a Hugging Face PEFT adapter folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: a PEFT adapter of peft_type {cfg.get('peft_type')!r}; leantune imports PEFT LORA "
                           "adapters only")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={cfg['bias']!r} (trained biases) is not supported; only bias='none'")
    init = cfg.get("init_lora_weights", True)
    if (init.lower() if isinstance(init, str) else init) not in _PLAIN_INITS:
        raise AdapterError(
            f"{path}: init_lora_weights={cfg['init_lora_weights']!r}: this adapter expects a base model whose weights "
            "were changed at init. Convert it to a plain LoRA with PEFT (save_pretrained with "
            "path_initial_model_for_weight_conversion) and import that."
        )
    set_fields = [k for k in _UNSUPPORTED if cfg.get(k)]
    if set_fields:
        raise AdapterError(f"{path}: {set_fields} set: such PEFT LoRA variants are not supported by leantune's LoRA")
    unknown = sorted(k for k, v in cfg.items() if k not in _HANDLED + _IGNORED + _UNSUPPORTED and v)
    if unknown:
        raise AdapterError(
            f"{path}: unknown PEFT field(s) {unknown} (a newer PEFT?); leantune cannot tell whether they change the "
            "LoRA math. If they do not, remove them from the file and import again."
        )
    return cfg


def read_peft_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    d = Path(directory)
    path = d / WEIGHTS_NAME
    if not path.is_file():
        if (d / "adapter_model.bin").exists():
            raise AdapterError(
                f"{d}: adapter_model.bin is a pickle file, which leantune never loads (it can run code). Re-save it "
                "as safetensors with PEFT: PeftModel.from_pretrained(base, dir).save_pretrained(out)"
            )
        raise AdapterError(f"{path}: missing; the PEFT adapter folder is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None


def peft_base_name(directory: str | os.PathLike) -> str | None:
    return read_peft_config(directory).get("base_model_name_or_path") or None


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern that matches the end of the module name (after a dot)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _expert_parts(model: nn.Module, cfg: dict, parts: dict, source: str) -> dict:
    """Take the factors of PEFT's ``target_parameters`` wrappers out of ``parts``: ``{(experts module, parameter):
    (A [E, r, in], B [E, out, r])}``. A module's adapted parameters nest one wrapper each in the order the module
    registers them, the first innermost; a key's ``base_layer`` count says which one it is."""
    targets = cfg.get("target_parameters") or []
    if not targets:
        return {}
    from ..methods.lora import _EXPERT_PARAMS

    named = dict(model.named_modules())
    r = int(cfg.get("r", 8))
    out = {}
    for key in list(parts):
        module = key.replace(".base_layer", "")
        mod = named.get(module)
        adapted = [p for p, _ in mod.named_parameters(recurse=False)
                   if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in targets)] if mod else []
        depth = key.count(".base_layer")
        if not adapted and not depth:
            continue  # a Linear layer's factors (target_modules)
        if depth >= len(adapted):
            raise AdapterError(f"{source}: tensors {key!r} name no adapted parameter of a module in this model "
                               f"(target_parameters {targets}); is it the right base model?")
        param = adapted[len(adapted) - 1 - depth]
        if param not in _EXPERT_PARAMS:
            raise AdapterError(f"{source}: LoRA on parameter {module}.{param}: leantune's LoRA adapts the expert "
                               f"parameters {list(_EXPERT_PARAMS)} only")
        p = parts.pop(key)
        w = getattr(mod, param)
        e, out_f, in_f = w.shape
        a, b = p.get("A"), p.get("B")
        if a is None or b is None or a.shape != (e * r, in_f) or b.shape != (out_f, r * e):
            raise AdapterError(f"{source}: {module}.{param}: factors {sorted(p)} of shapes "
                               f"{[tuple(t.shape) for t in p.values()]} do not fit {e} experts of ({out_f}, {in_f}) "
                               f"at r={r}; the adapter was made for another base model")
        out[module, param] = (a.reshape(e, r, in_f), b.reshape(out_f, r, e).permute(2, 0, 1))
    return out


def load_peft(model: nn.Module, directory: str | os.PathLike, trainable: bool = False):
    """Import a PEFT LoRA folder onto a fresh base ``model`` as a leantune LoRA (in place); returns the method.

    Modules with different ranks are zero-padded to the largest rank, with B rescaled so that every module's
    update ``scale * B A`` is unchanged; target layers the adapter leaves out get zero factors (no change)."""
    from ..methods.lora import Lora, LoraConfig

    cfg = read_peft_config(directory)
    tensors = read_peft_weights(directory)
    source = str(directory)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in _PARTS if body.endswith(s)), None)
        if suffix is None:
            raise AdapterError(
                f"{source}: tensor {key!r} is not a LoRA factor of a linear layer (lora_A / lora_B / "
                "lora_magnitude_vector); LoRA on embeddings and extra trained modules are not supported"
            )
        parts.setdefault(body[: -len(suffix)], {})[_PARTS[suffix]] = t
    if not parts:
        raise AdapterError(f"{source}: {WEIGHTS_NAME} holds no LoRA tensors")
    expert_parts = _expert_parts(model, cfg, parts, source)

    anat = anatomy(model)
    roles = {name: role for name, role, _i, _m in anat.linears("all-linear")}
    named = dict(model.named_modules())
    dora = bool(cfg.get("use_dora"))
    rslora = bool(cfg.get("use_rslora"))
    for name, p in sorted(parts.items()):
        if name not in roles:
            raise AdapterError(
                f"{source}: module {name!r} is not a linear layer that leantune's LoRA targets in this "
                f"{anat.model_type} model (roles {', '.join(LINEAR_ROLES)}); is it the right base model?"
            )
        need = ("A", "B", "magnitude") if dora else ("A", "B")
        lacking = [x for x in need if x not in p]
        if lacking or (not dora and "magnitude" in p):
            raise AdapterError(f"{source}: module {name!r} has factors {sorted(p)}, expected {list(need)}"
                               f" (use_dora={dora})")
        in_f, out_f = in_out_features(named[name])
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{source}: module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a layer "
                f"with {in_f} inputs and {out_f} outputs; the adapter was made for another base model"
            )

    def scale(alpha, r):
        return alpha / (math.sqrt(r) if rslora else r)

    alpha_default = cfg.get("lora_alpha", 8)
    rank = {n: int(p["A"].shape[0]) for n, p in parts.items()}
    alpha = {n: float(_pattern_value(cfg.get("alpha_pattern"), n, alpha_default)) for n in parts}
    expert_rank = int(cfg.get("r", 8))
    top = max([*rank.values(), *([expert_rank] if expert_parts else [])])
    our_alpha = _most_common([alpha[n] for n in parts if rank[n] == top] or [float(alpha_default)])
    config = LoraConfig(
        r=top, alpha=our_alpha, dropout=float(cfg.get("lora_dropout", 0.0)), rslora=rslora, dora=dora,
        targets=",".join(r for r in (*LINEAR_ROLES, *FUSED_ROLES) if r in {roles[n] for n in parts}),
        experts=bool(expert_parts),
    )
    method = Lora(config).apply(model)
    ours = scale(our_alpha, top)
    state = {}
    with torch.no_grad():
        for name, attr, _mod, pair in method._expert_pairs():
            a, b = torch.zeros_like(pair.A), torch.zeros_like(pair.B)
            if (name, attr) in expert_parts:
                pa, pb = expert_parts[name, attr]
                a[:, :expert_rank] = pa
                b[:, :, :expert_rank] = pb.to(b.dtype) * (scale(float(alpha_default), expert_rank) / ours)
            state[f"{name}.{attr}.lora_A"], state[f"{name}.{attr}.lora_B"] = a, b
    with torch.no_grad():
        for name, mod in method.layers.items():
            lora = mod.lora
            a, b = torch.zeros_like(lora.A), torch.zeros_like(lora.B)
            if name in parts:
                r = rank[name]
                a[:r] = parts[name]["A"]
                b[:, :r] = parts[name]["B"].to(b.dtype) * (scale(alpha[name], r) / ours)
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a, b
            if dora:  # an untouched layer keeps the magnitude apply() gave it, the row norms of W: no change
                state[f"{name}.magnitude"] = parts[name]["magnitude"] if name in parts else weight_2d(mod).norm(dim=1)
    method.load_state(state)
    if not trainable:
        for _, p in method.trainable_parameters():
            p.requires_grad_(False)
    return method
