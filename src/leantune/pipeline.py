"""The straight line the CLI walks: recipe -> base model -> method -> data -> loop -> adapter folder."""

from __future__ import annotations

import time

from . import io
from .api import apply
from .data.encode import encode_examples
from .data.evaluate import generate_accuracy
from .data.tasks import get_task
from .models import load_model
from .train.loop import TrainConfig, seed_everything, train


def load_training_data(tokenizer, task: str | None, data_path: str | None, max_length: int, seed: int):
    """(encoded train examples, held-out Examples for evaluation, scorer, max_new_tokens, source name)."""
    if task:
        t = get_task(task, seed=0)
        train_ex, test_ex = t.split("train"), t.split("test")
        return encode_examples(tokenizer, train_ex, max_length, task), test_ex, t.score, t.max_new_tokens, task
    from .data.files import load_examples_split

    train_ex, val_ex = load_examples_split(data_path, tokenizer, seed=seed)
    return encode_examples(tokenizer, train_ex, max_length, data_path), val_ex, None, 64, data_path


def run_training(*, model_name: str, method_name: str | None, method_options: dict, task: str | None,
                 data_path: str | None, max_length: int, train_config: TrainConfig, eval_samples: int = 64,
                 adapter: str | None = None) -> dict:
    seed_everything(train_config.seed)  # the method's initial weights (LoRA's A) come from this seed
    model, tokenizer = load_model(model_name)
    if adapter:
        method = load_adapter(model, adapter, trainable=True)
        if method_name and method_name != method.name:
            raise ValueError(f"--method {method_name!r} but the adapter {adapter!r} is a {method.name!r} adapter")
    else:
        method = apply(model, method_name, **method_options)
    if not method.anatomy.causal:
        raise ValueError(
            f"{model_name!r} is an encoder ({method.anatomy.model_type}); leantune's generative training needs a "
            "causal LM. Use the Python API with your own loss for encoders."
        )
    data, held_out, scorer, max_new, source = load_training_data(
        tokenizer, task, data_path, max_length, train_config.seed)
    held_out = held_out[:eval_samples]

    def eval_fn(m):
        return generate_accuracy(m, tokenizer, held_out, max_new_tokens=max_new, scorer=scorer) if held_out else {}

    t0 = time.perf_counter()
    result = train(model, data, train_config, pad_id=tokenizer.pad_token_id, eval_fn=eval_fn)
    losses = [r["loss"] for r in result.history if "loss" in r]
    final_eval = next((r for r in reversed(result.history) if "eval_accuracy" in r), {})
    return {
        "method": method.name,
        "model": model_name,
        "data": source,
        "output_dir": result.output_dir,
        "steps": result.steps,
        "trainable_params": method.num_trainable(),
        "changed_params": method.num_changed(),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_accuracy": final_eval.get("eval_accuracy"),
        "eval_n": final_eval.get("eval_n"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def load_adapter(model, adapter: str, trainable: bool = False):
    """A leantune adapter folder (or, once imported, a PEFT one) onto ``model``."""
    return io.load(model, adapter, trainable=trainable)


def load_for_inference(model_name: str | None, adapter: str | None):
    if model_name is None:
        if adapter is None:
            raise ValueError("give --model, or --adapter whose leantune.json names its base model")
        model_name = (io.read_meta(adapter).get("base") or {}).get("name")
        if not model_name:
            raise ValueError(f"adapter {adapter!r} does not name its base model; give --model")
    model, tokenizer = load_model(model_name)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer
