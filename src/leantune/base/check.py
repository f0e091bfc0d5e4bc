"""Check that a base model is worth fine-tuning: short fine-tunes on the built-in tasks, through leantune's API.

    python -m leantune.base.check --task builtin:world --method lora --steps 150

Prints one JSON line per run: accuracy of the untuned base and of the fine-tune on ``test`` and ``shifted``,
and forgetting (held-out pretraining loss after minus before).
"""

from __future__ import annotations

import argparse
import json
import time


def finetune_check(task_name: str = "builtin:world", method: str = "lora", steps: int = 150, lr: float | None = None,
                   batch_size: int = 16, seed: int = 0, limit: int = 200, base: str = "builtin:base",
                   with_base: bool = True) -> dict:
    from leantune.api import apply
    from leantune.data import encode_examples
    from leantune.data.tasks import forgetting, get_task
    from leantune.models import load_model
    from leantune.train.loop import TrainConfig, train

    task = get_task(task_name, seed=seed)
    model, tokenizer = load_model(base, dtype="float32")  # a folder would load in its fp16 otherwise
    row: dict = {"task": task_name, "method": method, "steps": steps, "batch_size": batch_size, "seed": seed}
    if with_base:
        row["base_accuracy"] = task.accuracy(model, tokenizer, "test", limit)["accuracy"]
        row["base_accuracy_shifted"] = task.accuracy(model, tokenizer, "shifted", limit)["accuracy"]
    before = forgetting(model, tokenizer)
    kwargs = {"r": 16, "alpha": 32} if method == "lora" else {}
    apply(model, method, **kwargs)
    data = encode_examples(tokenizer, task.split("train"), max_length=128, source=task_name)
    t0 = time.perf_counter()
    result = train(model, data, TrainConfig(max_steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                                     warmup_steps=steps // 10, progress=False),
                            pad_id=tokenizer.pad_token_id)
    row.update({
        "lr": lr if lr is not None else model.leantune_method.default_lr,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(result.final_loss, 4),
        "accuracy": task.accuracy(model, tokenizer, "test", limit)["accuracy"],
        "accuracy_shifted": task.accuracy(model, tokenizer, "shifted", limit)["accuracy"],
        "forgetting": round(forgetting(model, tokenizer) - before, 4),
        "chance": round(task.chance, 4),
    })
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin:world")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=200, help="test examples per split")
    parser.add_argument("--base", default="builtin:base")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(finetune_check(args.task, args.method, args.steps, args.lr, args.batch_size, args.seed,
                                    args.limit, args.base)), flush=True)
