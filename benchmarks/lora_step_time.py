"""leantune's LoRA against PEFT's LoRA and full fine-tuning: bytes allocated per step, step time, achieved FLOP/s.

Five models of the bench's efficiency model in one process, timed with the bench's own interleaving (lead-in
step per turn, Williams order): full FT; leantune's LoRA (the layer and the term in one autograd function,
``methods/fused.py``); leantune's LoRA unfused, the layer's forward then the term added in place (the path
dropout and DoRA take); the same with the term in the form PEFT uses (``output + B(A(x)) * scale``); and PEFT's LoRA. r=16,
alpha=32, all linear layers. The bytes the allocator hands out in one step (profiler memory events) are
deterministic; the times are medians of a noisy machine.

    python benchmarks/lora_step_time.py [--rounds 8] [--threads 2]

Targets (issue 4): leantune LoRA / PEFT LoRA step time <= 1.02; leantune LoRA FLOP/s >= 0.9x full FT's.
About 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import leantune
import leantune.methods.fused as fused_module
import leantune.methods.lora as lora_module
from leantune.measure.effmodel import EfficiencyModel
from leantune.measure.flops import FlopCount
from leantune.measure.memory import allocations
from leantune.measure.peft_anchor import apply_peft_lora
from leantune.measure.step import Stepper
from leantune.measure.timing import interleaved_step_times


def peft_form_term(module, x, output):
    """The LoRA term as PEFT writes it: a full-width scaled product, then a full-width sum."""
    lora = module.lora
    return output + F.linear(F.linear(lora.dropout(x), lora.A), lora.B) * lora.scale


VARIANTS = {
    "full": None,
    "leantune LoRA": None,  # fused: methods/fused.py
    "leantune LoRA, layer then term": "inplace",  # the layer's forward, then the term added in place
    "leantune LoRA, PEFT-form term": "peft-form",  # the layer's forward, then output + B(A(x)) * scale
    "peft LoRA": None,
}


def build(spec: EfficiencyModel, name: str):
    model = spec.build()
    torch.manual_seed(0)
    if name == "peft LoRA":
        apply_peft_lora(model, r=16, alpha=32)
    elif name == "full":
        leantune.apply(model, "full")
    else:
        leantune.apply(model, "lora", r=16, alpha=32)
    return model


def variant_stepper(stepper: Stepper, name: str):
    """Each variant's steps run with its own forward: the unfused forms swap in while that model steps."""
    mode = VARIANTS[name]
    if mode is None:
        return stepper
    own_fuse, own_term = fused_module.can_fuse, lora_module._lora_term

    class Swapped:
        def step(self, batch):
            fused_module.can_fuse = lambda *a: False
            if mode == "peft-form":
                lora_module._lora_term = peft_form_term
            try:
                return stepper.step(batch)
            finally:
                fused_module.can_fuse, lora_module._lora_term = own_fuse, own_term

        def __getattr__(self, attr):
            return getattr(stepper, attr)

    return Swapped()


def allocated_bytes(stepper, batch: dict) -> int:
    """Bytes the allocator hands out during one training step (every allocation, freed or not), from the
    profiler's memory events: deterministic, unlike time, and what the fused forward saves."""
    return sum(allocations(lambda: stepper.step(batch)))


def train_flops(stepper: Stepper, batch: dict) -> int:
    stepper.begin()
    with FlopCount() as fc:
        stepper.forward(batch).backward()
    stepper.finish()
    return fc.total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = EfficiencyModel()
    batch = spec.batch()
    names = list(VARIANTS)
    steppers = {n: variant_stepper(Stepper(build(spec, n), batch=batch), n) for n in names}
    flops = {n: train_flops(s, batch) for n, s in steppers.items()}
    allocated = {n: allocated_bytes(s, batch) for n, s in steppers.items()}
    times = interleaved_step_times(steppers, batch, warmup_rounds=1, rounds=args.rounds)
    med = {n: statistics.median(t) for n, t in times.items()}
    fps = {n: flops[n] / med[n] for n in names}
    print(f"efficiency model {spec.name}, batch {spec.batch_size} x {spec.seq_len}, {torch.get_num_threads()} "
          f"threads, {args.rounds} timed rounds")
    print(f"{'':34s} {'GFLOP':>7s} {'alloc MiB':>10s} {'step s':>8s} {'x PEFT':>7s} {'FLOP/s x full':>14s}")
    for n in names:
        print(f"{n:34s} {flops[n] / 1e9:7.1f} {allocated[n] / 2**20:10.1f} {med[n]:8.3f} "
              f"{med[n] / med['peft LoRA']:7.3f} "
              f"{fps[n] / fps['full']:14.3f}")


if __name__ == "__main__":
    main()
