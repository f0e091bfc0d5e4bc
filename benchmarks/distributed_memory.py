"""Bytes each process holds under DDP and FSDP2 (weights, gradients, AdamW state), on the bench's efficiency model.

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed_memory.py [--methods lora,lisa,full] [--json F]

Each method takes one training step the loop's way (train/parallel.py wraps the model, the step's gradients are
averaged, AdamW steps); then each rank counts the bytes of its own tensors — local shards under FSDP — with the
bench's meter (leantune.measure.memory). Rank 0 prints a table with both strategies side by side.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def measure(method_name: str, strategy: str, options: dict) -> dict:
    from accelerate import Accelerator

    import leantune
    from leantune.measure.effmodel import EfficiencyModel
    from leantune.train import TrainConfig, parallel
    from leantune.train.loop import build_adamw, token_loss_sum

    spec = EfficiencyModel()
    model = spec.build()
    method = leantune.apply(model, method_name, **options)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    par = parallel.make(strategy, acc)
    wrapped = par.wrap(model, method)
    sched = method.schedule()
    cfg = TrainConfig(max_steps=10, lr=1e-4, progress=False)
    from leantune.hooks import TrainContext

    ctx = TrainContext(model=model, method=method, config=cfg)
    ctx._rebuild = lambda: build_adamw(method, 1e-4, cfg, ctx.optimizer)
    if sched is not None:
        sched.on_train_begin(ctx)
    opt = ctx.optimizer or build_adamw(method, 1e-4, cfg)
    g = torch.Generator().manual_seed(par.rank)
    ids = torch.randint(3, spec.vocab, (spec.batch_size, spec.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_sum, n = token_loss_sum(wrapped, batch, True)
    (loss_sum * par.world / par.sum(n)).backward()
    par.sync_grads([p for _, p in method.trainable_parameters() if p.requires_grad])
    opt.step()

    def nbytes(tensors):
        seen, total = set(), 0
        for t in tensors:  # tied tensors once: keyed by the storage, not by a (temporary) shard view's id
            t = local(t)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    return {
        "weights": nbytes(p for p in model.parameters()),
        "grads": nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="lora,lisa,full")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    options = {"lisa": {"gamma": 2}}
    rows = {}
    for m in args.methods.split(","):
        for strategy in ("ddp", "fsdp"):
            rows[f"{m}/{strategy}"] = measure(m, strategy, options.get(m, {}))
    if dist.get_rank() == 0:
        mib = 1 << 20
        print(f"world size {dist.get_world_size()}, bytes held by rank 0 after one step (MiB)")
        print("| method | strategy | weights | gradients | AdamW state | sum |")
        print("|---|---|---|---|---|---|")
        for key, r in rows.items():
            m, s = key.split("/")
            print(f"| {m} | {s} | {r['weights'] / mib:.1f} | {r['grads'] / mib:.1f} | {r['optimizer'] / mib:.1f} | "
                  f"{sum(r.values()) / mib:.1f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
