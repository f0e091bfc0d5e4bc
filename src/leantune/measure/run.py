"""One bench job in a fresh process: ``python -m leantune.measure.run JOB SPEC.json OUT.json``.

Jobs: ``quality`` (one fine-tune on the base, one seed),
``efficiency`` (memory and FLOPs of one method on the efficiency model; this process does nothing else, so its
peak RSS is the method's) and ``timing`` (all methods' training steps and generation, interleaved in one
process). Progress goes to stdout as JSON lines (``{"event": ...}``); the result is written to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _device(spec: dict) -> torch.device:
    return torch.device(spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def apply_run(model, run: dict):
    """Attach the run's method: leantune's registry by name (the PEFT bridge too: method ``peft``), or PEFT's
    LoRA for the anchor."""
    if run["impl"] == "peft" and run["method"] != "peft":
        if run["method"] != "lora":
            raise ValueError(f"the PEFT anchor runs LoRA only, not {run['method']!r}")
        from .peft_anchor import apply_peft_lora

        return apply_peft_lora(model, **run.get("options", {}))
    from ..api import apply

    return apply(model, run["method"], **run.get("options", {}))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# -- quality ------------------------------------------------------------------------------------------------


def job_base(spec: dict) -> dict:
    """The untuned base on the task (the bench calls this in its own process, not a fresh one: it measures no cost)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the bench's own progress line is the one the terminal shows
    from ..data.tasks import get_task
    from ..models import load_model
    from .quality import accuracy, heldout_loss

    model, tok = load_model(spec["base"], dtype="float32", device=str(_device(spec)))
    task = get_task(spec["task"])
    limit = spec.get("eval_samples")
    return {
        "name": spec["base"],
        "params": sum(p.numel() for p in model.parameters()),
        "accuracy": accuracy(model, tok, task, "test", limit),
        "accuracy_shifted": accuracy(model, tok, task, "shifted", limit),
        "heldout_loss": heldout_loss(model, tok, spec["base"]),
    }


def job_quality(spec: dict) -> dict:
    from ..data.tasks import get_task
    from ..models import load_model
    from ..train.loop import TrainConfig, seed_everything, train
    from .quality import accuracy, heldout_loss, train_examples

    run, budget, seed = spec["run"], spec["budget"], spec["seed"]
    t0 = time.perf_counter()
    model, tok = load_model(spec["base"], dtype="float32", quantize=run.get("quantize"))
    seed_everything(seed)  # the method's initial weights (LoRA's A, S²FT's draw) follow the run's seed
    method = apply_run(model, run)
    task = get_task(spec["task"])
    from ..data.encode import decoder_start

    data, val = train_examples(tok, task, budget["max_length"], spec.get("val_examples", 0), decoder_start(model))
    cfg = TrainConfig(max_steps=budget["max_steps"], lr=spec.get("lr"), batch_size=budget["batch_size"],
                      warmup_steps=budget.get("warmup_steps", 0), lr_schedule=budget.get("lr_schedule", "linear"),
                      seed=seed, output_dir=spec["train_dir"], resume=False, progress=False)
    result = train(model, data, cfg, pad_id=tok.pad_token_id)
    limit = spec.get("eval_samples")
    emit(event="phase", what="evaluating")
    out = {
        "config": method.config.to_dict(),
        "lr": cfg.lr if cfg.lr is not None else method.default_lr,
        "final_loss": result.final_loss,
        "accuracy": accuracy(model, tok, task, "test", limit),
        "accuracy_shifted": accuracy(model, tok, task, "shifted", limit),
        "heldout_loss": heldout_loss(model, tok, spec["base"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if val:
        from ..data.evaluate import generate_accuracy

        out["val_accuracy"] = generate_accuracy(model, tok, val, max_new_tokens=task.max_new_tokens,
                                                scorer=task.score)["accuracy"]
    return out


# -- efficiency ---------------------------------------------------------------------------------------------


def job_efficiency(spec: dict) -> dict:
    from .. import io
    from .effmodel import EfficiencyModel
    from .flops import FlopCount
    from .memory import SavedTensorMeter, grad_bytes, optimizer_bytes, peak_bytes, weight_bytes
    from .step import Stepper

    device = _device(spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.set_flush_denormal(True)
    eff = EfficiencyModel(**spec["efficiency_model"])
    run = spec["run"]
    if run.get("quantize"):  # its library is part of the process before any weights, as torch is
        from ..quant import bitsandbytes

        bitsandbytes()
    before_model = peak_bytes(device)  # the process with its libraries, before any weights exist
    model = eff.build(device, quantize=run.get("quantize"))
    torch.manual_seed(0)
    method = apply_run(model, run)
    batch = eff.batch(device)
    stepper = Stepper(model, lr=run.get("lr"), max_steps=spec["max_steps"], batch=batch)
    settle = 0
    if method.capabilities.schedule_ends:  # a schedule with an end (estimate, then prune): measure the state after it
        # Those steps are not measured and only the shape they leave matters: a small batch does it cheaply.
        small = {k: v[:1, :64] for k, v in batch.items()}
        while method.capabilities.schedule_ends:
            if settle >= spec["max_steps"]:
                raise RuntimeError(f"{run['method']}: its schedule did not finish within {settle} steps")
            loss = stepper.step(small)
            settle += 1
            emit(event="progress", what="settling the schedule", done=settle, loss=loss)
    stepper.step(batch)  # warm-up: the optimizer state exists from here on
    emit(event="progress", what="measuring", done=1, total=2)
    stepper.begin()
    with SavedTensorMeter(model) as meter, FlopCount() as fwd:
        loss = stepper.forward(batch)
    activations = meter.saved_bytes()
    with FlopCount() as bwd:
        loss.backward()
    grads = grad_bytes(model)
    stepper.finish()
    memory = {"weights": weight_bytes(model), "grads": grads, "optimizer": optimizer_bytes(stepper.optimizer),
              "activations": activations, "peak": peak_bytes(device)}  # peak read before anything else is done
    emit(event="progress", what="measuring", done=2, total=2, loss=float(loss))
    adapter_dir = Path(spec.get("adapter_dir") or tempfile.mkdtemp(prefix="leantune-bench-"))
    io.save(model, adapter_dir)
    return {
        "config": method.config.to_dict(),
        "capabilities": method.capabilities.to_dict(),
        "trainable_params": method.num_trainable(),
        "changed_params": method.num_changed(),
        "adapter_bytes": dir_bytes(adapter_dir),
        "adapter_dir": str(adapter_dir),
        "memory": memory,
        "train_flops": {"forward": fwd.total, "backward": bwd.total},
        "train_flops_per_step": fwd.total + bwd.total,
        "settle_steps": settle,
        "peak_before_model": before_model,
        "device": str(device),
    }


# -- timing -------------------------------------------------------------------------------------------------


def job_timing(spec: dict) -> dict:
    from .. import io
    from ..quant import quantization_of
    from .effmodel import EfficiencyModel
    from .step import Stepper
    from .timing import interleaved_latency, interleaved_step_times

    device = _device(spec)
    torch.set_flush_denormal(True)
    eff = EfficiencyModel(**spec["efficiency_model"])
    batch, prompt = eff.batch(device), eff.prompt(device)
    steppers, models = {}, {}
    for key, run in spec["runs"].items():
        model = eff.build(device, quantize=run.get("quantize"))
        torch.manual_seed(0)
        if run.get("adapter_dir"):  # the state the efficiency job measured (e.g. already pruned)
            io.load(model, run["adapter_dir"], trainable=True)
        else:
            apply_run(model, run)
        steppers[key] = Stepper(model, lr=run.get("lr"), max_steps=spec["max_steps"], batch=batch)
        models[key] = model
        emit(event="phase", what=f"built {key}")
    total = len(steppers) * (spec["warmup_rounds"] + spec["rounds"])
    done = 0

    def on_step(r, name, dt, loss):
        nonlocal done
        done += 1
        emit(event="progress", what=f"training steps, round {r + 1}: {name}", done=done, total=total,
             loss=loss, seconds=dt)

    steps = interleaved_step_times(steppers, batch, spec["warmup_rounds"], spec["rounds"], on_step, device)
    base = eff.build(device)
    emit(event="phase", what="generation latency (unmerged)")
    lat = interleaved_latency({"__base__": base, **models}, prompt, eff.new_tokens, spec["infer_warmup_rounds"],
                              spec["infer_rounds"])
    # a quantized base is not merged in place (quant.refuse_quantized_merge): its rows have no merged latency
    mergeable = {k: m for k, m in models.items()
                 if m.leantune_method.capabilities.mergeable and quantization_of(m) is None}
    for m in mergeable.values():
        m.leantune_method.merge()
    emit(event="phase", what="generation latency (merged)")
    lat_merged = interleaved_latency({"__base__": base, **mergeable}, prompt, eff.new_tokens,
                                     spec["infer_warmup_rounds"], spec["infer_rounds"])
    tokens = int(batch["attention_mask"].sum())
    return {
        "tokens_per_step": tokens,
        "step_time_s": steps,
        "latency_s": {k: v for k, v in lat.items() if k != "__base__"},
        "latency_merged_s": {k: v for k, v in lat_merged.items() if k != "__base__"},
        "base_latency_s": lat["__base__"],
        "base_latency_merged_s": lat_merged["__base__"],
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


JOBS = {"quality": job_quality, "efficiency": job_efficiency, "timing": job_timing}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in JOBS:
        print(f"usage: python -m leantune.measure.run {{{'|'.join(JOBS)}}} SPEC.json OUT.json", file=sys.stderr)
        return 2
    job, spec_path, out_path = argv
    os.environ.setdefault("LEANTUNE_NO_PROGRESS", "1")
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = JOBS[job](spec)
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
