"""What Light-PEFT's head pruning saves on OLMo 2, whose q/k norms span every head, next to a LLaMA of the same shape.

    python benchmarks/olmo2_head_pruning.py [--json out.json]

OLMo 2 normalizes queries and keys over the whole projection, so leantune keeps q_proj / k_proj and their norms
whole and passes on only the kept heads' features (the pruned model equals the masked one); v_proj and o_proj are
sliced, the KV cache and the attention itself hold the kept heads only. LLaMA (per-head or no q/k norms) slices all
four projections. Both models: hidden 512, 8 heads (MHA) of 64, 4 layers, FFN 1376, random init; the same plan keeps
5 of 8 heads in every layer (head_ratio=0.4), no FFN pruning. Counted, not timed: attention projection parameters,
forward FLOPs per token (``FlopCounterMode``, a 128-token sequence) and the KV cache's bytes for it.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

import leantune
from leantune.prune import PrunePlan

SHAPE = dict(vocab_size=259, hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
             num_hidden_layers=4, intermediate_size=1376, pad_token_id=0, bos_token_id=1, eos_token_id=2)
KEEP = [0, 2, 3, 5, 7]
SEQ = 128


def build(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    cfg, cls = (Olmo2Config, Olmo2ForCausalLM) if kind == "olmo2" else (LlamaConfig, LlamaForCausalLM)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(cfg(**SHAPE)).eval()


def measure(model) -> dict:
    attn = sum(p.numel() for n, p in model.named_parameters()
               if "self_attn" in n and n.endswith("proj.weight") and "lora" not in n)
    ids = torch.randint(3, 259, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"attention_params": attn, "flops_per_token": fc.get_total_flops() / SEQ, "kv_cache_bytes": kv}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for kind in ("olmo2", "llama"):
        model = build(kind)
        before = measure(model)
        m = leantune.apply(model, "light_peft", ffn_ratio=0.0)
        a = m.anatomy
        m.apply_plan(PrunePlan(len(a.blocks), a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate,
                               heads=[KEEP] * len(a.blocks), kv_heads=[KEEP] * len(a.blocks)))
        after = measure(model)
        rows[kind] = {k: after[k] / before[k] for k in before}
        print(f"{kind:6s} kept 5/8 heads: attention projection params x{rows[kind]['attention_params']:.3f}, "
              f"forward FLOPs/token x{rows[kind]['flops_per_token']:.3f}, KV cache x{rows[kind]['kv_cache_bytes']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
