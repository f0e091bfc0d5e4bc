"""Run under ``torchrun --nproc_per_node 2`` by tests/test_plan.py: one FSDP2 training step of a method through
leantune's loop (``train/parallel.py`` shards it), then what this rank holds, written to OUT/METHOD-rankR.json:
its local shards of the weights and of what trains (the gradients' shape), and of the optimizer state.

    torchrun --nproc_per_node 2 tests/plan_fsdp_worker.py OUT_DIR METHOD [METHOD ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def main() -> None:
    import leantune
    from leantune.data import encode_examples, get_task
    from leantune.dist import rank
    from leantune.train import TrainConfig, TrainHook, train

    class Watch(TrainHook):
        def __init__(self):
            self.held = {}

        def on_step_end(self, ctx):
            params = list({id(p): p for p in ctx.model.parameters()}.values())
            self.held["weights"] = sum(local_bytes(p) for p in params)
            self.held["grads"] = sum(local_bytes(p) for p in params if p.requires_grad)
            self.held["optimizer"] = sum(local_bytes(v) for st in ctx.optimizer.state.values() for v in st.values()
                                         if torch.is_tensor(v))

    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        torch.manual_seed(0)
        model, tok = leantune.load_model("builtin:tiny-llama")
        leantune.apply(model, name)
        data = encode_examples(tok, get_task("builtin:arith").split("train")[:8], 32)
        cfg = TrainConfig(max_steps=1, batch_size=2, lr=1e-3, progress=False, distributed="fsdp")
        watch = Watch()
        train(model, data, cfg, pad_id=tok.pad_token_id, hooks=[watch])
        (out / f"{name}-rank{rank()}.json").write_text(json.dumps(watch.held))


if __name__ == "__main__":
    main()
