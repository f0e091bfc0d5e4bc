"""docs/plan.md's tables: methods planned and measured on the bench's efficiency model (CPU), batch 4 x 256.

python docs/plan_table.py                       every method, full-precision base
python docs/plan_table.py lora ia3 --quantize nf4   these methods on an nf4 base
"""

import argparse
import json

from leantune.measure import plan as planner
from leantune.methods import list_methods

parser = argparse.ArgumentParser()
parser.add_argument("methods", nargs="*", help="default: every registered method")
parser.add_argument("--quantize", default=None, help="nf4 | fp4 | int8")
args = parser.parse_args()

settings = planner.PlanSettings(batch_size=4, seq_len=256, device="cpu", quantize=args.quantize)
print("| method | weights (MiB) pred / meas | grads (MiB) pred / meas | optimizer (MiB) pred / meas | activations (MiB) pred / meas | "
      "step_peak (MiB) predicted | step_peak (MiB) measured | ratio |")
print("|---|---|---|---|---|---|---|---|")
rows = []
for name in args.methods or [cls.name for cls in list_methods()]:
    options = planner.method_options(name, None, bench_settings=True)
    try:
        p = planner.plan_method(planner.EFFICIENCY, name, options, settings).memory
    except ValueError as e:  # refused (a quantized base, a model it does not fit)
        print(f"| {name} | refused: {str(e).splitlines()[0]} | | | | | | |", flush=True)
        continue
    m = planner.plan_method(planner.EFFICIENCY, name, options, settings, fake=False).memory
    rows.append({"method": name, "quantize": args.quantize, "predicted": p, "measured": m})

    def mib(n):
        return f"{n / 2**20:.2f}"

    from leantune.methods import get_method

    label = name + (" (bound)" if get_method(name)().capabilities.schedule_ends else "")
    label += f" +{args.quantize}" if args.quantize else ""
    print(f"| {label} | {mib(p['weights'])} / {mib(m['weights'])} | {mib(p['grads'])} / {mib(m['grads'])} | {mib(p['optimizer'])} / {mib(m['optimizer'])} | "
          f"{mib(p['activations'])} / {mib(m['activations'])} | {mib(p['step_peak'])} | {mib(m['step_peak'])} | "
          f"{p['step_peak'] / m['step_peak']:.4f} |", flush=True)
print(json.dumps(rows))
