"""Soft prompts: prompt tuning (Lester et al. 2021), prefix tuning (Li & Liang 2021) and prefix tuning "flat".

``prompt_tuning``  n virtual token embeddings prepended to the input embeddings (a child ``prompt`` of the base
                   model's trunk; hooks around the trunk's forward prepend them, extend the attention mask, position
                   ids and token types, and cut the virtual positions off the trunk's output, so the head, the loss
                   and generation only ever see the real tokens: virtual positions get no loss by construction).
                   With a KV cache the virtual tokens sit in the cache like any token (the first call fills it).
``prefix_tuning``  l key and l value vectors per KV head in every attention layer (a child ``prefix`` of each
                   attention entry point, ``anatomy.Anatomy.attention_modules``), prepended to the keys and values
                   that attention sees. They are trained through a reparametrization MLP (an embedding of l
                   positions -> Linear(d, hidden) -> tanh -> Linear(hidden, layers x 2 x kv heads x head_dim)), and
                   the saved adapter holds plain prefixes: ``state()`` folds the MLP's output, computed exactly as the
                   forward computes it, so the fold is bitwise.
``prefix_flat``    the same prefixes as plain parameters (no MLP), initialised from the keys and values the frozen
                   model computes for l vocabulary tokens.

The prefixes go in through transformers' attention interface: the model's ``attn_implementation`` is switched to a
registered wrapper of the one it had (eager or sdpa) that prepends each layer's prefix to the keys and values it
receives, after the cache update. The cache therefore holds only real tokens, every cache class of transformers 5.x
works unchanged, and the positions (RoPE, learned) of the real tokens are those of the base. The attention mask is
extended with visible prefix columns (padding, causal or packed masks stay as they were for the real keys). GQA:
one prefix per KV head. Families whose attention does not call the interface (Falcon, DeBERTa) refuse at apply.

The prefixes and prompts are float32 whatever the base dtype and are cast to the keys' dtype at the point of use.
None of these is mergeable (an extra input, not a weight change: ``inference_overhead="extra_input"``), and none is
the identity at init (any prefix takes attention mass).
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import Anatomy
from ..precision import trainable_dtype
from .attached import AttachedMethod, term_input
from .base import Capabilities, ConfigError, MethodConfig, register

PREFIX_IMPL = "leantune_prefix_"  # + the wrapped implementation: "leantune_prefix_sdpa", "leantune_prefix_eager"
WRAPPABLE = ("eager", "sdpa")


# -- the attention wrapper ---------------------------------------------------------------------------------------


def _inner_attention(module: nn.Module, base: str):
    if base == "eager":  # each modeling file has its own eager function (GPT-2's differs from LLaMA's)
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _visible_prefix_mask(mask, q_len: int, kv_len: int, p: int, causal: bool, additive: bool, like: torch.Tensor):
    """The attention mask for keys ``[prefix (p) | real keys (kv_len)]``: prefix columns visible to every query,
    the real keys' columns as ``mask`` had them (None: all visible, or causal when ``causal`` and several queries)."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        i = torch.arange(q_len, device=like.device)[:, None]
        j = torch.arange(p + kv_len, device=like.device)[None]
        allowed = (j < p) | (j - p <= kv_len - q_len + i)
        mask = allowed[None, None]
        if additive:
            zero = torch.zeros((), dtype=like.dtype, device=like.device)
            return torch.where(mask, zero, torch.finfo(like.dtype).min)
        return mask
    if mask.shape[-1] != kv_len:
        raise RuntimeError(f"prefix attention: the mask covers {mask.shape[-1]} keys, the layer has {kv_len}; this "
                           "cache or mask layout is not supported by the prefix methods")
    if mask.dtype == torch.bool:
        pad = torch.ones((*mask.shape[:-1], p), dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros((*mask.shape[:-1], p), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def _make_prefix_attention(base: str):
    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        inner = _inner_attention(module, base)
        pre: Prefix | None = getattr(module, "prefix", None)
        if pre is None or not pre.active:
            return inner(module, query, key, value, attention_mask, **kwargs)
        if pre.capturing:  # prefix_flat's init: keep the keys/values of the init tokens, attend without a prefix
            pre.captured = (key[0].detach(), value[0].detach())
            return inner(module, query, key, value, attention_mask, **kwargs)
        pk, pv = pre.kv()
        b, p, q_len, kv_len = key.shape[0], pk.shape[1], query.shape[2], key.shape[2]
        if pk.shape[0] != key.shape[1] or pk.shape[-1] != key.shape[-1]:
            raise RuntimeError(f"prefix of shape {tuple(pk.shape)} does not fit keys of shape {tuple(key.shape)}")
        pk = pk.to(key.dtype)[None].expand(b, -1, -1, -1)
        pv = pv.to(value.dtype)[None].expand(b, -1, -1, -1)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        mask = _visible_prefix_mask(attention_mask, q_len, kv_len, p, causal, base == "eager", query)
        key = torch.cat([pk, key], dim=2)
        if pre.gate is None:
            return inner(module, query, key, torch.cat([pv, value], dim=2), mask, **kwargs)
        # UniPELT: the gate scales the prefix's share of each query's output: out = real + g · prefix share. Two
        # calls under the same softmax, each with values of the keys' head size (so the fused flash / memory-efficient
        # kernels still apply; values [prefix | real] side by side would double the head size and fall back to the
        # kernel that keeps the attention matrix): all values give real + prefix, values [prefix | 0] the prefix's.
        total, weights = inner(module, query, key, torch.cat([pv, value], dim=2), mask, **kwargs)  # (b, q, heads, hd)
        share, _ = inner(module, query, key, torch.cat([pv, torch.zeros_like(value)], dim=2), mask, **kwargs)
        g = pre.gate_values(q_len).to(total.dtype)  # (b, q, 1, 1)
        return total + (g - 1) * share, weights

    return prefix_attention


def _register_wrappers() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for base in WRAPPABLE:
        name = PREFIX_IMPL + base
        if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionInterface.register(name, _make_prefix_attention(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])


def _set_implementation(model: nn.Module, name: str) -> None:
    """Switch the model (and the configs of its submodules) to attention implementation ``name``."""
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    for cfg in configs.values():
        cfg._attn_implementation = name


# -- the modules ---------------------------------------------------------------------------------------------


class PrefixMLP(nn.Module):
    """Li & Liang's reparametrization, one for all layers: ``P = Linear_up(tanh(Linear_down(E)))``, E (l, d) an
    embedding of the prefix positions; layer i's keys and values are rows ``[i·2·kv·hd, (i+1)·2·kv·hd)`` of the
    output (computed per layer from those rows of ``up`` alone)."""

    def __init__(self, length: int, hidden: int, bottleneck: int, layers: int, n_kv: int, head_dim: int,
                 like: torch.Tensor):
        super().__init__()
        kw = {"dtype": trainable_dtype(like), "device": like.device}
        self.embedding = nn.Parameter(torch.randn(length, hidden, **kw))
        self.down = nn.Linear(hidden, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, layers * 2 * n_kv * head_dim, **kw)
        self.shape = (n_kv, length, head_dim)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_kv, length, hd = self.shape
        width = 2 * n_kv * hd
        rows = slice(layer * width, (layer + 1) * width)
        h = torch.tanh(self.down(self.embedding))
        out = F.linear(h, self.up.weight[rows], self.up.bias[rows])  # (l, 2·kv·hd)
        kv = out.view(length, 2, n_kv, hd).permute(1, 2, 0, 3)  # (2, kv, l, hd)
        return kv[0], kv[1]


class Prefix(nn.Module):
    """One attention layer's prefix: l keys and l values per KV head, (kv, l, hd); plain parameters or a layer of a
    shared :class:`PrefixMLP`. ``gate`` (UniPELT): ``σ(W_g x)`` per token from the attention's input."""

    def __init__(self, n_kv: int, length: int, head_dim: int, like: torch.Tensor, mlp: PrefixMLP | None = None,
                 layer: int = 0, gate_in: int = 0):
        super().__init__()
        kw = {"dtype": trainable_dtype(like), "device": like.device}
        self.layer = layer
        if mlp is None:
            self.keys = nn.Parameter(torch.zeros(n_kv, length, head_dim, **kw))
            self.values = nn.Parameter(torch.zeros(n_kv, length, head_dim, **kw))
        else:
            self.mlp = mlp
        self.gate = nn.Linear(gate_in, 1, **kw) if gate_in else None
        self.active = True
        self.capturing = False
        self.captured = None

    @property
    def reparametrized(self) -> bool:
        return "mlp" in self._modules

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp.layer_kv(self.layer) if self.reparametrized else (self.keys, self.values)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the prefixes it computes now (exactly the forward's tensors)."""
        if self.reparametrized:
            k, v = self.kv()
            del self.mlp
            self.keys = nn.Parameter(k.detach().clone().contiguous())
            self.values = nn.Parameter(v.detach().clone().contiguous())

    def capture_input(self, module, args, kwargs) -> None:
        """Forward pre-hook on the attention module: remember its input for the gate."""
        x = args[0] if args else kwargs.get("hidden_states")
        self.__dict__["_gate_input"] = x

    def gate_values(self, q_len: int) -> torch.Tensor:
        x = self.__dict__.pop("_gate_input", None)
        if x is None or x.shape[1] != q_len:
            raise RuntimeError("prefix gate: the attention module's input was not seen before its attention")
        g = torch.sigmoid(self.gate(term_input(x, self.gate.weight.dtype)))  # (b, q, 1)
        return g[:, :, :, None]


# -- the methods -------------------------------------------------------------------------------------------------


@dataclass
class PrefixConfig(MethodConfig):
    length: int = 20  # l: prefix vectors per layer and KV head (the survey: 10-30)
    reparam_hidden: int = 512  # the reparametrization MLP's width (Li & Liang 2021); 0 = flat (no MLP)

    def validate(self):
        if self.length < 1:
            raise ConfigError(f"prefix: length (l) must be >= 1, got {self.length}")
        if self.reparam_hidden < 0:
            raise ConfigError(f"prefix: reparam_hidden must be >= 0 (0: no MLP), got {self.reparam_hidden}")


@dataclass
class PrefixFlatConfig(PrefixConfig):
    reparam_hidden: int = 0


class _SoftPrompt(AttachedMethod):
    family = "additive"

    @property
    def capabilities(self) -> Capabilities:
        # virtual tokens / key-value prefixes touch no weight: a quantized base's layers just compute as they are
        return Capabilities(mergeable=False, restores_base=True, inference_overhead="extra_input",
                            identity_at_init=False, quantized_base=True)

    def merge(self) -> None:
        raise NotImplementedError(f"method {self.name!r} adds inputs to attention (virtual tokens or key/value "
                                  "prefixes), not a change of weights: it cannot be merged; serve it with the adapter")

    def unmerge(self) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be merged or unmerged")

    def num_changed(self) -> int:
        return sum(v.numel() for v in self.state().values())  # additive: what is stored is the change


class PrefixTuning(_SoftPrompt):
    """Per-layer key/value prefixes at every attention entry point."""

    child_name = "prefix"
    config_cls = PrefixConfig
    default_lr = 1e-2  # the shipped base's tuned LR is in measure/bench.py TUNED_LRS
    gated = False  # UniPELT's gate on each layer's prefix

    @property
    def capabilities(self) -> Capabilities:
        shared = self.config.reparam_hidden > 0
        return Capabilities(mergeable=False, restores_base=True, inference_overhead="extra_input",
                            identity_at_init=False, fsdp=not shared, quantized_base=True,
                            fsdp_refusal="the reparametrization MLP is shared by every block's prefix, and FSDP shards "
                                         "each block as its own unit; train prefix_flat, or without FSDP" if shared else "")

    def check_model(self, anat: Anatomy) -> None:
        anat.attention_modules()  # PlacementError (a ConfigError-like ValueError) naming what is missing
        impl = getattr(self._config_of(anat), "_attn_implementation", None) or "eager"
        if impl not in WRAPPABLE and not impl.startswith(PREFIX_IMPL):
            raise ConfigError(f"{self.name}: the model runs attention implementation {impl!r}; prefixes go in "
                              f"through {' or '.join(WRAPPABLE)}: load the model with attn_implementation='sdpa'")

    @staticmethod
    def _config_of(anat: Anatomy):
        return getattr(anat.blocks[0].attention, "config", None)

    def _apply(self, model, anat):
        self._start()
        cfg = self.config
        like = next(model.parameters())
        mods = anat.attention_modules()
        self._impl_before = {id(m.config): m.config._attn_implementation for m in model.modules()
                             if getattr(m, "config", None) is not None}
        self.mlp = (PrefixMLP(cfg.length, anat.hidden, cfg.reparam_hidden, len(mods), anat.n_kv_heads, anat.head_dim,
                              like) if cfg.reparam_hidden else None)
        for i, (name, mod) in enumerate(mods):
            pre = Prefix(anat.n_kv_heads, cfg.length, anat.head_dim, like, self.mlp, i,
                         gate_in=anat.hidden if self.gated else 0)
            self.attach(name, mod, pre)
            if self.gated:
                self.add_handle(name, mod.register_forward_pre_hook(pre.capture_input, with_kwargs=True))
        _register_wrappers()
        impl = self._config_of(anat)._attn_implementation or "eager"
        if not impl.startswith(PREFIX_IMPL):
            _set_implementation(model, PREFIX_IMPL + impl)
        if self.mlp is None:
            self._init_from_vocabulary(model, anat)

    @torch.no_grad()
    def _init_from_vocabulary(self, model, anat) -> None:
        """Flat prefixes start as the keys and values the frozen model computes for l vocabulary tokens (Li & Liang
        found real-word activations the stable init for the flat form)."""
        vocab = anat.embed.num_embeddings
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(3, vocab - 1), vocab, (1, self.config.length), generator=g)
        ids = ids.to(anat.embed.weight.device)
        for _n, _l, pre in self.children():
            pre.capturing = True
        was = model.training
        model.eval()
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            model.train(was)
            for _n, _l, pre in self.children():
                pre.capturing = False
        for name, _l, pre in self.children():
            if pre.captured is None:
                raise ConfigError(f"{self.name}: {name} did not go through transformers' attention interface; this "
                                  "family's attention entry point is wrong in its FamilySpec")
            k, v = pre.captured
            pre.keys.copy_(k.to(pre.keys.dtype))
            pre.values.copy_(v.to(pre.values.dtype))
            pre.captured = None

    def unload(self):
        model = self._model()
        for cfg in {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}.values():
            cfg._attn_implementation = self._impl_before.get(id(cfg), cfg._attn_implementation)
        self.mlp = None
        return super().unload()

    def fold(self) -> None:
        """Drop the reparametrization MLP: the prefixes become plain parameters with the values it computes."""
        for _n, _l, pre in self.children():
            pre.fold()
        self.mlp = None

    def state(self) -> dict[str, torch.Tensor]:
        """Plain prefixes (folded from the MLP when there is one) and the gates: ``<attention>.prefix.keys`` ..."""
        out = {}
        with torch.no_grad():
            for name, _l, pre in self.children():
                k, v = pre.kv()
                out[f"{name}.prefix.keys"], out[f"{name}.prefix.values"] = k.detach(), v.detach()
                if pre.gate is not None:
                    out[f"{name}.prefix.gate.weight"], out[f"{name}.prefix.gate.bias"] = pre.gate.weight.data, pre.gate.bias.data
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """A saved adapter holds plain prefixes: the MLP (if any) is folded away first, then they are loaded."""
        self.fold()
        super().load_state(state)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The tensors that train (the MLP's while it exists), for an exact resume."""
        return {n: p.data for n, p in self._named_child_parameters()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.mlp is None or any(k.endswith(".prefix.keys") for k in state):
            return self.load_state(state)
        expected = self.training_state()
        from .base import check_state_keys

        check_state_keys(self.name, expected, state)
        with torch.no_grad():
            for k, v in state.items():
                expected[k].copy_(v.to(expected[k].dtype))


@register("prefix_tuning")
class PrefixTuningMethod(PrefixTuning):
    description = ("Prefix tuning: l key/value vectors per KV head in every attention layer, trained through a "
                   "reparametrization MLP that is folded into plain prefixes when saved.")


@register("prefix_flat")
class PrefixFlat(PrefixTuning):
    description = "Prefix tuning, flat: the per-layer key/value prefixes as plain parameters (no MLP)."
    config_cls = PrefixFlatConfig
    default_lr = 1e-2  # the shipped base's tuned LR is in measure/bench.py TUNED_LRS


# -- prompt tuning ---------------------------------------------------------------------------------------------------


@dataclass
class PromptConfig(MethodConfig):
    num_virtual_tokens: int = 20  # n (Lester et al.: 100; 20 here: the built-in tasks' examples are ~30 tokens)
    init: str = "vocab"  # vocab: embeddings of n vocabulary tokens drawn with `seed` | text: of init_text | random
    init_text: str = ""  # with init=text: its tokens' embeddings, repeated to n
    seed: int = 0

    def validate(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"prompt_tuning: num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in ("vocab", "text", "random"):
            raise ConfigError(f"prompt_tuning: init {self.init!r} must be one of vocab, text, random")
        if self.init == "text" and not self.init_text:
            raise ConfigError("prompt_tuning: init=text needs init_text (the text whose embeddings start the prompt)")


class VirtualTokens(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.active = True


def _prompt_pre_hook(trunk: nn.Module, args, kwargs):
    prompt: VirtualTokens = trunk.prompt
    trunk.__dict__["_prompt_cut"] = 0
    if not prompt.active:
        return None
    names = trunk.__dict__["_prompt_arg_names"]
    kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
    n = prompt.weight.shape[0]
    past = kwargs.get("past_key_values")
    continuing = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    b, device = ref.shape[0], ref.device
    pos = kwargs.get("position_ids")
    mask = kwargs.get("attention_mask")
    if not continuing:
        if pos is not None and mask is None and pos.shape[-1] > 1 and bool((pos[..., 1:] < pos[..., :-1]).any()):
            raise ValueError("prompt_tuning: packed rows (positions restarting within a row) would show the virtual "
                             "tokens to the first example of each row only; train without --packing")
        if embeds is None:
            embeds = trunk.__dict__["_prompt_embed"](ids)
        virtual = prompt.weight.to(embeds.dtype)[None].expand(b, -1, -1)
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([virtual, embeds], dim=1), None
        trunk.__dict__["_prompt_cut"] = n
        if pos is not None:
            first = torch.arange(n, device=device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([first, pos + n], dim=-1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([torch.zeros((b, n), dtype=tt.dtype, device=device), tt], dim=1)
    elif pos is not None:
        kwargs["position_ids"] = pos + n
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"prompt_tuning: the attention mask has {mask.dim()} dimensions; prompt tuning extends "
                             "a 2-D (batch, tokens) mask")
        kwargs["attention_mask"] = torch.cat([torch.ones((b, n), dtype=mask.dtype, device=device), mask], dim=1)
    return (), kwargs


def _prompt_post_hook(trunk: nn.Module, args, kwargs, output):
    n = trunk.__dict__.pop("_prompt_cut", 0)
    if not n:
        return None
    if isinstance(output, tuple):
        return (output[0][:, n:], *output[1:])
    output["last_hidden_state"] = output.last_hidden_state[:, n:]
    return output


@register("prompt_tuning")
class PromptTuning(_SoftPrompt):
    description = ("Prompt tuning: n trainable virtual token embeddings prepended to the input (init from "
                   "vocabulary tokens, a text, or random).")
    child_name = "prompt"
    config_cls = PromptConfig
    default_lr = 3e-2  # Lester et al. train with 0.3 under Adafactor; the shipped base's: TUNED_LRS

    @staticmethod
    def _trunk(model, anat) -> nn.Module:
        """The deepest module on the way to the embedding whose forward takes ``inputs_embeds`` and
        ``attention_mask``: the one that embeds the tokens (OPT's head calls its decoder directly, past OPTModel)."""
        found, mod = None, model
        for part in [""] + anat.name_of(anat.embed).split(".")[:-1]:
            mod = getattr(mod, part) if part else mod
            params = inspect.signature(type(mod).forward).parameters
            if "inputs_embeds" in params and "attention_mask" in params:
                found = mod
        if found is None:
            raise ConfigError(f"prompt_tuning: no module above the embedding of this {anat.model_type} model takes "
                              "inputs_embeds and attention_mask")
        return found

    def check_model(self, anat: Anatomy) -> None:
        if getattr(anat.spec, "seq2seq", False):
            raise ConfigError(f"prompt_tuning: {anat.model_type} is an encoder-decoder model; virtual tokens before "
                              "its encoder's input are not wired in leantune yet: use another method on it")
        if not isinstance(anat.embed, nn.Embedding):
            raise ConfigError(f"prompt_tuning: the embedding of this {anat.model_type} model is a "
                              f"{type(anat.embed).__name__}, not an nn.Embedding")

    def _apply(self, model, anat):
        self._start()
        trunk = self._trunk(model, anat)
        like = anat.embed.weight
        weight = self._init_weight(model, anat).to(trainable_dtype(like))
        params = list(inspect.signature(type(trunk).forward).parameters)[1:]
        trunk.__dict__["_prompt_arg_names"] = params
        trunk.__dict__["_prompt_embed"] = anat.embed
        name = anat.name_of(trunk) if id(trunk) in anat.names and anat.name_of(trunk) else "trunk"
        self.attach(name, trunk, VirtualTokens(weight))
        self.add_handle(name, trunk.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True))
        self.add_handle(name, trunk.register_forward_hook(_prompt_post_hook, with_kwargs=True))

    @torch.no_grad()
    def _init_weight(self, model, anat) -> torch.Tensor:
        cfg, embed = self.config, anat.embed
        n, vocab = cfg.num_virtual_tokens, embed.num_embeddings
        device = embed.weight.device
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "random":  # the embedding table's own scale
            out = embed(torch.arange(min(vocab, 4096), device=device)).float()
            return torch.randn(n, out.shape[-1], generator=g).to(device) * out.std()
        if cfg.init == "text":
            ids = self._text_ids(model, cfg.init_text)
            ids = (ids * math.ceil(n / len(ids)))[:n]
        else:  # Lester et al.: embeddings of vocabulary tokens (ids from 3 up: past the special tokens of small vocabs)
            ids = torch.randint(min(3, vocab - 1), vocab, (n,), generator=g).tolist()
        return embed(torch.tensor(ids, device=device)).float().clone()  # the embedding's output (Gemma 3 scales it)

    def _text_ids(self, model, text: str) -> list[int]:
        from ..models import BUILTIN_PREFIX, load_model, model_name

        name = model_name(model)
        if not name:
            raise ConfigError("prompt_tuning: init=text needs the model's tokenizer, and this model has no name_or_path")
        if name.startswith(BUILTIN_PREFIX):
            tok = load_model(name)[1]
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"prompt_tuning: init_text {text!r} has no tokens")
        return ids

    def unload(self):
        self._model()
        for _name, trunk, _c in list(self.children()):
            for k in ("_prompt_arg_names", "_prompt_embed", "_prompt_cut"):
                trunk.__dict__.pop(k, None)
        return super().unload()
