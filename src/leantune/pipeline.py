"""The straight line the CLI walks: recipe -> base model -> method -> data -> loop -> adapter folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import export, io
from .api import apply
from .data.encode import decoder_start, encode_examples
from .data.evaluate import eval_loss, generate_accuracy
from .data.tasks import get_task
from .models import load_model
from .models import model_name as name_of
from .quant import quantization_of
from .train.loop import TrainConfig, seed_everything, train


def load_training_data(tokenizer, task: str | None, data_path: str | None, max_length: int, seed: int,
                       val_fraction: float = 0.1, report: dict | None = None, start: int | None = None):
    """(encoded train examples, held-out Examples for evaluation, scorer, max_new_tokens, source name).
    ``report`` (a dict, when given) receives the example count and how many were too long; ``start``: an
    encoder-decoder's decoder start token (seq2seq encoding, :func:`data.encode.decoder_start`)."""
    if task:
        t = get_task(task, seed=0)
        train_ex, test_ex = t.split("train"), t.split("test")
        encoded = encode_examples(tokenizer, train_ex, max_length, task, start)
        if report is not None:
            report.update(examples=len(train_ex), too_long=len(train_ex) - len(encoded))
        return encoded, test_ex, t.score, t.max_new_tokens, task
    from .data.files import load_examples_split

    train_ex, val_ex = load_examples_split(data_path, tokenizer, seed=seed, val_fraction=val_fraction)
    encoded = encode_examples(tokenizer, train_ex, max_length, data_path, start)
    if report is not None:
        report.update(examples=len(train_ex), too_long=len(train_ex) - len(encoded))
    # the longest answer plus one token: enough to match it, and to see a longer prediction differ
    max_new = 1 + max((len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in val_ex), default=63)
    return encoded, val_ex, None, max_new, data_path


def run_training(*, model_name: str, method_name: str | None, method_options: dict, task: str | None,
                 data_path: str | None, max_length: int, train_config: TrainConfig, eval_samples: int = 64,
                 adapter: str | None = None, val_fraction: float = 0.1, packing: bool = False,
                 save_merged: bool = False, base_dtype: str | None = None, quantize=None) -> dict:
    seed_everything(train_config.seed)  # the method's initial weights (LoRA's A) come from this seed
    model, tokenizer = load_model(model_name, dtype=base_dtype, quantize=quantize)
    if adapter:
        method = load_adapter(model, adapter, trainable=True)
        if method_name and method_name != method.name:
            raise ValueError(f"--method {method_name!r} but the adapter {adapter!r} is a {method.name!r} adapter")
    else:
        method = apply(model, method_name, **method_options)
    if not method.anatomy.generative:
        raise ValueError(
            f"{model_name!r} is an encoder ({method.anatomy.model_type}); leantune's generative training needs a "
            "causal or a seq2seq LM. Use the Python API with your own loss for encoders."
        )
    if save_merged and (why := method.merged_export_refusal()):
        raise ValueError(f"--save-merged: {why}")
    report: dict = {}
    data, held_out, scorer, max_new, source = load_training_data(
        tokenizer, task, data_path, max_length, train_config.seed, val_fraction, report, decoder_start(model))
    if packing:
        from .data.files import check_packing, pack_examples

        check_packing(model)
        data = pack_examples(data, max_length)
    held_out = held_out[:eval_samples]

    def eval_fn(m):
        if not held_out:
            return {}
        res = generate_accuracy(m, tokenizer, held_out, max_new_tokens=max_new, scorer=scorer)
        return {**res, "loss": eval_loss(m, tokenizer, held_out, max_length)["loss"]}

    t0 = time.perf_counter()
    result = train(model, data, train_config, pad_id=tokenizer.pad_token_id, eval_fn=eval_fn)
    losses = [r["loss"] for r in result.history if "loss" in r]
    final_eval = next((r for r in reversed(result.history) if "eval_accuracy" in r), {})
    summary_counts = (method.num_trainable(), method.num_changed())
    merged = None
    quant = quantization_of(model)  # before a merged export dequantizes the model
    if save_merged:
        if not result.output_dir:
            raise ValueError("--save-merged needs --output-dir (the merged model goes to OUTPUT_DIR/merged)")
        merged = export.save_merged(model, tokenizer, Path(result.output_dir) / "merged")
    return {
        "method": method.name,
        "model": model_name,
        "data": source,
        "output_dir": result.output_dir,
        "steps": result.steps,
        "trainable_params": summary_counts[0],
        "changed_params": summary_counts[1],
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_accuracy": final_eval.get("eval_accuracy"),
        "eval_n": final_eval.get("eval_n"),
        "eval_loss": final_eval.get("eval_loss"),
        "examples": report["examples"],
        "skipped_too_long": report["too_long"],
        "packed_rows": len(data) if packing else None,
        "seconds": round(time.perf_counter() - t0, 2),
        **({"merged": merged} if merged else {}),
        **({"quantization": quant.to_dict()} if quant is not None else {}),
    }


def load_adapter(model, adapter: str, trainable: bool = False):
    """A leantune adapter folder, or a Hugging Face PEFT LoRA folder imported as leantune LoRA, onto ``model``."""
    from .interop.peft import is_peft_folder, load_peft

    if is_peft_folder(adapter):
        return load_peft(model, adapter, trainable=trainable)
    return io.load(model, adapter, trainable=trainable)


def load_for_inference(model_name: str | None, adapter: str | None, base_dtype: str | None = None, quantize=None):
    """The base (in ``base_dtype``; by default the dtype the adapter was trained on, else the checkpoint's) with
    the adapter loaded, in eval mode. ``quantize``: None loads the base quantized the way the adapter was trained
    (its leantune.json says), ``"none"`` in full precision, ``"nf4"``/``"fp4"``/``"int8"`` that way."""
    if model_name is None:
        if adapter is None:
            raise ValueError("give --model, or --adapter whose leantune.json names its base model")
        from .interop.peft import is_peft_folder, peft_base_name

        model_name = peft_base_name(adapter) if is_peft_folder(adapter) else (io.read_meta(adapter).get("base") or {}).get("name")
        if not model_name:
            raise ValueError(f"adapter {adapter!r} does not name its base model; give --model")
    if adapter and not _is_peft(adapter):
        base = io.read_meta(adapter).get("base") or {}
        base_dtype = base_dtype if base_dtype is not None else base.get("dtype")
        quantize = quantize if quantize is not None else base.get("quantization")
    model, tokenizer = load_model(model_name, dtype=base_dtype, quantize=quantize)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def run_evaluation(*, model_name: str | None, adapter: str | None, task: str | None, data_path: str | None,
                   split: str | None = None, limit: int | None = None, max_new_tokens: int | None = None,
                   max_length: int = 1024, seed: int = 0, val_fraction: float = 0.1,
                   base_dtype: str | None = None, quantize=None) -> dict:
    """``leantune eval``: greedy generation with exact match (whitespace-normalized) and the mean token loss on
    one split of a built-in task (default ``test``) or of your data (see ``data.files.split_rows``)."""
    from .anatomy import anatomy

    if bool(task) == bool(data_path):
        raise ValueError("give exactly one of --task (a built-in task) or --data (your file or folder)")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    model, tokenizer = load_for_inference(model_name, adapter, base_dtype, quantize)
    if not anatomy(model).generative:
        raise ValueError(f"{name_of(model)!r} is an encoder; `leantune eval` generates text and needs a causal or "
                         "a seq2seq LM")
    if task:
        t = get_task(task, seed=0)
        split = split or "test"
        examples, scorer = t.split(split)[:limit], t.score
        max_new = max_new_tokens or t.max_new_tokens
    else:
        from .data.files import default_split, read_source, split_rows, to_examples

        src = read_source(data_path)
        split = split or default_split(src)
        examples = to_examples(split_rows(src, split, seed, val_fraction)[:limit], tokenizer)
        if not examples:
            raise ValueError(f"{data_path}: split {split!r} has no rows; nothing to evaluate")
        scorer = None
        max_new = max_new_tokens or 1 + max(len(tokenizer(e.response, add_special_tokens=False)["input_ids"])
                                            for e in examples)  # as in training's periodic eval
    acc = generate_accuracy(model, tokenizer, examples, max_new_tokens=max_new, scorer=scorer)
    loss = eval_loss(model, tokenizer, examples, max_length)
    return {
        "accuracy": acc["accuracy"],
        "n": acc["n"],
        "loss": loss["loss"],
        "loss_tokens": loss["loss_tokens"],
        "too_long": loss["too_long"],
        "task" if task else "data": task or data_path,
        "split": split,
        "model": name_of(model),
        "adapter": adapter,
        "max_new_tokens": max_new,
        **({"quantization": quantization_of(model).to_dict()} if quantization_of(model) is not None else {}),
        "examples": acc["examples"],
    }


def _is_peft(adapter: str) -> bool:
    from .interop.peft import is_peft_folder

    return is_peft_folder(adapter)


EXPORT_FORMATS = ("merged", "peft")


def export_adapter(adapter: str, fmt: str, output_dir: str | os.PathLike, model_name: str | None = None,
                   target: str = "peft", quantize=None) -> dict:
    """``leantune export``: load the base (``model_name``, default the one the adapter names) with the adapter and
    write ``fmt`` to ``output_dir``; returns a summary. ``target="vllm"`` (with ``fmt="peft"``): a folder vLLM
    loads (rank padded to one vLLM accepts, no DoRA) and the ``vllm serve`` line for it, or the reason it cannot."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if target != "peft" and fmt != "peft":
        raise ValueError(f"--target {target} applies to --format peft")
    out = Path(output_dir)
    export.empty_output(out)
    model, tokenizer = load_for_inference(model_name, adapter, quantize=quantize)
    method = model.leantune_method
    name = method.name
    serve = {}
    if fmt == "peft":
        from .interop.peft import export_peft

        export_peft(model, out, target=target)
        if target == "vllm":
            rank = json.loads((out / "adapter_config.json").read_text())["r"]
            base = name_of(model) or "BASE"
            serve = {"target": "vllm", "rank": rank,
                     "serve": f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules "
                              f"{out.name}={out.resolve()}"}
    else:
        merged = export.save_merged(model, tokenizer, out)
    return {
        **({k: merged[k] for k in ("kind", "reason", "quantization_note") if k in merged} if fmt == "merged" else {}),
        **serve,
        "format": fmt,
        "method": name,
        "adapter": str(adapter),
        "output_dir": str(out),
        "files": sorted(p.name for p in out.iterdir()),
    }
