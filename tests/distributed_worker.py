"""Run under ``torchrun --nproc_per_node 2`` by tests/test_distributed.py: several ``leantune train`` runs in one
launch (a launch costs seconds of imports), then a LISA run through the Python API that records, on every rank and
every step, how many optimizer-state entries the rank holds and how many its share of the active blocks needs.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR RUNS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def local_numel(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def lisa_state_share(out: Path, distributed: str) -> None:
    import leantune
    from leantune.data import encode_examples, get_task
    from leantune.dist import rank
    from leantune.train import TrainConfig, TrainHook, train

    torch.manual_seed(0)
    model, tok = leantune.load_model("builtin:tiny-llama")
    method = leantune.apply(model, "lisa", gamma=1, period=2)
    rows = []

    class Watch(TrainHook):
        def on_step_end(self, ctx):
            held = sum(local_numel(v) for st in ctx.optimizer.state.values() for k, v in st.items() if k == "exp_avg")
            active = [p for _, p in method.trainable_parameters()]
            rows.append({"step": ctx.step, "blocks": list(method.active), "held": held,
                         "share": sum(local_numel(p) for p in active)})

    data = encode_examples(tok, get_task("builtin:arith").split("train")[:64], 64)
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-3, progress=False, distributed=distributed)
    train(model, data, cfg, pad_id=tok.pad_token_id, hooks=[Watch()])
    (out / f"lisa-state-{distributed}-rank{rank()}.json").write_text(json.dumps(rows))


def main() -> None:
    from leantune.cli import app

    out, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    for args in runs:
        try:
            app(args, standalone_mode=False)
        except SystemExit as e:  # a refusal: _fail exits with its code
            if e.code:
                raise
    for distributed in ("ddp", "fsdp"):
        lisa_state_share(out, distributed)


if __name__ == "__main__":
    main()
