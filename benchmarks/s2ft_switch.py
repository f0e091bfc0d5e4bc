"""S²FT adapter switch vs LoRA merge/unmerge, and bytes saved for backward (S²FT vs LoRA at equal parameters).

    python benchmarks/s2ft_switch.py [--runs 7] [--threads 1] [--json out.json]

Switch: serving adapter B after adapter A on one merged base. S²FT restores A's k saved columns and
``index_add_``s B's (O(out*k) work); LoRA subtracts B_A·A_A and adds B_B·A_B (two full out*in matrices).
Both are timed on a 4096x4096 layer, nn.Linear and GPT-2's Conv1D (S²FT k = 32 scattered columns = the
parameters of LoRA r=16), and on two whole built-in models: the tiny LLaMA (at LoRA r=4) and the bench's base
``builtin:base`` (at the bench's LoRA, r=16 on all linear layers); figures are medians of ``--runs`` runs after
a warm-up, compared as ratios within this run.

Saved for backward: one training forward of a small LLaMA-style model (4 layers, hidden 256, GQA) under
``torch.autograd.graph.saved_tensors_hooks``; each storage is counted once and parameters are not counted.
S²FT uses its default budget (the parameter count of LoRA r=16 on all linear layers), LoRA is r=16 all-linear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import leantune
from leantune.anatomy import weight_2d
from leantune.methods.s2ft import S2FTSlice


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def wide_layer(runs: int, width: int = 4096, r: int = 16, conv1d: bool = False) -> dict:
    """One width x width layer (nn.Linear, or GPT-2's Conv1D that stores (in, out))."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(width, width) if conv1d else torch.nn.Linear(width, width, bias=False)
    torch.nn.init.normal_(layer.weight, std=0.02)
    w2d = weight_2d(layer)
    k = r * (width + width) // width  # S²FT columns with LoRA r's parameter count
    adapters = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        s = S2FTSlice("in", k, torch.arange(width).unsqueeze(1), w2d)  # one column per unit
        s.set_indices(torch.sort(torch.randperm(width, generator=g)[:k]).values)
        s.delta.normal_(generator=g)
        adapters.append(s)
    loras = [(torch.randn(width, r) * 0.01, torch.randn(r, width) * 0.01) for _ in range(2)]
    state = {"s2ft": 0, "lora": 0}

    def s2ft_switch():
        cur = adapters[state["s2ft"]]
        if cur.merged:
            cur.restore(layer)
        state["s2ft"] ^= 1
        adapters[state["s2ft"]].merge_into(layer)

    def lora_switch():  # in the (out, in) orientation, as leantune's LoRA merges
        b, a = loras[state["lora"]]
        w2d.sub_(b @ a)
        state["lora"] ^= 1
        b, a = loras[state["lora"]]
        w2d.add_(b @ a)

    t_s2ft = median_time(s2ft_switch, runs)
    adapters[state["s2ft"]].restore(layer)
    w2d.add_(loras[0][0] @ loras[0][1])
    t_lora = median_time(lora_switch, runs)
    return {"layer": "Conv1D" if conv1d else "Linear", "width": width, "lora_r": r, "s2ft_k": k,
            "s2ft_switch_s": t_s2ft, "lora_switch_s": t_lora, "lora_over_s2ft": t_lora / t_s2ft}


def whole_model(runs: int, name: str, r: int) -> dict:
    """Whole-model switch on a built-in model, S²FT at the parameter count of LoRA r on all linear layers."""
    model, _ = leantune.load_model(name, dtype="float32")
    s2 = leantune.apply(model, "s2ft", lora_r=r)
    states = []
    for seed in (1, 2):
        donor, _ = leantune.load_model(name, dtype="float32")
        m = leantune.apply(donor, "s2ft", lora_r=r, seed=seed)
        with torch.no_grad():
            for _, p in m.trainable_parameters():
                p.normal_(generator=torch.Generator().manual_seed(seed))
        states.append({k: v.clone() for k, v in m.state().items()})
    s2.load_state(states[0])
    s2.merge()
    flip = {"i": 0}

    def s2ft_switch():
        flip["i"] ^= 1
        s2.load_state(states[flip["i"]])  # merged: restore k columns, index_add_ the next adapter's

    lmodel, _ = leantune.load_model(name, dtype="float32")
    lora = leantune.apply(lmodel, "lora", r=r)
    lstates = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        lstates.append({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in lora.state().items()})
    lora.load_state(lstates[0])
    lora.merge()

    def lora_switch():
        flip["i"] ^= 1
        lora.unmerge()
        lora.load_state(lstates[flip["i"]])
        lora.merge()

    t_s2ft, t_lora = median_time(s2ft_switch, runs), median_time(lora_switch, runs)
    return {"model": name, "lora_r": r, "s2ft_params": s2.num_trainable(),
            "lora_params": lora.num_trainable(), "s2ft_switch_s": t_s2ft, "lora_switch_s": t_lora,
            "lora_over_s2ft": t_lora / t_s2ft}


def saved_bytes(model, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(seen.values())


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def activations(batch_size: int = 4, seq: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (batch_size, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = {}
    for name, opts in (("s2ft", {}), ("lora", {"r": 16}), ("full", {})):
        model = small_llama()
        method = leantune.apply(model, name, **opts)
        model.train()
        out[name] = {"trainable_params": method.num_trainable(), "saved_bytes": saved_bytes(model, batch)}
    out["s2ft_over_lora"] = out["s2ft"]["saved_bytes"] / out["lora"]["saved_bytes"]
    out["s2ft_over_full"] = out["s2ft"]["saved_bytes"] / out["full"]["saved_bytes"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # one thread: steady medians on a shared machine
    res = {"wide_layers": [wide_layer(args.runs), wide_layer(args.runs, conv1d=True)],
           "whole_models": [whole_model(args.runs, "builtin:tiny-llama", 4),
                            whole_model(args.runs, "builtin:base", 16)],  # the bench's base at the bench's LoRA
           "saved": activations()}
    s = res["saved"]
    for w in res["wide_layers"]:
        print(f"switch, {w['width']}x{w['width']} {w['layer']} (S²FT k={w['s2ft_k']} vs LoRA r={w['lora_r']}): "
              f"S²FT {w['s2ft_switch_s'] * 1e3:.3f} ms, LoRA {w['lora_switch_s'] * 1e3:.3f} ms -> LoRA/S²FT "
              f"{w['lora_over_s2ft']:.1f}x")
    for t in res["whole_models"]:
        print(f"switch, {t['model']} ({t['s2ft_params']} vs {t['lora_params']} params, LoRA r={t['lora_r']}): "
              f"S²FT {t['s2ft_switch_s'] * 1e3:.3f} ms, LoRA {t['lora_switch_s'] * 1e3:.3f} ms -> LoRA/S²FT "
              f"{t['lora_over_s2ft']:.1f}x")
    print("saved for backward, small LLaMA (4x256, seq 128, batch 4):")
    for name in ("s2ft", "lora", "full"):
        print(f"  {name:5s} {s[name]['trainable_params']:>9d} trainable  {s[name]['saved_bytes'] / 2**20:8.2f} MiB")
    print(f"  S²FT/LoRA {s['s2ft_over_lora']:.3f}   S²FT/full {s['s2ft_over_full']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
