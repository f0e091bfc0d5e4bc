"""The PEFT bridge: any Hugging Face PEFT adapter type (LoHa, LoKr, VeRA, OFT, BOFT, AdaLoRA, IA3, ...) as a leantune
method, so it trains in leantune's loop, checkpoints, evaluates, benches and exports like every other method.

``leantune train --method peft -o peft_type=LOHA -o r=8 -o target_modules=q,v``: ``peft_type`` picks PEFT's config
class, ``target_modules`` is a leantune role list (``q,v``, ``all-linear``: resolved through the anatomy to the
model's module names) or PEFT's own module names, and every other option is a field of that PEFT config, checked
against it. PEFT's ``get_peft_model`` injects its layers into the model in place (the model keeps its class and
module names); the method keeps the PeftModel beside it, not as a submodule.

The adapter folder holds PEFT's own files (``adapter_config.json`` + ``adapter_model.safetensors``, so plain
``PeftModel.from_pretrained`` reads it) plus ``leantune.json`` (method ``peft``, the base fingerprint and the
weight file's checksum), which decides how leantune loads the folder. Capabilities come from the PEFT type: it is
mergeable where PEFT's layers of that type implement ``merge``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..anatomy import ALL_LINEAR, FUSED_ROLES, LINEAR_ROLES
from ..files import atomic_save_tensors, atomic_write_text
from .base import Capabilities, ConfigError, Method, MethodConfig, register

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# The survey's classes for PEFT's types (the bench's "type" column); types not named here count as
# reparametrization, the class of most of PEFT's layer methods.
FAMILY_OF = {"IA3": "additive", "LN_TUNING": "selective", "VBLORA": "reparametrization"}
# Fields leantune sets itself: the folder is written for inference, for this base, without a task head.
_SET_BY_LEANTUNE = ("peft_type", "base_model_name_or_path", "revision", "inference_mode", "task_type",
                    "auto_mapping", "peft_version")
_INSTALL = "the PEFT bridge needs Hugging Face peft: pip install 'leantune[interop]'"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(_INSTALL) from None
    return peft


def peft_config_class(peft_type: str):
    """PEFT's config class for a type name (``"LOHA"``); ConfigError naming the types when it is not one."""
    peft = _peft()
    mapping = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuners = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING
    key = str(peft_type).upper()
    if key not in mapping:
        raise ConfigError(f"method 'peft': peft_type {peft_type!r} is not a PEFT type; known: "
                          f"{', '.join(sorted(str(k) for k in mapping))}")
    if key not in tuners or issubclass(mapping[key], peft.PromptLearningConfig) or key == "ADAPTION_PROMPT":
        raise ConfigError(
            f"method 'peft': peft_type {key!r} is a prompt-learning type, which PEFT does not inject into layers; "
            "use leantune's own prompt_tuning / prefix_tuning, or a layer type (LORA, LOHA, LOKR, VERA, IA3, OFT, ...)")
    return mapping[key]


@dataclass
class PeftBridgeConfig(MethodConfig):
    peft_type: str = "LORA"
    # leantune roles ("q,v", "all-linear"), resolved through the anatomy, or PEFT's own module names / regex
    target_modules: str = ALL_LINEAR
    peft_options: dict[str, Any] = field(default_factory=dict)  # the other fields of PEFT's config for the type

    @classmethod
    def from_dict(cls, d: dict, method: str | None = None) -> PeftBridgeConfig:
        """Flat options (``{"peft_type": "LOHA", "r": 8, "alpha": 16}``, as ``-o`` gives them) or the saved form
        (``peft_options`` nested); the fields other than ``peft_type`` / ``target_modules`` go to PEFT's config."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} | {"format_version"}
        nested = d.pop("peft_options", None) or {}
        if isinstance(nested, str):
            try:
                nested = json.loads(nested)
            except json.JSONDecodeError:
                raise ConfigError(f"method 'peft': peft_options {nested!r} is not a JSON object") from None
        if not isinstance(nested, dict):
            raise ConfigError(f"method 'peft': peft_options must be a mapping, got {nested!r}")
        flat = {k: d.pop(k) for k in list(d) if k not in known}
        both = sorted(set(flat) & set(nested))
        if both:
            raise ConfigError(f"method 'peft': option(s) {both} given both flat and in peft_options; give each once")
        d["peft_options"] = {**nested, **flat}
        if "peft_type" in d:
            d["peft_type"] = str(d["peft_type"]).upper()
        if isinstance(d.get("target_modules"), (list, tuple)):
            d["target_modules"] = ",".join(str(x) for x in d["target_modules"])
        return super().from_dict(d, method=method)

    def validate(self) -> None:
        try:
            import peft  # noqa: F401
        except ImportError:
            return  # apply says what to install; listing methods works without peft
        cfg_cls = peft_config_class(self.peft_type)
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        reserved = sorted(set(self.peft_options) & set(_SET_BY_LEANTUNE + ("target_modules",)))
        if reserved:
            raise ConfigError(f"method 'peft': {reserved} are set by leantune (target_modules is an option of its "
                              "own); leave them out of the PEFT options")
        unknown = sorted(set(self.peft_options) - fields)
        if unknown:
            raise ConfigError(f"method 'peft': {unknown} are not fields of PEFT's {cfg_cls.__name__} "
                              f"(peft_type {self.peft_type}); its fields: "
                              f"{', '.join(sorted(fields - set(_SET_BY_LEANTUNE)))}")
        if not self.target_modules.strip():
            raise ConfigError("method 'peft': target_modules is empty; give roles (q,v or all-linear) or module names")
        # PEFT's own checks of the values; module lists given as roles are resolved only on a model
        self.peft_config(None, {k: None for k, v in self.peft_options.items() if is_roles(v)})

    def peft_config(self, target_modules, module_fields: dict | None = None):
        """PEFT's config object for these options, the given target modules and the module-list fields resolved
        from roles (ConfigError on a bad value)."""
        cfg_cls = peft_config_class(self.peft_type)
        options = {**self.peft_options, **(module_fields or {})}
        try:
            return cfg_cls(**options, target_modules=target_modules, inference_mode=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method 'peft': PEFT's {cfg_cls.__name__} refused the options "
                              f"{self.peft_options}: {e}") from None

    def uses_roles(self) -> bool:
        return is_roles(self.target_modules)


def is_roles(value) -> bool:
    """A module list given as leantune roles ("q,v", ["k", "v"], "all-linear") rather than PEFT module names."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        return False
    items = [str(t).strip() for t in value if str(t).strip()]
    return bool(items) and all(t == ALL_LINEAR or t in LINEAR_ROLES or t in FUSED_ROLES for t in items)


def _layer_package(peft_type: str) -> str:
    """``peft.tuners.loha`` for LOHA: the package of PEFT's tuner for the type (its layers live in ``.layer``)."""
    tuner = _peft().mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
    return tuner.__module__.rsplit(".", 1)[0]


@functools.lru_cache(maxsize=1)
def peft_bnb_types() -> tuple[str, ...]:
    """The PEFT types whose tuner ships bitsandbytes layers (``peft/tuners/<type>/bnb.py``): the ones PEFT itself
    injects into 4-bit / 8-bit layers, so the bridge trains them on a quantized base. Empty without PEFT."""
    import importlib.util

    try:
        tuners = _peft().mapping.PEFT_TYPE_TO_TUNER_MAPPING
    except ConfigError:
        return ()
    out = []
    for key in tuners:
        try:
            if importlib.util.find_spec(_layer_package(key) + ".bnb") is not None:
                out.append(str(getattr(key, "value", key)))
        except (ImportError, KeyError, ValueError):
            continue
    return tuple(sorted(out))


def peft_type_merges(peft_type: str) -> bool:
    """Whether PEFT's layers of this type fold into the base weight: every layer class of the type's tuner
    overrides ``BaseTunerLayer.merge`` (the base raises NotImplementedError)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        layer_mod = importlib.import_module(_layer_package(peft_type) + ".layer")
    except ImportError:
        return False
    classes = [c for c in vars(layer_mod).values()
               if isinstance(c, type) and issubclass(c, BaseTunerLayer) and c is not BaseTunerLayer
               and c.__module__ == layer_mod.__name__]
    concrete = [c for c in classes if issubclass(c, nn.Module)]
    return bool(concrete) and all(c.merge is not BaseTunerLayer.merge for c in concrete)


@register("peft")
class PeftBridge(Method):
    family = "reparametrization"  # per instance: FAMILY_OF[peft_type]
    description = ("Any Hugging Face PEFT adapter type (LoHa, LoKr, VeRA, OFT, BOFT, AdaLoRA, IA3, ...) trained "
                   "through leantune's loop; the folder holds PEFT's own files plus leantune.json.")
    config_cls = PeftBridgeConfig
    default_lr = 5e-4  # LoRA's documented default (methods/lora.py); PEFT's types ship no learning rate
    peft_native: ClassVar[bool] = True

    def __init__(self, config: PeftBridgeConfig | None = None):
        super().__init__(config)
        self.family = FAMILY_OF.get(self.config.peft_type, "reparametrization")
        self.peft_model = None
        self.layers: dict[str, nn.Module] = {}
        self._trainable_names: list[str] = []

    @property
    def capabilities(self) -> Capabilities:
        try:
            if self.layers:
                from peft.tuners.tuners_utils import BaseTunerLayer

                mergeable = all(type(m).merge is not BaseTunerLayer.merge for m in self.layers.values())
            else:
                mergeable = peft_type_merges(self.config.peft_type)
        except (ImportError, ConfigError):
            mergeable = False
        overhead = "none" if self.config.peft_type == "LN_TUNING" else "extra_ffn"
        bnb = peft_bnb_types()
        return Capabilities(mergeable=mergeable, inference_overhead=overhead, fsdp=False,
                            fsdp_refusal="the PEFT bridge's injected layers are not tested under FSDP in leantune; "
                                         "train it in one process or with DDP",
                            quantized_base=self.config.peft_type in bnb,
                            quantized_refusal=f"PEFT has no bitsandbytes layer for {self.config.peft_type} (its own "
                                              f"4-bit/8-bit dispatch covers {', '.join(bnb) or 'no type here'})")

    # -- apply ----------------------------------------------------------------------------------------------
    def _targets(self, anat) -> list[str] | str:
        if self.config.uses_roles():
            return self._resolve(anat, self.config.target_modules)
        items = [t.strip() for t in self.config.target_modules.split(",") if t.strip()]
        return items if len(items) > 1 else items[0]

    @staticmethod
    def _resolve(anat, roles) -> list[str]:
        names = [name for name, _role, _i, _m in anat.linears(roles)]
        if not names:
            raise ConfigError(f"method 'peft': no layer of this {anat.model_type} model has the role(s) {roles!r}")
        return names

    def _module_fields(self, anat) -> dict:
        """PEFT options that list modules (IA3's feedforward_modules, ...) given as roles: the modules' names."""
        return {k: self._resolve(anat, v) for k, v in self.config.peft_options.items() if is_roles(v)}

    def check_model(self, anat) -> None:
        _peft()
        self._targets(anat)

    def _apply(self, model, anat):
        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = self._targets(anat)
        # a base quantized by leantune: the flags transformers sets on a model it loads quantized, for the call, so
        # PEFT injects its own bitsandbytes layers (which know the weight is packed)
        kinds = {type(m).__name__ for m in model.modules()}
        flags = [f for f, cls in (("is_loaded_in_4bit", "Linear4bit"), ("is_loaded_in_8bit", "Linear8bitLt"))
                 if cls in kinds and not getattr(model, f, False)]
        for f in flags:
            model.__dict__[f] = True
        try:
            self.peft_model = get_peft_model(model, self.config.peft_config(targets, self._module_fields(anat)))
        except ValueError as e:  # PEFT: "Target modules ... not found in the base model", unsupported layer types
            raise ConfigError(f"method 'peft': PEFT could not inject {self.config.peft_type} into this model: {e}") \
                from None
        finally:
            for f in flags:
                model.__dict__.pop(f, None)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        if not self.layers:
            raise ConfigError(f"method 'peft': PEFT adapted no layer for target_modules {targets!r}")
        # what PEFT marked trainable is the fine-tune (kept by name: loading for inference freezes it again)
        self._trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        for _, p in self.trainable_parameters():  # float32 for what trains (precision.py), whatever the base's dtype
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()

    def trainable_parameters(self):
        named = dict(self._model().named_parameters())
        for n in self._trainable_names:
            yield n, named[n]

    # -- what trains ----------------------------------------------------------------------------------------
    def num_changed(self) -> int:
        if not self.capabilities.mergeable:  # nothing of the base changes: the added tensors are the change
            return self.num_trainable()
        return sum(m.get_base_layer().weight.numel() for m in self.layers.values())

    def state(self) -> dict[str, torch.Tensor]:
        """PEFT's own state dict of the adapter (keys ``base_model.model.<module>.<tensor>``, as in
        ``adapter_model.safetensors``; VeRA's shared projections included)."""
        from peft import get_peft_model_state_dict

        self._model()
        return dict(get_peft_model_state_dict(self.peft_model))

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        from .base import check_state_keys

        check_state_keys(self.name, self.state(), state)
        result = set_peft_model_state_dict(self.peft_model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"PEFT did not take adapter tensor(s) {unexpected[:5]}; the folder was made for "
                             "another model or PEFT type")

    # -- the folder -----------------------------------------------------------------------------------------
    def write_peft_files(self, directory, state: dict[str, torch.Tensor]) -> str:
        """PEFT's ``adapter_model.safetensors`` (weights first) and ``adapter_config.json``, each atomically;
        returns the weights file's name (leantune.json records its size and checksum)."""
        from ..models import model_name

        model = self._model()
        atomic_save_tensors({k: v.detach().contiguous() for k, v in state.items()}, directory / PEFT_WEIGHTS_NAME,
                            metadata={"format": "pt"})
        cfg = self.peft_model.peft_config["default"].to_dict()
        cfg.update(base_model_name_or_path=model_name(model), inference_mode=True)
        atomic_write_text(directory / PEFT_CONFIG_NAME, json.dumps(cfg, indent=2, default=_json_default) + "\n")
        return PEFT_WEIGHTS_NAME

    # -- merge ----------------------------------------------------------------------------------------------
    def merge(self) -> None:
        from ..quant import refuse_quantized_merge

        for name, m in self.layers.items():  # PEFT's bnb merge re-quantizes the update: refused, as leantune's own
            refuse_quantized_merge(m.get_base_layer(), f"peft ({name})")
        super().merge()
        for m in self.layers.values():
            m.merge()

    def unmerge(self) -> None:
        super().unmerge()
        for m in self.layers.values():
            m.unmerge()

    def unload(self) -> nn.Module:
        self.peft_model.base_model.unload()  # each PEFT layer replaced by its base layer (merged or not)
        self.layers, self.peft_model = {}, None
        return self._release()

    def remove(self) -> nn.Module:
        if self.merged:
            self.unmerge()
        return self.unload()


def _json_default(x):
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if hasattr(x, "value"):  # PEFT's enums
        return x.value
    raise TypeError(f"adapter_config.json: cannot write {x!r}")
