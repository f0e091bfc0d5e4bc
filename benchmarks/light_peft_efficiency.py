"""Light-PEFT's efficiency against plain LoRA and the base model, as ratios measured inside one run.

    python benchmarks/light_peft_efficiency.py [--json light_peft_efficiency.json] [--threads 1] [--estimate]

On the bench's efficiency model (leantune.measure.effmodel: LLaMA-style, hidden 512, 8 layers, 8 query heads on
2 KV heads, random init), with Light-PEFT's defaults (40 % of heads and of FFN channels removed, 25 % of the
LoRA modules kept with half their ranks; LoRA r=8 on all linear layers for both):

* training step time after pruning vs plain LoRA (median over interleaved rounds after warm-up);
* FLOPs of a training step per token (``FlopCounterMode``), and bytes a step holds: weights, gradients, AdamW
  state and the tensors autograd saves for backward (counted, not sampled);
* merged inference: latency per generated token at batch 8 (KV cache, greedy) of the merged pruned model loaded
  back with ``leantune.prune.load_merged`` vs the base model, and forward FLOPs per token.

Issue 7's targets are printed beside the figures: step time <= 0.65x LoRA, latency <= 0.7x base, FLOPs per token
<= 0.65x base, memory below LoRA's. Speed does not depend on which heads go, only on how many, so by default
the masks and importance scores are drawn at random (seeded) and the model is pruned at once; ``--estimate``
runs the real 20-step estimation phase first (slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import torch

import leantune
from leantune.measure.effmodel import EfficiencyModel
from leantune.measure.flops import FlopCount
from leantune.measure.memory import SavedTensorMeter, grad_bytes, optimizer_bytes, weight_bytes
from leantune.measure.step import Stepper
from leantune.measure.timing import interleaved_latency, interleaved_step_times, median
from leantune.prune import load_merged, save_merged

TARGETS = {"step_time": 0.65, "latency": 0.7, "flops_per_token": 0.65}
LORA = {"r": 8, "alpha": 16.0, "targets": "all-linear"}  # what light_peft wraps by default


def pruned_model(em: EfficiencyModel, estimate: bool, batch: dict):
    model = em.build()
    method = leantune.apply(model, "light_peft", **LORA)
    if estimate:
        stepper = Stepper(model)
        while not method.pruned:
            stepper.step(batch)
        return model, method
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.masks.parameters():
            p.copy_(torch.rand(p.shape, generator=g))
        method.importance.module_sum.copy_(torch.rand(method.importance.module_sum.shape, generator=g, dtype=torch.float64))
        for t in method.importance.rank_sum.values():
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64))
        method.importance.steps.fill_(1)
    method.prune()
    return model, method


def step_costs(stepper: Stepper, batch: dict) -> dict:
    """FLOPs per token and the bytes of one training step (after a first step, so AdamW state exists)."""
    stepper.step(batch)
    tokens = int(batch["attention_mask"].sum())
    with FlopCount() as fc:
        stepper.begin()
        with SavedTensorMeter(stepper.model) as meter:
            loss = stepper.forward(batch)
            saved = meter.saved_bytes()
        loss.backward()
    grads = grad_bytes(stepper.model)
    stepper.finish()
    return {
        "flops_per_token": fc.total / tokens,
        "weights_bytes": weight_bytes(stepper.model),
        "grad_bytes": grads,
        "optimizer_bytes": optimizer_bytes(stepper.optimizer),
        "saved_activation_bytes": saved,
        "trainable_params": stepper.method.num_trainable(),
    }


@torch.no_grad()
def forward_flops_per_token(model, ids: torch.Tensor) -> float:
    model.eval()
    with FlopCount() as fc:
        model(input_ids=ids)
    return fc.total / ids.numel()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadiest on a shared CPU; 0: torch's default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed training rounds (after --warmup)")
    ap.add_argument("--latency-rounds", type=int, default=11, help="timed generation rounds (cheap; noisier)")
    ap.add_argument("--seq-len", type=int, default=128, help="training sequence length (batch 4)")
    ap.add_argument("--latency-batch", type=int, default=8)
    ap.add_argument("--estimate", action="store_true", help="run the real estimation phase before pruning")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    em = dataclasses.replace(EfficiencyModel(), seq_len=a.seq_len)
    batch = em.batch()

    lora_model = em.build()
    leantune.apply(lora_model, "lora", **LORA)
    lp_model, lp = pruned_model(em, a.estimate, batch)
    counts = lp.plan.counts
    print(f"model {em.name}: pruned to {counts['heads_kept']}/{counts['heads_total']} heads, "
          f"{counts['ffn_kept']}/{counts['ffn_total']} FFN channels, {counts['modules_kept']}/{counts['modules_total']} "
          f"LoRA modules with {counts['ranks_kept']} ranks")

    print("timing training steps ...", flush=True)
    steppers = {"lora": Stepper(lora_model), "light_peft": Stepper(lp_model)}
    costs = {name: step_costs(s, batch) for name, s in steppers.items()}
    times = interleaved_step_times(steppers, batch, a.warmup, a.rounds)
    step = {name: median(ts) for name, ts in times.items()}

    print("timing merged inference ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        export = save_merged(lp_model, tmp)
        merged = load_merged(tmp)
    base = em.build().eval()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, em.vocab, (a.latency_batch, em.prompt_tokens), generator=g)
    ids = torch.randint(3, em.vocab, (a.latency_batch, 64), generator=g)
    flops = {"base": forward_flops_per_token(base, ids), "merged": forward_flops_per_token(merged, ids)}
    lat = interleaved_latency({"base": base, "merged": merged}, prompt, em.new_tokens, a.warmup,
                              a.latency_rounds)
    latency = {name: median(ts) for name, ts in lat.items()}

    def total_bytes(c):
        return c["weights_bytes"] + c["grad_bytes"] + c["optimizer_bytes"] + c["saved_activation_bytes"]

    ratios = {
        "step_time": step["light_peft"] / step["lora"],
        "train_flops_per_token": costs["light_peft"]["flops_per_token"] / costs["lora"]["flops_per_token"],
        "train_bytes": total_bytes(costs["light_peft"]) / total_bytes(costs["lora"]),
        "trainable_params": costs["light_peft"]["trainable_params"] / costs["lora"]["trainable_params"],
        "latency": latency["merged"] / latency["base"],
        "flops_per_token": flops["merged"] / flops["base"],
        "inference_weights": weight_bytes(merged) / weight_bytes(base),
    }
    result = {
        "model": em.describe(), "plan_counts": counts, "merged_export": {"kind": export.kind, "reason": export.reason},
        "step_time_s": step, "step_times_s": times, "train_costs": costs, "latency_s_per_token": latency, "latency_rounds_s": lat,
        "latency_batch": a.latency_batch, "inference_flops_per_token": flops, "ratios": ratios,
        "targets": TARGETS, "threads": torch.get_num_threads(), "estimated": a.estimate,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    rows = [
        ("training step time (median)", f"{step['lora'] * 1e3:.0f} ms", f"{step['light_peft'] * 1e3:.0f} ms", "step_time"),
        ("training FLOPs / token", f"{costs['lora']['flops_per_token'] / 1e6:.1f} M",
         f"{costs['light_peft']['flops_per_token'] / 1e6:.1f} M", "train_flops_per_token"),
        ("training bytes (w+g+opt+saved)", f"{total_bytes(costs['lora']) / 2**20:.1f} MiB",
         f"{total_bytes(costs['light_peft']) / 2**20:.1f} MiB", "train_bytes"),
        ("trainable parameters", f"{costs['lora']['trainable_params']}", f"{costs['light_peft']['trainable_params']}",
         "trainable_params"),
        (f"latency / token, batch {a.latency_batch} (base vs merged)", f"{latency['base'] * 1e3:.2f} ms",
         f"{latency['merged'] * 1e3:.2f} ms", "latency"),
        ("inference FLOPs / token (base vs merged)", f"{flops['base'] / 1e6:.1f} M", f"{flops['merged'] / 1e6:.1f} M",
         "flops_per_token"),
        ("inference weights", f"{weight_bytes(base) / 2**20:.1f} MiB", f"{weight_bytes(merged) / 2**20:.1f} MiB",
         "inference_weights"),
    ]
    print(f"{'':44s} {'reference':>12s} {'light_peft':>12s} {'ratio':>7s}  target")
    for label, ref, mine, key in rows:
        target = TARGETS.get(key, 1.0 if key == "train_bytes" else None)
        verdict = "" if target is None else (f"<= {target}  " + ("ok" if ratios[key] <= target else "MISSED"))
        print(f"{label:44s} {ref:>12s} {mine:>12s} {ratios[key]:7.3f}  {verdict}")
    print(f"merged folder: {export.kind} ({export.reason})")
    print(f"{result['seconds']} s, {result['threads']} threads")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
