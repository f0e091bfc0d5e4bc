"""How ``leantune plan`` shows its plans: a table (or JSON in bytes) and the peak-vs-length plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .plan import (
    ALLOWANCE,
    MEMORY_KEYS,
    MethodPlan,
    PlanSettings,
    cheapest,
    fmt_bytes,
    peak_curve,
    resolve_model,
)


def render(model: str, settings: PlanSettings, plans: list[MethodPlan], budget: int | None,
           as_json: bool = False) -> str:
    best = cheapest(plans)
    if as_json:
        return json.dumps({
            "model": model, "settings": asdict(settings), "device_memory": budget,
            "allowance": {**ALLOWANCE, "applies": settings.device == "cuda"},
            "methods": [p.to_dict() for p in plans],
            "cheapest": best.method if best else None,
        }, indent=1)
    head = ["method", *MEMORY_KEYS, "needed"] + (["fits", "max batch", "max length"] if budget else [])
    rows = []
    for p in plans:
        if p.error:
            rows.append([p.method, f"n/a: {p.error}"])
            continue
        row = [p.label, *(fmt_bytes(p.memory[k]) for k in MEMORY_KEYS), fmt_bytes(p.needed)]
        if budget:
            row += ["yes" if p.fits else "no", str(p.max_batch_size or "-"), str(p.max_seq_len or "-")]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows] if i < len(r) and len(r) == len(head)) for i in range(len(head))]
    lines = [f"{model}: batch {settings.batch_size} x {settings.seq_len} tokens, grad_accum {settings.grad_accum}, "
             f"mixed precision {settings.mixed_precision}, base dtype {settings.base_dtype}, "
             f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
             + (f"base quantized {settings.quantize}, " if settings.quantize else "") +
             f"{settings.distributed if settings.distributed != 'no' else 'one process'}"
             + (f" x {settings.world_size}" if settings.world_size > 1 else "") + f", planned for {settings.device}",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    for r in rows:
        if len(r) == len(head):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        else:
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
    for p in plans:
        for note in p.notes:
            lines.append(f"  {p.method}: {note}")
    if settings.device == "cuda":
        lines.append(f"needed = step_peak + allowance (CUDA context {fmt_bytes(ALLOWANCE['cuda_context'])}, attention "
                     f"workspace {fmt_bytes(ALLOWANCE['attention_workspace'])}, fragmentation "
                     f"{ALLOWANCE['fragmentation']:.0%} of step_peak; not yet calibrated on a GPU, see docs/plan.md)")
    if budget and best is not None:
        fitting = [p for p in plans if p.error is None and p.fits]
        if fitting:
            c = min(fitting, key=lambda p: p.needed)
            lines.append(f"cheapest at these settings: {c.label} ({fmt_bytes(c.needed)} of {fmt_bytes(budget)})")
        else:
            lines.append(f"no method fits {fmt_bytes(budget)} at these settings; see max batch / max length")
    elif best is not None and len(plans) > 1:
        lines.append(f"cheapest at these settings: {best.label} (step_peak {fmt_bytes(best.memory['step_peak'])})")
    return "\n".join(lines)


def plot_peaks(model: str, settings: PlanSettings, plans: list[MethodPlan], path: Path) -> Path:
    """Peak memory vs sequence length per method: the planned length, a quarter, half, and double of it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'leantune[plots]'") from None
    source = resolve_model(model)
    n = settings.seq_len
    lengths = sorted({max(2, n // 4), max(2, n // 2), n, 2 * n})
    if source.max_positions:
        lengths = [x for x in lengths if x <= source.max_positions] or [n]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in plans:
        if p.error:
            continue
        peaks = peak_curve(source, p.method, p.options, settings, lengths, bench_settings=False)
        ax.plot(lengths, [x / 2**30 for x in peaks], marker="o", label=p.method)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("step peak (GiB)")
    ax.set_title(f"{model}, batch {settings.batch_size}, {settings.mixed_precision} mixed precision")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
