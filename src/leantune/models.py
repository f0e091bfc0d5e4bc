"""Base models: built-in tiny ones made from configs in code, or any Hugging Face hub id / local folder.

Built-in models are random-initialised from a fixed seed, so the same name always gives the same weights
(adapters made on one machine load on another). Their tokenizer is byte-level, built in code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .precision import base_dtype

BUILTIN_PREFIX = "builtin:"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def byte_tokenizer():
    """A byte-level fast tokenizer (256 byte tokens + pad/bos/eos), a real ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=1024
    )


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    # GQA (4 query heads on 2 KV heads) and an explicit head_dim (24) that differs from hidden / heads (16).
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def _tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def _tiny_bert(vocab: int):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(cfg)


_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512)


def _tiny_hf(config_cls: str, model_cls: str, **kw):
    """A builder for a 2-layer random-init model of any transformers family (the family matrix's models)."""

    def build(vocab: int):
        import transformers

        cfg = getattr(transformers, config_cls)(vocab_size=vocab, **kw)
        return getattr(transformers, model_cls)(cfg)

    return build


# One tiny model per built-in family, each with the layout that family brings (GQA, fused, multi-query ...).
_FAMILY_MODELS = {
    "tiny-gemma": (_tiny_hf("GemmaConfig", "GemmaForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2, head_dim=16),
                   "2-layer Gemma, GQA 4q/2kv, scaled embeddings, tied head"),
    "tiny-gemma2": (_tiny_hf("Gemma2Config", "Gemma2ForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2,
                             head_dim=16, sliding_window=8), "2-layer Gemma 2, GQA, soft-capping, sliding window"),
    "tiny-gemma3": (_tiny_hf("Gemma3TextConfig", "Gemma3ForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2,
                             head_dim=16, sliding_window=8), "2-layer Gemma 3 (text), GQA, per-head q/k norms"),
    "tiny-phi3": (_tiny_hf("Phi3Config", "Phi3ForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2,
                           tie_word_embeddings=False), "2-layer Phi-3, fused qkv (GQA 4q/2kv) and fused gate_up"),
    "tiny-neox": (_tiny_hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_SMALL, **_IDS, hidden_dropout=0.0,
                           attention_dropout=0.0), "2-layer GPT-NeoX (Pythia), per-head interleaved fused qkv"),
    "tiny-opt": (_tiny_hf("OPTConfig", "OPTForCausalLM", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64, dropout=0.0,
                          attention_dropout=0.0, **_IDS), "2-layer OPT, learned positions, biases everywhere"),
    "tiny-falcon": (_tiny_hf("FalconConfig", "FalconForCausalLM", hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_kv_heads=4, multi_query=True, hidden_dropout=0.0,
                             attention_dropout=0.0, **_IDS),
                    "2-layer Falcon, multi-query attention (1 KV head; the config says 4), parallel attention"),
    "tiny-olmo2": (_tiny_hf("Olmo2Config", "Olmo2ForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2,
                            tie_word_embeddings=False), "2-layer OLMo 2, GQA, whole-projection q/k norms"),
    "tiny-mixtral": (_tiny_hf("MixtralConfig", "MixtralForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
                     "2-layer Mixtral, 4 experts (top 2) as 3-D parameters, GQA"),
    "tiny-qwen2-moe": (_tiny_hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_SMALL, **_IDS, num_key_value_heads=2,
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                shared_expert_intermediate_size=96, tie_word_embeddings=False),
                       "2-layer Qwen2-MoE, 4 routed experts (top 2) and a shared expert, GQA"),
    "tiny-deberta": (_tiny_hf("DebertaV2Config", "DebertaV2ForMaskedLM", **_SMALL, pad_token_id=0,
                              relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=32,
                              share_att_key=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                     "2-layer DeBERTa-v3 style masked LM (disentangled relative attention), an encoder"),
    "tiny-t5": (_tiny_hf("T5Config", "T5ForConditionalGeneration", d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                         dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0, initializer_factor=0.1,
                         **_IDS),
                "2-layer (+2 decoder) T5 v1.1 encoder-decoder, gated-GELU FFN, relative position bias, no biases"),
}


@dataclass(frozen=True)
class BuiltinModel:
    build: callable
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-llama": BuiltinModel(_tiny_llama, "2-layer LLaMA, hidden 64, GQA 4q/2kv heads, explicit head_dim 24"),
    "tiny-gpt2": BuiltinModel(_tiny_gpt2, "2-layer GPT-2, hidden 64, 4 heads (fused c_attn, Conv1D)"),
    "tiny-bert": BuiltinModel(_tiny_bert, "2-layer BERT masked LM, hidden 64, 4 heads (an encoder)"),
    **{name: BuiltinModel(build, desc) for name, (build, desc) in _FAMILY_MODELS.items()},
}


def register_builtin_model(name: str, build, description: str) -> None:
    """Add a ``builtin:NAME`` model (later: the pretrained base)."""
    BUILTIN_MODELS[name] = BuiltinModel(build, description)


def _pretrained_base(_vocab: int):
    from .base import load_base  # ships its own fp16 weights and BPE tokenizer (leantune/assets/base)

    return load_base()


def _efficiency_model(_vocab: int):
    from .measure.effmodel import EfficiencyModel  # the bench's default efficiency model, its own 2048 tokens

    return EfficiencyModel().build()


register_builtin_model("efficiency", _efficiency_model, "the bench's efficiency model: random-init 8-layer LLaMA, "
                       "hidden 512, GQA 8q/2kv, vocabulary 2048 (what `leantune bench` measures memory on)")
register_builtin_model("base", _pretrained_base, "pretrained 4-layer LLaMA (GQA 8q/2kv, ~3.3M params) on leantune's "
                       "synthetic corpus; shipped weights, rebuild with `leantune base build`")


def load_model(name: str, dtype: torch.dtype | str | None = None, device: str | None = None, quantize=None):
    """``(model, tokenizer)`` for ``builtin:NAME``, a local folder or a hub id.

    ``dtype`` (``--base-dtype``): ``"auto"``/None keeps the checkpoint's dtype (an fp16 one is upcast to fp32
    when no GPU is present), ``"fp32"``/``"bf16"``/``"fp16"`` (or a torch dtype) loads the base in that dtype.
    ``quantize`` (``--quantize``): ``"nf4"``/``"fp4"``/``"int8"`` or a dict of ``quant.QuantizeConfig`` fields
    converts the frozen linear layers with bitsandbytes after loading (leantune/quant.py)."""
    dtype = base_dtype(dtype)
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):]
        if key not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown built-in model {name!r}; available: "
                + ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS))
            )
        entry = BUILTIN_MODELS[key]
        tokenizer = byte_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = entry.build(len(tokenizer))
        model, tokenizer = built if isinstance(built, tuple) else (built, tokenizer)
        model.config.name_or_path = name
        prequantized = False
    else:
        model, tokenizer = _load_hf(name, dtype)
        from .quant import adopt_prequantized

        # a checkpoint stored quantized (a hub "...-bnb-4bit" model): taken as it is, --quantize must agree with it
        prequantized = adopt_prequantized(model, quantize)
    if prequantized:
        quantize = None  # loaded quantized already; its float parts are in ``dtype`` (from_pretrained's)
    elif dtype is not None:
        model = model.to(dtype)
    elif model.dtype == torch.float16 and not torch.cuda.is_available():
        # an fp16 checkpoint loads as fp16 (transformers 5): too slow and unstable to train on a CPU
        model = model.float()
    if device is not None:
        model = model.to(device)
    if quantize is not None:
        from .quant import quantize_model

        quantize_model(model, quantize)
    model.eval()
    return model, tokenizer


def _load_hf(name: str, dtype):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    if not os.path.isdir(name) and os.path.exists(name):
        raise ValueError(f"model {name!r} is a file; give a model folder, a hub id or a builtin: name")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise ValueError(
            f"cannot load model {name!r}: not a local folder with config.json and not reachable on the hub "
            f"({e.__class__.__name__}). Use a local path, a builtin: model (see `leantune models`), or go online."
        ) from None
    from .anatomy import known_family

    spec = known_family(config.model_type)
    from .quant import bitsandbytes, stored_quantization

    stored = stored_quantization(config)
    if stored is not None and stored["quant_method"] == "bitsandbytes":  # the install hint, before transformers' error
        bitsandbytes()
    if getattr(config, "is_encoder_decoder", False):  # T5 and kin: the config says, whatever the family spec
        auto = AutoModelForSeq2SeqLM
    else:
        auto = AutoModelForCausalLM if (spec is None or spec.causal) else AutoModelForMaskedLM
    model = auto.from_pretrained(name, dtype=dtype) if dtype is not None else auto.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.name_or_path = name
    return model, tokenizer


def model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None
