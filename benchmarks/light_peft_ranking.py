"""Does the ranking decide what Light-PEFT's cut costs? One cut, several ways to choose what goes, on builtin:base.

Light-PEFT ranks heads and FFN channels by their learned mask and adapter modules by ``‖ΔW·x‖ / ‖W·x‖``. This
benchmark keeps the amount cut fixed and swaps only the scores the prune plan reads, so the accuracy differences
are the ranking's alone:

- ``--part foundation`` (default: 40 % of heads and FFN channels, every LoRA module and rank kept):
  ``mask`` (the method's own), ``reversed`` (the mask ranking upside down: 2 − m), ``random`` (seeded),
  ``taylor`` (the method's ``foundation_score="taylor"``: mean |m·∂L/∂m| over the estimation phase, the
  head-importance score of Michel et al. 2019), ``activation`` (Σ over estimation of mean |input column| ×
  ‖weight column‖ of ``o`` / ``down``, a Wanda-style score installed by this script).
- ``--part modules`` (no foundation cut, 25 % of the LoRA modules kept, every rank kept): ``importance`` (the
  method's own), ``reversed``, ``random``, ``taylor`` (the method's ``module_score="taylor"``: the sum of the
  module's rank-level Taylor scores).
- ``--part defaults`` (every default amount): ``mask`` (the paper's scores) against ``taylor`` (both options).

Each cell is the bench's quality job (300 steps × 16 on ``builtin:world`` at lr 3e-3, test and shifted accuracy,
held-out pretraining loss). About 40 s per cell on one core.

    python benchmarks/light_peft_ranking.py --seeds 3 --jobs 2
    python benchmarks/light_peft_ranking.py --part modules --seeds 3 --jobs 2 --json modules.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

PARTS = {
    "foundation": ({"module_keep": 1, "rank_keep": 1}, ["mask", "reversed", "random", "taylor", "activation"]),
    "modules": ({"head_ratio": 0, "ffn_ratio": 0, "rank_keep": 1}, ["importance", "reversed", "random", "taylor"]),
    "defaults": ({}, ["mask", "taylor"]),
}


def _install(criterion: str, seed: int) -> None:
    """Replace the scores Light-PEFT's plan reads (in this worker process only)."""
    import torch

    from leantune.prune import importance as imp
    from leantune.prune import masks as M

    if criterion in ("mask", "importance"):
        return
    if criterion == "reversed":
        M.FoundationMasks.head_scores = lambda self: [2 - m.mask.detach().float().cpu() for m in self.head_masks]
        M.FoundationMasks.ffn_scores = lambda self: [2 - m.mask.detach().float().cpu() for m in self.ffn_masks]
        own = imp.AdapterImportance.module_scores
        imp.AdapterImportance.module_scores = lambda self: {k: -v for k, v in own(self).items()}
        return
    if criterion == "random":
        g = torch.Generator().manual_seed(1000 + seed)
        M.FoundationMasks.head_scores = lambda self: [torch.rand(m.mask.numel(), generator=g) for m in self.head_masks]
        M.FoundationMasks.ffn_scores = lambda self: [torch.rand(m.mask.numel(), generator=g) for m in self.ffn_masks]
        rnd = random.Random(1000 + seed)
        own = imp.AdapterImportance.module_scores
        imp.AdapterImportance.module_scores = lambda self: {k: rnd.random() for k in own(self)}
        return
    if criterion == "taylor":
        return  # the method's own options: foundation_score="taylor", module_score="taylor"
    # activation: accumulate a score beside every mask during estimation
    attach = M.FoundationMasks._attach

    def _attach(self, layer, block):
        mask = attach(self, layer, block)
        mask.score = torch.zeros(mask.mask.numel())
        weight = layer.weight

        def pre_hook(module, args, mask=mask, block=block):
            x = args[0].detach().float()
            if getattr(module, M.MASK_ATTR, None) is not mask or x.shape[-1] != weight.shape[1]:
                return  # pruned: the masks are gone
            col = x.abs().flatten(0, -2).mean(0) * weight.detach().float().norm(dim=0)
            mask.score.add_((col.view(-1, block).sum(1) if block > 1 else col).cpu())
        layer.register_forward_pre_hook(pre_hook)
        return mask

    M.FoundationMasks._attach = _attach
    M.FoundationMasks.head_scores = lambda self: [m.score.clone() for m in self.head_masks]
    M.FoundationMasks.ffn_scores = lambda self: [m.score.clone() for m in self.ffn_masks]


def cell(job: dict) -> dict:
    from quality_suite import fine_tune  # beside this script

    _install(job["criterion"], job["seed"])
    options = dict(job["options"])
    if job["criterion"] == "taylor":
        options.update(foundation_score="taylor", module_score="taylor")
    res = fine_tune("light_peft", options, job["lr"], job["seed"], job["steps"], job["task"], job["eval_samples"],
                    job["threads"])
    return {"criterion": job["criterion"], "seed": job["seed"], "accuracy": res["accuracy"],
            "accuracy_shifted": res["accuracy_shifted"], "heldout_loss": res["heldout_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS), default="foundation")
    ap.add_argument("--criteria", help="comma list (default: every criterion of the part)")
    ap.add_argument("--task", default="builtin:world")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()

    options, criteria = PARTS[args.part]
    if args.criteria:
        unknown = sorted(set(args.criteria.split(",")) - set(criteria))
        if unknown:
            ap.error(f"--criteria {','.join(unknown)}: the {args.part} part knows {', '.join(criteria)}")
        criteria = args.criteria.split(",")
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    jobs = [{"criterion": c, "seed": s, "options": options, "lr": args.lr, "steps": args.steps, "task": args.task,
             "eval_samples": args.eval_samples, "threads": threads} for c in criteria for s in range(args.seeds)]
    cells = []
    # one process per cell: a criterion patches the scores in its process, and a reused worker would stack patches
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for res in pool.map(cell, jobs):
            cells.append(res)
            print(f"  {res['criterion']:12s} seed {res['seed']}  accuracy {res['accuracy']:.3f}  shifted "
                  f"{res['accuracy_shifted']:.3f}  held-out loss {res['heldout_loss']:.3f}", flush=True)

    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    print(f"\n{args.part} cut {options} on {args.task}, lr {args.lr}, {args.steps} steps x 16, seeds 0-{args.seeds - 1}\n")
    print("| ranking | accuracy | shifted | held-out pretraining loss |\n|---|---|---|---|")
    for c in criteria:
        mine = [x for x in cells if x["criterion"] == c]
        print(f"| {c} | {ms([x['accuracy'] for x in mine])} | {ms([x['accuracy_shifted'] for x in mine])} | "
              f"{ms([x['heldout_loss'] for x in mine])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"part": args.part, "options": options, "task": args.task, "lr": args.lr, "cells": cells}, f,
                      indent=1)


if __name__ == "__main__":
    main()
