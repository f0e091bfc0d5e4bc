"""docs/plan.md's table: every method planned and measured on the bench's efficiency model (CPU)."""

import json

from leantune.measure import plan as planner
from leantune.methods import list_methods

settings = planner.PlanSettings(batch_size=4, seq_len=256, device="cpu")
print("| method | grads (MiB) pred / meas | optimizer (MiB) pred / meas | activations (MiB) pred / meas | "
      "step_peak (MiB) predicted | step_peak (MiB) measured | ratio |")
print("|---|---|---|---|---|---|---|")
rows = []
for cls in list_methods():
    options = planner.method_options(cls.name, None, bench_settings=True)
    p = planner.plan_method(planner.EFFICIENCY, cls.name, options, settings).memory
    m = planner.plan_method(planner.EFFICIENCY, cls.name, options, settings, fake=False).memory
    rows.append({"method": cls.name, "predicted": p, "measured": m})

    def mib(n):
        return f"{n / 2**20:.2f}"

    name = cls.name + (" (bound)" if cls().capabilities.schedule_ends else "")
    print(f"| {name} | {mib(p['grads'])} / {mib(m['grads'])} | {mib(p['optimizer'])} / {mib(m['optimizer'])} | "
          f"{mib(p['activations'])} / {mib(m['activations'])} | {mib(p['step_peak'])} | {mib(m['step_peak'])} | "
          f"{p['step_peak'] / m['step_peak']:.4f} |", flush=True)
print(json.dumps(rows))
