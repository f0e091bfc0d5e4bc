"""LISA on a 4-bit base: what a block's trained, dequantized layers should become when the block leaves the active
set — kept in full precision (``on_leave=keep``) or quantized again (``on_leave=requantize``).

    python benchmarks/lisa_quantized.py [--model builtin:base] [--steps 60] [--period 10] [--lr 5e-5] [--json F]

Both runs share the seed, data and draws. Reported per mode: the model's weight bytes at the end (quantized
weights at their real size, leantune.quant.tensor_bytes), the held-out loss, and for ``requantize`` the drift: the
share of each leaving layer's trained update ``W1 - W0`` (``W0`` the dequantized weight it started from) that
re-quantization loses, ``||deq(Q(W1)) - W1|| / ||W1 - W0||`` (median and max over the leaves), and the share of
entries whose 4-bit code did not move at all.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def run(model_name: str, task: str, on_leave: str, steps: int, period: int, lr: float, seed: int) -> dict:
    import leantune
    from leantune.anatomy import dequantized_weight
    from leantune.data.encode import encode_examples
    from leantune.data.evaluate import eval_loss
    from leantune.data.tasks import get_task
    from leantune.methods import lisa as lisa_module
    from leantune.quant import tensor_bytes
    from leantune.train.loop import TrainConfig, seed_everything, train

    seed_everything(seed)
    model, tok = leantune.load_model(model_name, quantize="nf4")
    start: dict[int, torch.Tensor] = {}
    drift: list[float] = []
    unmoved: list[float] = []
    dequantize, requantize = lisa_module.dequantize_layer_, lisa_module.requantize_layer_

    def dequantize_recorded(mod, dtype=None):
        p = dequantize(mod, dtype)
        start[id(mod)] = p.detach().clone()
        return p

    def requantize_recorded(mod):
        w1 = mod.weight.detach().clone()
        w0 = start.pop(id(mod))
        requantize(mod)
        w1q = dequantized_weight(mod).to(w1.dtype)
        update = (w1 - w0).norm()
        if update > 0:
            drift.append(float((w1q - w1).norm() / update))
            unmoved.append(float((w1q == w0).float().mean()))

    lisa_module.dequantize_layer_, lisa_module.requantize_layer_ = dequantize_recorded, requantize_recorded
    try:
        leantune.apply(model, "lisa", gamma=1, period=period, seed=seed, on_leave=on_leave)
        t = get_task(task, seed=0)
        data = encode_examples(tok, t.split("train"), 256, task)
        train(model, data, TrainConfig(max_steps=steps, lr=lr, batch_size=8, progress=False, seed=seed))
    finally:
        lisa_module.dequantize_layer_, lisa_module.requantize_layer_ = dequantize, requantize
    held_out = t.split("test")[:64]
    out = {"on_leave": on_leave, "weight_bytes": tensor_bytes(model)["total"],
           "eval_loss": round(eval_loss(model, tok, held_out, 256)["loss"], 4)}
    if drift:
        out.update(leaves=len(drift), update_lost_median=round(statistics.median(drift), 4),
                   update_lost_max=round(max(drift), 4), codes_unmoved_median=round(statistics.median(unmoved), 4))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:base")
    ap.add_argument("--task", default="builtin:world")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--period", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import leantune
    from leantune.quant import tensor_bytes

    full = tensor_bytes(leantune.load_model(args.model)[0])["total"]
    nf4 = tensor_bytes(leantune.load_model(args.model, quantize="nf4")[0])["total"]
    rows = [run(args.model, args.task, mode, args.steps, args.period, args.lr, args.seed)
            for mode in ("keep", "requantize")]
    print(f"{args.model}: weights {full} B unquantized, {nf4} B nf4 before training; {args.steps} steps, "
          f"gamma=1, period={args.period}, lr={args.lr}")
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "fp32_bytes": full, "nf4_bytes": nf4, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
