"""Quality of one fine-tune on the pretrained base: accuracy on the task's test and shifted splits, and
forgetting (held-out pretraining loss after fine-tuning minus before), all through leantune's own loop and its
one evaluator (``data/evaluate.py: generate_accuracy``, the same as training's periodic eval)."""

from __future__ import annotations

from ..data.encode import encode_examples
from ..data.evaluate import generate_accuracy
from ..data.tasks import Task


def accuracy(model, tokenizer, task: Task, split: str, limit: int | None = None) -> float:
    examples = task.split(split)[:limit] if limit else task.split(split)
    res = generate_accuracy(model, tokenizer, examples, max_new_tokens=task.max_new_tokens, scorer=task.score)
    return float(res["accuracy"])


def heldout_loss(model, tokenizer, base_name: str) -> float | None:
    """Loss on held-out pretraining text (``data.tasks.forgetting``) where leantune knows that text, i.e. for
    ``builtin:base``; None for other bases (a hub model's pretraining corpus is not at hand)."""
    if base_name != "builtin:base":
        return None
    from ..data.tasks import forgetting

    return float(forgetting(model, tokenizer))


def train_examples(tokenizer, task: Task, max_length: int, val_examples: int = 0, start: int | None = None):
    """(encoded training examples, held-back validation Examples). Validation examples come off the end of the
    train split, so a learning-rate sweep never picks by the test split. ``start``: an encoder-decoder's decoder
    start token (seq2seq encoding)."""
    train = task.split("train")
    if val_examples:
        if val_examples >= len(train):
            raise ValueError(f"task {task.name!r}: {val_examples} validation examples leave no training data")
        train, val = train[:-val_examples], train[-val_examples:]
    else:
        val = []
    return encode_examples(tokenizer, train, max_length, task.name, start), val
