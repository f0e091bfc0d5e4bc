"""`leantune` command line. It only wires: models, data, methods and the loop live elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning, measured.")


def _fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _use_family_specs(paths: list[Path]) -> None:
    """Register the families of ``--family-spec`` files (here and in the bench's child runs)."""
    from .anatomy import use_family_specs

    use_family_specs(paths)


def parse_options(pairs: list[str]) -> dict:
    """``["r=16", "targets=q,v"]`` -> ``{"r": 16, "targets": "q,v"}`` (JSON values where they parse)."""
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise ValueError(f"option {item!r} must look like key=value (e.g. -o r=16)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def load_recipe(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"recipe {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping with model, method, task/data, train")
    known = {"model", "method", "task", "data", "train", "output_dir", "max_length", "adapter", "val_fraction", "packing",
             "base_dtype", "quantize"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"recipe {str(path)!r}: unknown key(s) {unknown}; known: {sorted(known)}")
    method = data.get("method")
    if isinstance(method, str):
        data["method"] = {"name": method, "options": {}}
    elif method is not None and (not isinstance(method, dict) or "name" not in method):
        raise ValueError(f"recipe {str(path)!r}: method must be a name or {{name: ..., options: {{...}}}}")
    return data


def quantize_options(recipe, kind, double_quant, compute_dtype, quantize_head):
    """``--quantize`` and its flags over a recipe's ``quantize`` (a type or a mapping): None when not quantized."""
    from .quant import QuantizeConfig

    base = QuantizeConfig.from_any(recipe)
    fields = base.to_dict() if base is not None else {}
    if kind is not None:
        fields = {} if kind.strip().lower() in ("none", "no", "off") else {**fields, "type": kind.strip().lower()}
    extra = {k: v for k, v in (("double_quant", double_quant), ("compute_dtype", compute_dtype),
                               ("quantize_head", quantize_head)) if v is not None}
    if extra and not fields:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in extra)} given without --quantize")
    return {**fields, **extra} or None


@app.command()
def train(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="hub id, local folder or builtin:NAME"),
    method: Optional[str] = typer.Option(None, "--method", help="a method name (see `leantune methods`)"),
    task: Optional[str] = typer.Option(None, "--task", help="a built-in task, e.g. builtin:arith"),
    data: Optional[Path] = typer.Option(None, "--data", help="your data: JSONL/CSV/datasets folder"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="where the adapter, metrics, checkpoints go"),
    config: Optional[Path] = typer.Option(None, "--config", help="a recipe YAML (flags override it)"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option key=value, repeatable"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default: the method's)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="linear | cosine | constant"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per example"),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no | bf16 | fp16"),
    distributed: Optional[str] = typer.Option(None, "--distributed", help="auto (ddp with several processes) | no | "
                                              "ddp | fsdp; launch with torchrun -m leantune.cli or accelerate launch"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    eval_samples: int = typer.Option(64, "--eval-samples", help="test examples per periodic evaluation"),
    save_every: Optional[int] = typer.Option(None, "--save-every"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="continue from the last checkpoint"),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="start from this adapter folder (leantune or PEFT)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="held-out share of --data (default 0.1)"),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="pack short examples into rows"),
    save_merged: bool = typer.Option(False, "--save-merged", help="also write the merged model to OUTPUT_DIR/merged"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
    base_dtype: Optional[str] = typer.Option(None, "--base-dtype", help="auto (the checkpoint's; fp16 -> fp32 on CPU) "
                                             "| fp32 | bf16 | fp16: how the frozen base loads"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8: the frozen base's linear "
                                           "layers quantized with bitsandbytes (QLoRA); pip install 'leantune[quant]'"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="4-bit: quantize the "
                                                "block scales too (default on)"),
    quant_compute_dtype: Optional[str] = typer.Option(None, "--quant-compute-dtype", help="4-bit: auto (the base's "
                                                      "dtype) | fp32 | bf16 | fp16"),
    quantize_head: Optional[bool] = typer.Option(None, "--quantize-head/--no-quantize-head", help="the LM head too "
                                                 "(default off)"),
):
    """Fine-tune MODEL with METHOD on a task or your data; writes the adapter to OUTPUT_DIR."""
    from .train.loop import TrainConfig

    try:
        _use_family_specs(family_spec)
        recipe = load_recipe(config) if config else {}
        opts = dict((recipe.get("method") or {}).get("options") or {})
        opts.update(parse_options(option))
        train_opts = dict(recipe.get("train") or {})
        flags = {
            "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
            "warmup_steps": warmup_steps, "lr_schedule": lr_schedule, "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm, "seed": seed, "mixed_precision": mixed_precision, "distributed": distributed,
            "gradient_checkpointing": gradient_checkpointing, "eval_every": eval_every, "save_every": save_every,
            "resume": resume, "tensorboard": tensorboard,
        }
        train_opts.update({k: v for k, v in flags.items() if v is not None})
        max_len = max_length or train_opts.pop("max_length", None) or recipe.get("max_length") or 256
        train_opts.setdefault("max_steps", 100)
        model_name = model or recipe.get("model")
        method_name = method or (recipe.get("method") or {}).get("name")
        task_name = task or recipe.get("task")
        data_path = data or (Path(recipe["data"]) if recipe.get("data") else None)
        out = output_dir or (Path(recipe["output_dir"]) if recipe.get("output_dir") else None)
        adapter_dir = adapter or (Path(recipe["adapter"]) if recipe.get("adapter") else None)
        missing = [n for n, v in (("--model", model_name), ("--output-dir", out)) if not v]
        if not method_name and not adapter_dir:
            missing.append("--method")
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (give the flag or put it in --config)")
        if bool(task_name) == bool(data_path):
            raise ValueError("give exactly one of --task (a built-in task) or --data (your file or folder)")
        known = set(TrainConfig.__dataclass_fields__)
        bad = sorted(set(train_opts) - known)
        if bad:
            raise ValueError(f"unknown train option(s) {bad}; known: {sorted(known)}")
        cfg = TrainConfig(**train_opts, output_dir=str(out), progress=progress)
        from .pipeline import run_training

        summary = run_training(
            model_name=model_name, method_name=method_name, method_options=opts, task=task_name,
            data_path=str(data_path) if data_path else None, max_length=max_len, train_config=cfg,
            eval_samples=eval_samples, adapter=str(adapter_dir) if adapter_dir else None,
            val_fraction=val_fraction if val_fraction is not None else float(recipe.get("val_fraction", 0.1)),
            packing=packing if packing is not None else bool(recipe.get("packing", False)),
            save_merged=save_merged, base_dtype=base_dtype or recipe.get("base_dtype"),
            quantize=quantize_options(recipe.get("quantize"), quantize, double_quant, quant_compute_dtype,
                                      quantize_head),
        )
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        _fail(e.args[0] if e.args else str(e))
    from .dist import rank

    if rank() == 0:  # one summary for a distributed run
        typer.echo(json.dumps(summary, indent=2))


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the adapter's)"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="adapter folder (leantune or PEFT)"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt text, repeatable"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
    base_dtype: Optional[str] = typer.Option(None, "--base-dtype", help="auto | fp32 | bf16 | fp16 (default: as trained)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8 | none: load the frozen "
                                           "base quantized with bitsandbytes (default: as the adapter was trained)"),
):
    """Greedy generation from a base model, with an adapter if given."""
    from .pipeline import load_for_inference

    try:
        _use_family_specs(family_spec)
        m, tok = load_for_inference(model, str(adapter) if adapter else None, base_dtype, quantize)
        from .data.evaluate import greedy_generate

        outs = greedy_generate(m, tok, list(prompt), max_new_tokens)
    except (ValueError, KeyError, RuntimeError) as e:
        _fail(e.args[0] if e.args else str(e))
    for p, o in zip(prompt, outs, strict=True):
        typer.echo(p + o)


@app.command("eval")
def evaluate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the adapter's)"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="adapter folder (leantune or PEFT)"),
    task: Optional[str] = typer.Option(None, "--task", help="a built-in task, e.g. builtin:arith"),
    data: Optional[str] = typer.Option(None, "--data", help="your data: JSONL/CSV/datasets folder or hf:NAME"),
    split: Optional[str] = typer.Option(None, "--split", help="task: test (default), shifted, train; data: all "
                                        "(default for a file), validation, train, or a dataset's split name"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N examples of the split"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="default: longest answer + 1"),
    max_length: int = typer.Option(1024, "--max-length", help="tokens per example for the loss"),
    seed: int = typer.Option(0, "--seed", help="the training seed (for --split validation of a file)"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="as in training (for --split validation)"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
    base_dtype: Optional[str] = typer.Option(None, "--base-dtype", help="auto | fp32 | bf16 | fp16 (default: as trained)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8 | none: load the frozen "
                                           "base quantized with bitsandbytes (default: as the adapter was trained)"),
):
    """Greedy generation and exact match (whitespace-normalized), and the mean token loss, on one split."""
    from .pipeline import run_evaluation

    try:
        _use_family_specs(family_spec)
        res = run_evaluation(
            model_name=model, adapter=str(adapter) if adapter else None, task=task, data_path=data, split=split,
            limit=limit, max_new_tokens=max_new_tokens, max_length=max_length, seed=seed, val_fraction=val_fraction,
            base_dtype=base_dtype, quantize=quantize,
        )
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        _fail(e.args[0] if e.args else str(e))
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    loss = "n/a" if res["loss"] is None else f"{res['loss']:.4f}"
    typer.echo(f"accuracy {res['accuracy']:.4f} on {res['n']} examples ({res['split']}), loss {loss}")


@app.command()
def export(
    adapter: Path = typer.Argument(..., help="adapter folder (leantune or PEFT)"),
    fmt: str = typer.Option(..., "--format", help="merged (a plain transformers model) | peft (a PEFT folder: LoRA; IA3 for ia3, LoKr for krona)"),
    output_dir: Path = typer.Option(..., "--output-dir", help="a new or empty folder"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the adapter's)"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
    target: str = typer.Option("peft", "--target", help="peft | vllm: with --format peft, a folder vLLM loads "
                               "(rank padded to one vLLM accepts, no DoRA) and the `vllm serve` line, or why not"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8 | none: load the frozen "
                                           "base quantized with bitsandbytes (default: as the adapter was trained)"),
):
    """Write an adapter as a merged Hugging Face model folder or as a Hugging Face PEFT LoRA folder."""
    from .pipeline import export_adapter

    try:
        _use_family_specs(family_spec)
        res = export_adapter(str(adapter), fmt, output_dir, model_name=model, target=target, quantize=quantize)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        _fail(e.args[0] if e.args else str(e))
    typer.echo(json.dumps(res, indent=2))


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="machine-readable list")):
    """List the registered methods with their family, capabilities and options."""
    from .methods import list_methods

    rows = [cls.describe() for cls in list_methods()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="leantune methods")
    for col in ("name", "family", "mergeable", "schedule", "overhead"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    for r in rows:
        c = r["capabilities"]
        table.add_row(r["name"], r["family"], "yes" if c["mergeable"] else "no",
                      "yes" if c["needs_schedule"] else "no", c["inference_overhead"], r["description"])
    Console(width=max(Console().width, 140)).print(table)


@app.command()
def models():
    """List the built-in models."""
    from .models import BUILTIN_MODELS

    for name, entry in sorted(BUILTIN_MODELS.items()):
        typer.echo(f"builtin:{name}\t{entry.description}")


@app.command()
def tasks():
    """List the built-in tasks."""
    from .data.tasks import get_task, list_tasks

    for name in list_tasks():
        typer.echo(f"{name}\t{get_task(name).description}")


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="the demo: 1 seed, short budget (about 10 min on 2 CPU cores)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model for quality (default builtin:base)"),
    task: Optional[str] = typer.Option(None, "--task", help="built-in task (default builtin:world)"),
    methods_: Optional[str] = typer.Option(None, "--methods", help="comma list, e.g. full,lora,peft:lora,s2ft "
                                            "(peft:<type>: any PEFT type, e.g. peft:loha)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps per quality run"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="seeds per method (quick: 1, default: 3)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="test examples per split"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="where results.json/.md and plots go"),
    sweep: bool = typer.Option(False, "--sweep", help="a small LR sweep per method (picked on held-back train data)"),
    efficiency_model: Optional[str] = typer.Option(None, "--efficiency-model", help="e.g. hidden=512,layers=8"),
    timing_rounds: Optional[int] = typer.Option(None, "--timing-rounds", help="interleaved timing rounds"),
    keep_adapters: bool = typer.Option(False, "--keep-adapters", help="keep the trained adapters under work/"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads in each job"),
    default_lrs: bool = typer.Option(False, "--default-lrs", help="each method's own default LR, also on builtin:base"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8: also a row on a quantized "
                                           "base for each method that trains on one (or name rows lora+nf4)"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
    suite: Optional[str] = typer.Option(None, "--suite", help="survey: the survey's 16 configurations + BitFit, "
                                        "S2FT, LISA, Light-PEFT (20 rows); with --quick one task, else all three"),
):
    """Methods head to head on one base, task and budget: quality, memory, FLOPs, time, inference overhead."""
    from .measure.bench import JobFailed, config_from_options, run_bench

    try:
        _use_family_specs(family_spec)
        preset = None
        if suite:
            from .measure.suite import suite_config

            preset = suite_config(suite, quick=quick)
        cfg = config_from_options(
            quick=quick, base=base, task=task, methods=methods_, max_steps=max_steps, seeds=seeds,
            batch_size=batch_size, eval_samples=eval_samples, output_dir=str(output_dir) if output_dir else None,
            sweep=sweep, efficiency_model=efficiency_model, timing_rounds=timing_rounds,
            keep_adapters=keep_adapters, threads=threads, default_lrs=default_lrs, preset=preset, quantize=quantize,
        )
        _, failed = run_bench(cfg)
    except (ValueError, KeyError, JobFailed) as e:
        _fail(e.args[0] if e.args else str(e))
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(
    model: str = typer.Option(..., "--model", "-m", help="the base model every adapter was trained on"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH: an adapter folder served as NAME, repeatable"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="the most tokens one request may generate"),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens", help="the longest prompt, in tokens"),
    queue_size: int = typer.Option(256, "--queue-size", help="requests waiting or running; more get 429"),
    request_timeout: float = typer.Option(120.0, "--request-timeout", help="seconds from arrival to the last token"),
    max_batch: int = typer.Option(32, "--max-batch", help="rows decoded together in one step"),
    group_steps: int = typer.Option(4, "--group-steps", help="steps a group of rows keeps its turn while others "
                                    "wait (switch-only adapters switch once per turn)"),
    admin_token_env: Optional[str] = typer.Option(None, "--admin-token-env", help="name of an environment variable "
                                                  "holding the admin token; turns on POST/DELETE /admin/adapters"),
    base_dtype: Optional[str] = typer.Option(None, "--base-dtype", help="auto | fp32 | bf16 | fp16"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8 | none: load the frozen "
                                           "base quantized with bitsandbytes (default: as the adapters were trained)"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
):
    """An OpenAI-compatible server: the base and every adapter, requests batched together (docs/serving.md)."""
    import os

    from .serve.server import require_serve_extra

    try:
        require_serve_extra()
    except ImportError as e:
        _fail(str(e))
    from .serve.engine import Limits
    from .serve.server import create_app, load_bank, parse_adapters, run

    token = None
    if admin_token_env:
        token = os.environ.get(admin_token_env)
        if not token:
            _fail(f"--admin-token-env {admin_token_env}: that environment variable is empty or unset")
    try:
        limits = Limits(max_new_tokens=max_new_tokens, default_new_tokens=min(64, max_new_tokens),
                        max_prompt_tokens=max_prompt_tokens, queue_size=queue_size,
                        request_timeout_s=request_timeout, max_batch=max_batch, group_steps=group_steps)
        _use_family_specs(family_spec)
        bank, tok = load_bank(model, parse_adapters(adapter), base_dtype, quantize)
        server_app = create_app(bank, tok, limits, admin_token=token, base_name=model)  # refuses T5-style models
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        _fail(e.args[0] if e.args else str(e))
    run(server_app, host=host, port=port)


@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m", help="hub id, local folder, config.json, builtin:NAME or "
                              "builtin:efficiency (no weights are read)"),
    method: Optional[str] = typer.Option(None, "--method", help="a method name (see `leantune methods`)"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option key=value, repeatable"),
    batch_size: int = typer.Option(1, "--batch-size"),
    seq_len: int = typer.Option(512, "--seq-len", "--max-length", help="tokens per example"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no | bf16 | fp16"),
    base_dtype: str = typer.Option("auto", "--base-dtype", help="auto (the config's) | fp32 | bf16 | fp16"),
    distributed: str = typer.Option("no", "--distributed", help="no | ddp | fsdp"),
    world_size: int = typer.Option(1, "--world-size", help="processes (with --distributed)"),
    device: str = typer.Option("cuda", "--device", help="cuda (default) or cpu: what to plan for"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4 | fp4 | int8: the base's linear layers "
                                           "quantized with bitsandbytes (QLoRA)"),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="e.g. 24GB: what fits, per method"),
    prune_plan: Optional[Path] = typer.Option(None, "--prune-plan", help="a finished Light-PEFT run's adapter "
                                              "folder: plan its real prune instead of the bound"),
    compare: bool = typer.Option(False, "--compare", help="every method side by side (and a plot with --plot)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="with --compare: peak memory vs sequence length, PNG"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output (bytes)"),
    family_spec: list[Path] = typer.Option([], "--family-spec", help="a YAML file describing a model family "
                                           "leantune does not know (docs/models.md), repeatable"),
):
    """Training memory per method from the model's config alone: weights, gradients, optimizer state, saved
    activations and the step's peak, traced with fake tensors (nothing is allocated)."""
    from .measure import plan as planner
    from .measure.plan_report import plot_peaks, render

    try:
        _use_family_specs(family_spec)
        settings = planner.PlanSettings(
            batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing,
            mixed_precision=mixed_precision, base_dtype=base_dtype, device=device, distributed=distributed,
            world_size=world_size, quantize=quantize)
        budget = planner.parse_bytes(device_memory) if device_memory else None
        options = parse_options(option)
        if not compare and not method:
            raise ValueError("give --method NAME, or --compare for every method")
        if plot is not None and not compare:
            raise ValueError("--plot draws every method: use it with --compare")
        progress = None if as_json else (lambda name: typer.echo(f"planning {name} ...", err=True))
        if compare:
            methods_ = [method] if method else None
            plans = planner.compare_methods(model, settings, methods_, options, budget, progress=progress)
        else:
            pp = planner.prune_plan_from(prune_plan) if prune_plan else None
            plans = [planner.plan_method(model, method, options, settings, prune_plan=pp, device_memory=budget)]
        if plot is not None:
            plot_peaks(model, settings, plans, plot)
    except (ValueError, KeyError, RuntimeError) as e:
        _fail(e.args[0] if e.args else str(e))
    typer.echo(render(model, settings, plans, budget, as_json=as_json))


base_app = typer.Typer(no_args_is_help=True, help="The built-in pretrained base model (builtin:base).")
app.add_typer(base_app, name="base")


@base_app.command("build")
def base_build(
    output_dir: Path = typer.Option(..., "--output-dir", help="where the rebuilt base goes"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps", help="pretraining steps (default: the recipe's)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Pretrain builtin:base from its recipe (seeded; about 40 minutes on 2 CPU cores). Load the result with
    `--model OUTPUT_DIR`; the shipped weights carry the same recipe hash."""
    from .base.build import build_base

    overrides = {"train": {"steps": steps}} if steps is not None else {}
    try:
        info = build_base(output_dir, seed=seed, progress=progress, threads=threads, **overrides)
    except (ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps({k: v for k, v in info.items() if k != "recipe"}, indent=2))


@base_app.command("info")
def base_info_cmd(path: Optional[Path] = typer.Option(None, "--path", help="a built folder (default: shipped)")):
    """The shipped base's recipe, hash, size and losses."""
    from .base import base_info

    try:
        typer.echo(json.dumps(base_info(path), indent=2))
    except FileNotFoundError as e:
        _fail(f"no recipe.json there: {e.filename}")


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
