"""results.md (tables in the survey's style, with ratios to full fine-tuning and to LoRA) and the plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

LORA_KEYS = ("lora", "lora_all")  # the bench's LoRA (r=16 on all linear layers): the demo's label, the suite's
PEFT_KEY = "peft:lora"
FULL_KEY = "full"


def label_of(r: dict) -> str:
    """A run's label (results before labels existed: the method's name, ``impl:method`` for another impl)."""
    return r.get("label") or (r["method"] if r["impl"] == "leantune" else f"{r['impl']}:{r['method']}")


def aggregate(results: dict) -> dict[str, dict]:
    """Runs grouped by label, in first-seen order: the efficiency figures (the same for every seed), the
    quality figures as lists over seeds."""
    groups: dict[str, dict] = {}
    for r in results["runs"]:
        g = groups.setdefault(label_of(r), {**r, "seeds": [], "acc": [], "shift": [], "forget": [], "lrs": []})
        g["seeds"].append(r["seed"])
        g["acc"].append(r["quality"]["accuracy"])
        g["shift"].append(r["quality"]["accuracy_shifted"])
        if r["quality"]["forgetting"] is not None:
            g["forget"].append(r["quality"]["forgetting"])
        g["lrs"].append(r["lr"])
    return groups


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _ms(xs, fmt="{:.3f}", signed=False) -> str:
    m, s = mean_std(xs)
    if m is None:
        return "–"
    f = ("{:+" + fmt[2:]) if signed else fmt
    return f.format(m) + (f" ± {fmt.format(s)}" if s is not None else "")


def _bytes(n) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _ratio(x, ref) -> str:
    return f"{x / ref:.2f}×" if (x is not None and ref) else "–"


def _flops(n) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def flops_per_s(g: dict) -> float | None:
    return g["train_flops_per_step"] / g["step_time_s"] if g.get("step_time_s") else None


def checks(groups: dict) -> list[str]:
    """The issue's done-when figures, where the runs to compute them are present."""
    out = []
    lora, peft, full = _lora(groups), groups.get(PEFT_KEY), groups.get(FULL_KEY)
    if lora and peft and lora.get("step_time_s") and peft.get("step_time_s"):
        r = lora["step_time_s"] / peft["step_time_s"]
        out.append(f"leantune LoRA step time / PEFT LoRA step time (interleaved medians): **{r:.3f}** "
                   f"(target ≤ 1.02: {'met' if r <= 1.02 else 'NOT met'})")
    if lora and full and flops_per_s(lora) and flops_per_s(full):
        r = flops_per_s(lora) / flops_per_s(full)
        out.append(f"leantune LoRA achieved FLOP/s / full FT's: **{r:.3f}** "
                   f"({flops_per_s(lora) / 1e9:.1f} vs {flops_per_s(full) / 1e9:.1f} GFLOP/s; target ≥ 0.9: "
                   f"{'met' if r >= 0.9 else 'NOT met'})")
    if lora and peft:
        out.append(f"accuracy, leantune LoRA vs PEFT LoRA: {_ms(lora['acc'])} vs {_ms(peft['acc'])}")
    return out


def write_report(results: dict, out: Path, plots: list[str] = (), notes: list[str] = (), failed: dict | None = None,
                 wall_s: float | None = None) -> Path:
    groups = aggregate(results)
    b, e = results["budget"], results["efficiency_model"]
    full, lora = groups.get(FULL_KEY), _lora(groups)
    lines = [f"# leantune bench: {results['task']} on {results['base']['name']}", ""]
    lr_note = ("learning rates " + b["lrs"] if b.get("lrs") and b["lrs"] != "method defaults"
               else "each method's default learning rate")
    if b.get("sweep"):
        lr_note += ", swept over ×" + ", ×".join(f"{f:.2g}" for f in b["sweep"]) + " (picked on held-back training examples)"
    lines += [
        f"Budget: {b['max_steps']} steps × batch {b['batch_size']} (examples up to {b['max_length']} tokens), "
        f"{lr_note}, seeds {b['seeds']}. Untuned base accuracy: **{results['base']['accuracy']:.3f}** "
        f"({_count(results['base']['params'])} parameters).",
        f"Efficiency model: `{e['name']}` (random init, {_count(e['params'])} parameters, "
        f"{_count(e['block_params'])} in the blocks), batch {e['batch_size']} × {e['seq_len']} tokens, "
        f"on {e.get('measured_on', '?')}" + (f" with {e['threads']} threads" if e.get("threads") else "")
        + f". Machine: {results['machine'].get('processor')}, {results['machine'].get('cpu_count')} cores; "
        f"torch {results['versions'].get('torch')}, commit `{results.get('git_commit')}`"
        + (f"; the bench took {wall_s / 60:.1f} min" if wall_s else "") + ".",
        "",
        "## Quality (pretrained base)",
        "",
        "| method | impl | accuracy | shifted | forgetting | lr | trainable | changed | storage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = e["params"]
    for g in groups.values():
        m, impl = _shown(g), g["impl"]
        lines.append(
            f"| {m} | {impl} | {_ms(g['acc'])} | {_ms(g['shift'])} | {_ms(g['forget'], signed=True)} | "
            f"{g['lrs'][0]:.2g} | {_count(g['trainable_params'])} ({100 * g['trainable_params'] / total:.2f}%) | "
            f"{_count(g['changed_params'])} ({100 * g['changed_params'] / total:.2f}%) | {_bytes(g['adapter_bytes'])} |")
    lines += [
        "",
        "Accuracy: exact match on the test split (shifted: new templates or longer inputs), mean ± std over seeds. "
        "Forgetting: loss on held-out pretraining text after fine-tuning minus before. Trainable, changed and "
        "storage (the saved adapter folder) are counted on the efficiency model.",
        "",
        "## Cost (efficiency model), with ratios to full FT and to LoRA",
        "",
        "| method | impl | peak memory | ×full | ×LoRA | train FLOPs/step | ×full | ×LoRA | step time | ×full | ×LoRA "
        "| FLOP/s ×full | tokens/s | inference ×base | merged ×base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_m = e.get("base_latency_merged_s")
    for g in groups.values():
        m, impl = _shown(g), g["impl"]
        ref = {k: (x["memory"]["peak"], x["train_flops_per_step"], x["step_time_s"], flops_per_s(x)) if x else
               (None,) * 4 for k, x in (("full", full), ("lora", lora))}
        peak, fl, st, fps = g["memory"]["peak"], g["train_flops_per_step"], g["step_time_s"], flops_per_s(g)
        lat = g["infer"]
        merged = _ratio(lat["latency_merged_s"], base_m) if lat["latency_merged_s"] is not None else "cannot merge"
        step_s = f"{st:.3f} s" if st else "–"
        tok_s = f"{g['tokens_per_s']:.0f}" if g["tokens_per_s"] else "–"
        overhead = f"{lat['overhead']:.2f}×" if lat["overhead"] else "–"
        lines.append(
            f"| {m} | {impl} | {_bytes(peak)} | {_ratio(peak, ref['full'][0])} | {_ratio(peak, ref['lora'][0])} | "
            f"{_flops(fl)} | {_ratio(fl, ref['full'][1])} | {_ratio(fl, ref['lora'][1])} | "
            f"{step_s} | {_ratio(st, ref['full'][2])} | {_ratio(st, ref['lora'][2])} | "
            f"{_ratio(fps, ref['full'][3])} | {tok_s} | {overhead} | {merged} |")
    lines += [
        "",
        "## Memory breakdown (efficiency model, one training step)",
        "",
        "| method | impl | weights | grads | optimizer | activations | peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in groups.values():
        m, impl, mem = _shown(g), g["impl"], g["memory"]
        lines.append(f"| {m} | {impl} | {_bytes(mem['weights'])} | {_bytes(mem['grads'])} | "
                     f"{_bytes(mem['optimizer'])} | {_bytes(mem['activations'])} | {_bytes(mem['peak'])} |")
    peak_what = ("CUDA max allocated" if str(e.get("measured_on", "")).startswith("cuda") else
                 "peak RSS of a process that only measures that method (Python, torch and the libraries included)")
    lines += [
        "",
        f"Weights: all parameters, frozen included. Grads: gradients after backward. Optimizer: AdamW state after a "
        f"step. Activations: bytes autograd saved for backward, each storage once, weights excluded. Peak: {peak_what}. "
        "FLOPs: FlopCounterMode (matmuls and attention; a multiply-add is 2). Step time: median of interleaved "
        "steps (all methods alternate in one process). Inference: seconds per generated token at batch 1 over the "
        "base model's, measured interleaved with the base.",
    ]
    quantized = any(g.get("quantize") for g in groups.values())
    if quantized and not str(e.get("measured_on", "")).startswith("cuda"):
        lines.append("Quantized rows (METHOD+nf4: the blocks' linear layers in bitsandbytes, weights counted at their "
                     "real size with their scales): their process also holds the bitsandbytes library (about 120 MiB "
                     "of RSS on a CPU), which a small efficiency model's saved weights may not outweigh; see "
                     "docs/quantization.md.")
    settle = e.get("settle_steps") or {}
    if settle:
        lines.append("Measured after the method's schedule finished: " + ", ".join(
            f"{k} ({v} steps on a 64-token batch)" for k, v in settle.items())
            + "; its peak is the pruned model's steps plus the unpruned weights it started from (a real run's "
            "estimation phase, at the full batch, peaks higher).")
    if results.get("suite"):
        lines += survey_section(results, groups, failed or {})
    found = checks(groups)
    if found:
        lines += ["", "## Checks", ""] + [f"- {c}" for c in found]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if notes or failed:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
        for key, err in (failed or {}).items():
            lines.append(f"- **{key} failed**: " + err.splitlines()[0])
            lines += ["", "```", *err.splitlines()[1:], "```", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]],
                 bounds: tuple[float, float, float, float] | None = None, avoid=(), marker: float = 5.0, gap: float = 3.0,
                 rings: int = 12) -> tuple[list[tuple[float, float]], list[bool]]:
    """Where each point's label goes, in display pixels: the offset of the label's lower-left corner from its
    point, chosen greedily (points in x order) from slots right/left of the point, above/below it, one label
    height further out per ring, so that no label box overlaps another label box or any point's marker (a
    square of half-width ``marker``) or any box in ``avoid`` (a legend) or reaches outside ``bounds`` (x0, y0, x1, y1). The first free slot wins; when none is free within ``rings``, the slot
    with the least overlap. Also says which labels sit away from their point (those get a leader line)."""
    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    dots = [(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    placed: list[tuple[float, float, float, float]] = [tuple(b) for b in avoid]
    offsets: list[tuple[float, float]] = [(0.0, 0.0)] * len(points)
    far = [False] * len(points)
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        (x, y), (w, h) = points[i], sizes[i]
        best = None
        for ring in range(rings):
            step, near = ring * (h + gap), marker + gap  # ring 0 touches the point's own marker, no more
            for dx, dy in ((near, near + step), (near, -h - near - step), (-w - near, near + step),
                           (-w - near, -h - near - step)):
                box = (x + dx, y + dy, x + dx + w, y + dy + h)
                cost = sum(overlap(box, o) for o in placed) + sum(overlap(box, d) for d in dots)
                if bounds is not None and not (bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1]
                                               and box[3] <= bounds[3]):
                    cost += w * h - overlap(box, bounds) + 1.0  # outside, even by a sliver: never free
                if best is None or cost < best[0]:
                    best = (cost, (dx, dy), box, ring)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, offsets[i], box, ring = best
        far[i] = ring > 0
        placed.append(box)
    return offsets, far


def write_plots(results: dict, out: Path) -> list[str]:
    """accuracy_vs_peak_memory.png, accuracy_vs_step_time.png, memory_breakdown.png (file names returned);
    nothing when matplotlib is missing (``pip install 'leantune[plots]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = aggregate(results)
    if not groups:
        return []
    many = len(groups) > 8  # a suite: a larger figure, its labels, and labels stacked apart where points crowd
    names = [label_of(g) if many else (_shown(g) if _shown(g) != g["method"] or g["impl"] == "leantune"
                                       else f"{g['method']} ({g['impl']})") for g in groups.values()]
    made = []

    def scatter(xkey, xlabel, fname, xfmt):
        fig, ax = plt.subplots(figsize=(11, 7.5) if many else (6.4, 4.4), dpi=120)
        points = [(name, xfmt(g), mean_std(g["acc"])) for name, g in zip(names, groups.values(), strict=True)]
        points = [(n, x, ms) for n, x, ms in points if x is not None]
        for _name, x, (m, s) in points:
            ax.errorbar(x, m, yerr=s or 0, fmt="o", capsize=3)
        ax.axhline(results["base"]["accuracy"], color="grey", ls="--", lw=1, label="untuned base")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"accuracy ({results['task']})")
        ax.set_title(xkey)
        legend = ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        if many:  # every label placed where it covers no other label, no point and stays inside the axes
            renderer = fig.canvas.get_renderer()
            at = [tuple(ax.transData.transform((x, m))) for _, x, (m, _s) in points]
            sizes = []
            for name, _, _ in points:
                t = ax.text(0, 0, name, fontsize=8)
                box = t.get_window_extent(renderer)
                sizes.append((box.width, box.height))
                t.remove()
            offsets, far = place_labels(at, sizes, bounds=tuple(ax.get_window_extent(renderer).extents),
                                       avoid=[tuple(legend.get_window_extent(renderer).extents)])
            for (name, x, (m, _s)), (dx, dy), moved in zip(points, offsets, far, strict=True):
                ax.annotate(name, (x, m), textcoords="offset pixels", xytext=(dx, dy), fontsize=8, ha="left",
                            va="bottom", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if moved else None)
        else:  # labels alternate above and below their point: neighbours with equal accuracy stay readable
            for i, (name, x, (m, _s)) in enumerate(points):
                ax.annotate(name, (x, m), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -12),
                            fontsize=9)
            fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        made.append(fname)

    scatter("accuracy vs peak memory", "peak memory (MiB)", "accuracy_vs_peak_memory.png",
            lambda g: g["memory"]["peak"] / 2**20)
    scatter("accuracy vs step time", "training step time (s, efficiency model)", "accuracy_vs_step_time.png",
            lambda g: g["step_time_s"])

    fig, ax = plt.subplots(figsize=(max(6.4, 1.0 * len(names) + 2), 4.4))
    bottom = [0.0] * len(names)
    for part in ("weights", "grads", "optimizer", "activations"):
        vals = [g["memory"][part] / 2**20 for g in groups.values()]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.scatter(names, [g["memory"]["peak"] / 2**20 for g in groups.values()], marker="_", s=400, color="black",
               label="peak", zorder=3)
    ax.set_ylabel("MiB (efficiency model, one step)")
    ax.set_title("memory breakdown")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "memory_breakdown.png", dpi=120)
    plt.close(fig)
    made.append("memory_breakdown.png")
    return made


def _lora(groups: dict) -> dict | None:
    return next((groups[k] for k in LORA_KEYS if k in groups), None)


def _shown(g: dict) -> str:
    """The name in a table's method column: the method's name where the label is just that (the demo's rows and
    the PEFT anchor, whose impl column says peft), else the label (``lora_qv``, ``peft:loha``)."""
    label = label_of(g)
    return g["method"] if label in (g["method"], f"{g['impl']}:{g['method']}") else label


def _method_info(g: dict) -> tuple[str, str]:
    """(the survey's type, the inference overhead kind before merge) of a row, from its method's class and config."""
    try:
        if g["impl"] == "peft" and g["method"] == "lora":
            from .peft_anchor import PeftLora as cls
        else:
            from ..methods import get_method

            cls = get_method(g["method"])
        method = cls(cls.config_cls.from_dict(g.get("config") or {}, method=g["method"]))
        return method.family, method.capabilities.inference_overhead
    except (KeyError, ValueError, ImportError):
        return "–", "–"


def survey_section(results: dict, groups: dict, failed: dict | None = None) -> list[str]:
    """The survey-style table: one row per configuration (label), the survey's axes, then the rows whose jobs
    failed (by run key) and the rows this install could not run."""
    e = results["efficiency_model"]
    total, base_m = e["params"], e.get("base_latency_merged_s")
    lines = ["", f"## The survey's axes ({results['suite']})", "",
             "| label | type | trainable | changed | storage | peak memory | backprop FLOPs | inference unmerged / "
             "merged | lr | accuracy | shifted | forgetting |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, g in sorted(groups.items(), key=lambda kv: -(mean_std(kv[1]["acc"])[0] or 0.0)):
        family, kind = _method_info(g)
        lat = g["infer"]
        unmerged = f"{lat['overhead']:.2f}× ({kind})" if lat.get("overhead") else f"– ({kind})"
        merged = _ratio(lat["latency_merged_s"], base_m) if lat.get("latency_merged_s") is not None else "cannot merge"
        lines.append(
            f"| {label} | {family} | {100 * g['trainable_params'] / total:.2f}% | "
            f"{100 * g['changed_params'] / total:.2f}% | {_bytes(g['adapter_bytes'])} | {_bytes(g['memory']['peak'])} | "
            f"{_flops(g['train_flops']['backward'])} | {unmerged} / {merged} | {g['lrs'][0]:.2g} | {_ms(g['acc'])} | "
            f"{_ms(g['shift'])} | {_ms(g['forget'], signed=True)} |")
    for key in failed or {}:
        if key != "timing":
            lines.append(f"| {key} | – | failed: see Notes below |" + " – |" * 9)
    for u in results.get("unavailable", []):
        what = f"not run: {u['reason']}" if u.get("quantize") else f"method not available in this build ({u['reason']})"
        lines.append(f"| {u['label']} | – | {what} |" + " – |" * 9)
    lines += ["", "Rows ordered by accuracy. Trainable / changed: % of the efficiency model's parameters. Backprop "
              "FLOPs: the backward pass of one step on the efficiency model. Inference: seconds per generated token "
              "over the base's, before merging (the method's overhead kind) / after. lr: the bench's tuned LR for "
              "the base where it has one (the LoRA rows share LoRA's), else the method's default."]
    return lines


# -- several tasks: each task's ranking and the mean ---------------------------------------------------------


def _mean_accuracy(results: dict) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in results["runs"]:
        by.setdefault(r["label"], []).append(r["quality"]["accuracy"])
    return {k: statistics.fmean(v) for k, v in by.items()}


def ranking(per_task: dict[str, dict]) -> dict:
    """Accuracy per label and task (mean over seeds), the rank within each task (1 = best; ties share the best
    rank), the mean accuracy over the tasks where the label ran on all of them, and the order by that mean."""
    acc = {task: _mean_accuracy(res) for task, res in per_task.items()}
    labels = list(dict.fromkeys(lbl for a in acc.values() for lbl in a))
    ranks = {}
    for task, a in acc.items():
        ranks[task] = {lbl: 1 + sum(1 for other in a.values() if other > v) for lbl, v in a.items()}
    mean = {lbl: statistics.fmean(acc[t][lbl] for t in acc) for lbl in labels if all(lbl in acc[t] for t in acc)}
    order = sorted(mean, key=lambda lbl: -mean[lbl])
    return {"accuracy": acc, "rank": ranks, "mean_accuracy": mean, "order": order}


def write_suite_summary(name: str, per_task: dict[str, dict], dirs: dict[str, str], out: Path,
                        unavailable: list[dict], wall_s: float | None = None) -> dict:
    """results.json and results.md at the top of a several-task suite run: where each task's full report is, the
    ranking per task and by mean accuracy. Each task's folder holds the bench's own results.json / results.md."""
    rank = ranking(per_task)
    summary = {"suite": name, "tasks": list(per_task), "task_dirs": dirs, "ranking": rank,
               "unavailable": [{k: u[k] for k in ("label", "method", "impl", "reason", "quantize") if u.get(k)}
                               for u in unavailable]}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    tasks = list(per_task)
    short = [t.removeprefix("builtin:") for t in tasks]
    lines = [f"# leantune bench --suite {name}: {len(tasks)} tasks", "",
             "Accuracy (mean over seeds) and rank within each task (1 = best); the rows ordered by the mean over "
             "the tasks. Each task's full table (costs, forgetting, shifted accuracy) is in its folder: "
             + ", ".join(f"[{s}]({dirs[t]}/results.md)" for s, t in zip(short, tasks, strict=True))
             + (f". The suite took {wall_s / 60:.1f} min." if wall_s else "."), "",
             "| label | " + " | ".join(short) + " | mean accuracy | mean rank |",
             "|---|" + "---|" * len(tasks) + "---|---|"]
    for lbl in rank["order"]:
        cells = [f"{rank['accuracy'][t][lbl]:.3f} ({rank['rank'][t][lbl]})" for t in tasks]
        mean_rank = statistics.fmean(rank["rank"][t][lbl] for t in tasks)
        lines.append(f"| {lbl} | " + " | ".join(cells) + f" | {rank['mean_accuracy'][lbl]:.3f} | {mean_rank:.1f} |")
    for u in unavailable:
        what = f"not run: {u['reason']}" if u.get("quantize") else "method not available in this build"
        lines.append(f"| {u['label']} | " + " | ".join([what] + ["–"] * (len(tasks) - 1)) + " | – | – |")
    lines += ["", "One task's ranking does not carry to another: compare the columns before trusting one."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary
