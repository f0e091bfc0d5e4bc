"""The external anchor: Hugging Face PEFT's own LoRA layers, run through leantune's harness.

PEFT injects its ``lora.Linear`` wrappers in place (``peft.inject_adapter_in_model``), on the same target layers
that leantune's LoRA picks from the anatomy, with the same rank, alpha, dropout and init. Wrapped as a
:class:`~leantune.methods.base.Method` (not registered: it is a yardstick, not one of leantune's methods), it
trains in leantune's loop and is measured by the same code as every other run (``"impl": "peft"`` in results).
"""

from __future__ import annotations

from torch import nn

from ..anatomy import in_out_features
from ..methods.base import Capabilities, ConfigError, Method
from ..methods.lora import Lora, LoraConfig


class PeftLora(Method):
    name = "peft_lora"
    family = "reparametrization"
    description = "Hugging Face PEFT's LoRA (the bench's external anchor)."
    config_cls = LoraConfig
    default_lr = Lora.default_lr  # the same documented default as leantune's LoRA: one recipe, two implementations

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(mergeable=True, mixed_batch=not self.config.dora, inference_overhead="extra_ffn")

    def _apply(self, model, anat):
        try:
            from peft import LoraConfig as PeftConfig
            from peft import inject_adapter_in_model
        except ImportError:
            raise ConfigError("the PEFT anchor needs Hugging Face peft: pip install 'leantune[interop]'") from None
        cfg = self.config
        targets = anat.linears(cfg.targets)
        self.targets = {name: mod for name, _role, _i, mod in targets}  # the base layers, before PEFT wraps them
        peft_cfg = PeftConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                              use_dora=cfg.dora, target_modules=sorted(self.targets), bias="none")
        inject_adapter_in_model(peft_cfg, model)
        self.layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "merge")}
        if len(self.layers) != len(self.targets):
            raise RuntimeError(f"peft wrapped {len(self.layers)} layers, leantune's LoRA targets {len(self.targets)}")
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)

    def trainable_parameters(self):
        for n, p in self._model().named_parameters():
            if "lora_" in n:
                yield n, p

    def num_changed(self) -> int:
        return sum(in_out_features(m)[0] * in_out_features(m)[1] for m in self.targets.values())

    def state(self):
        return {n: p.data for n, p in self.trainable_parameters()}

    def merge(self) -> None:
        for m in self.layers.values():
            m.merge()
        self.merged = True

    def unmerge(self) -> None:
        for m in self.layers.values():
            m.unmerge()
        self.merged = False


def apply_peft_lora(model: nn.Module, **options) -> PeftLora:
    return PeftLora(LoraConfig.from_dict(options, method="peft_lora")).apply(model)
