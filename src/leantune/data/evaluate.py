"""The evaluator: greedy generation and exact match. Training's periodic eval, `leantune eval` and the bench
all call :func:`generate_accuracy`."""

from __future__ import annotations

import torch

from .encode import Example
from .tasks import normalize


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Left-padded batched greedy decoding; returns the decoded continuations."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            ids[j, width - len(c):] = torch.tensor(c)
            mask[j, width - len(c):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return out


def generate_accuracy(model, tokenizer, examples: list[Example], max_new_tokens: int = 8, scorer=None,
                      batch_size: int = 32) -> dict:
    """``{"accuracy": fraction in [0, 1], "n": count, "examples": first few (prompt, prediction, target)}``."""
    if not examples:
        raise ValueError("nothing to evaluate: the split is empty")
    preds = greedy_generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    if scorer is None:
        def scorer(p, e):
            return normalize(p) == normalize(e.response)
    hits = [bool(scorer(p, e)) for p, e in zip(preds, examples, strict=True)]
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "examples": [
            {"prompt": e.prompt, "prediction": p, "target": e.response} for p, e in list(zip(preds, examples, strict=True))[:3]
        ],
    }
