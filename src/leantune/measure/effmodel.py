"""The efficiency model: a wider random-init LLaMA-style model on which memory, FLOPs and time are measured.

In a 5M-parameter base the embeddings and the LM head dominate the cost and hide what separates the methods, so
the efficiency figures come from this model (default about 30M parameters in the blocks), while quality comes
from the pretrained base. Its weights are random: efficiency does not depend on what the weights say.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class EfficiencyModel:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2  # grouped-query attention: 4 query heads per KV head
    intermediate: int = 2048
    vocab: int = 2048
    seq_len: int = 256
    batch_size: int = 4
    prompt_tokens: int = 16  # inference latency: batch 1, this prompt, then new_tokens greedy tokens
    new_tokens: int = 32
    seed: int = 0

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-l{self.layers}-q{self.heads}kv{self.kv_heads}-i{self.intermediate}-v{self.vocab}"

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq_len, self.prompt_tokens + self.new_tokens),
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            attn_implementation="sdpa",
        )

    def build(self, device: str | torch.device = "cpu", quantize=None):
        """The same weights for every call (seeded), in fp32, in train mode with the KV cache off.

        ``quantize`` ("nf4", "fp4", "int8"): the blocks' linear layers quantized as they are made, one at a time,
        so the process never holds the fp32 blocks (its peak memory is the quantized model's). Same architecture
        and initialization (LLaMA's: normal(0, initializer_range), norms 1), seeded, but not the same draws as the
        unquantized build: efficiency does not depend on the values."""
        from transformers import LlamaForCausalLM

        if quantize is not None:
            return self._build_quantized(device, quantize)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(self.config())
        model.config.name_or_path = f"efficiency:{self.name}"
        model.config.use_cache = False
        return model.to(device)

    def _build_quantized(self, device, quantize):
        from torch import nn
        from transformers import LlamaForCausalLM

        from ..anatomy import is_conv1d
        from ..quant import ATTR, QuantizeConfig, quantize_layer

        cfg = QuantizeConfig.from_any(quantize)
        config = self.config()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        rotary = type(model.model.rotary_emb)(config=config)  # its buffers are computed, not drawn
        model.model.rotary_emb = rotary.to(device)
        blocks = {id(m) for layer in model.model.layers for m in layer.modules()}
        std = config.initializer_range
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed)
            for name, mod in list(model.named_modules()):
                if not any(p.is_meta for p in mod.parameters(recurse=False)):
                    continue
                mod.to_empty(device=device, recurse=False)
                if isinstance(mod, (nn.Linear, nn.Embedding)):
                    mod.weight.normal_(0.0, std)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
                else:
                    for p in mod.parameters(recurse=False):
                        p.fill_(1.0)  # RMSNorm scales
                if id(mod) in blocks and (type(mod) is nn.Linear or is_conv1d(mod)):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, quantize_layer(mod, cfg))
        model.__dict__[ATTR] = cfg
        model.config.name_or_path = f"efficiency:{self.name}"
        model.config.use_cache = False
        return model.train()

    def batch(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """A fixed training batch of random tokens, every position a target."""
        g = torch.Generator().manual_seed(self.seed + 1)
        ids = torch.randint(3, self.vocab, (self.batch_size, self.seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        return {k: v.to(device) for k, v in batch.items()}

    def prompt(self, device: str | torch.device = "cpu") -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 2)
        return torch.randint(3, self.vocab, (1, self.prompt_tokens), generator=g).to(device)

    def describe(self, model=None) -> dict:
        d = {"name": self.name, "family": "llama", "init": "random", **asdict(self)}
        if model is not None:
            from ..anatomy import anatomy

            anat = anatomy(model)
            d["params"] = sum(p.numel() for p in model.parameters())
            d["block_params"] = sum(p.numel() for b in anat.blocks for p in b.module.parameters())
        return d
