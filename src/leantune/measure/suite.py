"""``leantune bench --suite survey``: the survey's head-to-head set (Lialin et al. 2023, ../METHODS.md) plus the
methods leantune adds, in one bench run.

The survey compares 15 configurations plus full fine-tuning; the suite adds BitFit, S²FT, LISA and Light-PEFT:
20 rows, each a labelled run of the bench (``label`` in results.json, unique within a run) at the bench's tuned
learning rate for the base where it has one (``TUNED_LRS``; the LoRA variants share LoRA's), else the method's
default, or swept (``--sweep``). A configuration whose method is not registered in this install is a row that
says so. ``--quick``: one task (``builtin:world``), one seed, 150 steps, 200 test questions per split, fewer
timing rounds. Without it: 3 seeds at 300 steps on each of the three built-in tasks (the costs are measured
once: they do not depend on the task), each task's ranking and the mean accuracy over tasks.
"""

from __future__ import annotations

from dataclasses import replace

from .bench import BENCH_SETTINGS, BenchConfig, Budget, TimingPlan

LORA = BENCH_SETTINGS["lora"]["options"]  # r=16, alpha=32, all linear layers: the bench's LoRA


def _e(label: str, method: str, impl: str = "leantune", lr_key: str | None = None, **options) -> dict:
    return {"label": label, "method": method, "impl": impl, "options": options, "lr_key": lr_key or method}


# The survey's 16 (full FT and its 15 configurations, in its order), then the methods leantune adds. Options on
# top of each method's documented defaults; the two LoRA rows differ only in their targets.
SURVEY: list[dict] = [
    _e("full", "full"),
    _e("houlsby", "houlsby"),
    _e("pfeiffer", "pfeiffer"),
    _e("scaled_parallel", "scaled_parallel"),
    _e("ln_tuning", "ln_tuning"),
    _e("lora_qv", "lora", lr_key="lora", **{**LORA, "targets": "q,v"}),
    _e("lora_all", "lora", lr_key="lora", **LORA),
    _e("krona", "krona"),
    _e("compacter", "compacter"),
    _e("compacter_pp", "compacter_pp"),
    _e("ia3", "ia3"),
    _e("mam", "mam"),
    _e("prefix_tuning", "prefix_tuning"),
    _e("prefix_flat", "prefix_flat"),
    _e("unipelt", "unipelt"),
    _e("peft:lora", "lora", impl="peft", lr_key="lora", **LORA),
    _e("bitfit", "bitfit"),
    _e("s2ft", "s2ft"),
    _e("lisa", "lisa"),
    _e("light_peft", "light_peft"),
]
SUITES = {"survey": SURVEY}
SUITE_TASKS = ["builtin:world", "builtin:listops", "builtin:arith"]


def suite_entries(name: str) -> list[dict]:
    if name not in SUITES:
        raise ValueError(f"--suite {name!r}: unknown suite; known: {', '.join(SUITES)}")
    return [dict(e, options=dict(e["options"])) for e in SUITES[name]]


def suite_config(name: str, quick: bool = False, **overrides) -> BenchConfig:
    """The suite's preset. ``quick``: 1 task, 1 seed, 150 steps, 200 questions per split, and timing cut to 4
    rounds of training steps and 2 of generation after one warm-up each (the demo: 7 and 3) so that 20 rows fit
    in 40 minutes on 2 cores."""
    suite_entries(name)  # a clear error for an unknown suite
    if quick:
        cfg = BenchConfig(budget=Budget(max_steps=150, seeds=1, eval_samples=200),
                          timing=TimingPlan(warmup_rounds=1, rounds=4, infer_warmup_rounds=1, infer_rounds=2),
                          quick=True, tasks=[SUITE_TASKS[0]])
    else:
        cfg = BenchConfig(tasks=list(SUITE_TASKS))
    return replace(cfg, suite=name, entries=suite_entries(name), methods=[e["label"] for e in SUITES[name]],
                   output_dir=f"bench-{name}" + ("-quick" if quick else ""), **overrides)
