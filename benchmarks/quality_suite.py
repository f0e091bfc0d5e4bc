"""Quality of several methods on every task of the built-in suite, over seeds: the per-task tables in
docs/s2ft.md and docs/light_peft.md.

Each cell is one fine-tune on ``builtin:base`` through the bench's own quality job (leantune's loop, then the one
evaluator on the test and shifted splits, and forgetting on held-out pretraining text). A run is a method with
optional config options and learning rate; without ``lr=`` it trains at the bench's learning rate for the
shipped base (``measure/bench.py: TUNED_LRS``), else at the method's default.

    python benchmarks/quality_suite.py                                   # lora, s2ft, light_peft; 3 tasks; 3 seeds
    python benchmarks/quality_suite.py --run "s2ft lr=3e-3" --run "lora targets=o,down lr=3e-3" \\
        --tasks world --seeds 3 --jobs 2 --json s2ft_layers.json

About a minute per cell on one core; ``--jobs 2`` runs two cells at a time (one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

DEFAULT_RUNS = ["lora", "s2ft", "light_peft"]
TASKS = ["world", "listops", "arith"]


def parse_run(text: str) -> dict:
    """``"s2ft lr=3e-3 targets=o,down"`` -> {"label", "method", "lr", "options"}."""
    parts = text.split()
    if not parts:
        raise ValueError("an empty --run")
    method, options, lr = parts[0], {}, None
    for item in parts[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--run {text!r}: {item!r} is not key=value")
        if key == "lr":
            lr = float(value)
        else:
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
    return {"label": text.strip(), "method": method, "lr": lr, "options": options}


def bench_lr(method: str, base: str) -> float:
    from leantune.measure.bench import TUNED_LRS
    from leantune.methods import get_method

    return TUNED_LRS.get(base, {}).get(method) or get_method(method).default_lr


def fine_tune(method: str, options: dict, lr: float, seed: int, steps: int, task: str, eval_samples: int,
              threads: int, base: str = "builtin:base") -> dict:
    """One fine-tune through the bench's quality job (leantune's loop, then the one evaluator); its result dict.
    Also used by the other quality benchmarks (light_peft_ranking.py)."""
    import contextlib
    import io

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    from leantune.measure.run import job_quality

    spec = {"run": {"method": method, "impl": "leantune", "options": options}, "seed": seed, "lr": lr,
            "budget": {"max_steps": steps, "batch_size": 16, "max_length": 128}, "base": base, "task": task,
            "train_dir": tempfile.mkdtemp(prefix="leantune-suite-"), "eval_samples": eval_samples}
    with contextlib.redirect_stdout(io.StringIO()):  # the job's progress events are for the bench's own display
        return job_quality(spec)


def cell(job: dict) -> dict:
    t0 = time.perf_counter()
    res = fine_tune(job["method"], job["options"], job["lr"], job["seed"], job["steps"], job["task"],
                    job["eval_samples"], job["threads"], job["base"])
    return {**{k: job[k] for k in ("label", "task", "seed", "lr")}, "accuracy": res["accuracy"],
            "accuracy_shifted": res["accuracy_shifted"], "forgetting": res["heldout_loss"] - job["base_loss"],
            "final_loss": res["final_loss"], "seconds": round(time.perf_counter() - t0, 1)}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", help='"METHOD [lr=X] [key=value ...]"; repeat (default: '
                    + ", ".join(DEFAULT_RUNS) + ")")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of built-in tasks")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--base", default="builtin:base")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", help="also write every cell to this file")
    args = ap.parse_args()

    from leantune.measure.run import job_base

    runs = [parse_run(r) for r in (args.run or DEFAULT_RUNS)]
    tasks = [t if t.startswith("builtin:") else f"builtin:{t}" for t in args.tasks.split(",") if t]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    base_loss = job_base({"base": args.base, "task": tasks[0], "eval_samples": 1})["heldout_loss"]
    jobs = [{**r, "lr": r["lr"] if r["lr"] is not None else bench_lr(r["method"], args.base), "task": task,
             "seed": seed, "steps": args.steps, "base": args.base, "eval_samples": args.eval_samples,
             "threads": threads, "base_loss": base_loss}
            for task in tasks for r in runs for seed in range(args.seeds)]
    cells = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for res in pool.map(cell, jobs):
            cells.append(res)
            print(f"  {res['task']:16s} {res['label']:36s} seed {res['seed']}  accuracy {res['accuracy']:.3f}  "
                  f"shifted {res['accuracy_shifted']:.3f}  ({res['seconds']:.0f} s)", flush=True)

    print(f"\n{args.steps} steps x 16 on {args.base}, seeds 0-{args.seeds - 1}, {args.eval_samples} questions per "
          "split; accuracy (shifted) mean ± std; forgetting = held-out pretraining loss after minus before\n")
    print("| run | lr | " + " | ".join(t.removeprefix("builtin:") for t in tasks) + " | mean over tasks |")
    print("|---|---|" + "---|" * (len(tasks) + 1))
    for r in runs:
        mine = [c for c in cells if c["label"] == r["label"]]
        row, means = [], []
        for t in tasks:
            cs = [c for c in mine if c["task"] == t]
            acc = [c["accuracy"] for c in cs]
            means.append(statistics.mean(acc))
            row.append(f"{mean_std(acc)} ({statistics.mean(c['accuracy_shifted'] for c in cs):.3f}), "
                       f"{statistics.mean(c['forgetting'] for c in cs):+.2f}")
        print(f"| {r['label']} | {mine[0]['lr']:g} | " + " | ".join(row) + f" | {statistics.mean(means):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "base": args.base, "cells": cells}, f, indent=1)


if __name__ == "__main__":
    main()
