"""The evaluator: greedy generation and exact match. Training's periodic eval, `leantune eval` and the bench
all call :func:`generate_accuracy`."""

from __future__ import annotations

import re

import torch

from .encode import Example, bos_prefix, decoder_start, left_pad


def normalize(text: str) -> str:
    """Whitespace runs become one space, ends stripped: what exact match compares."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Left-padded batched greedy decoding; returns the decoded continuations (an encoder-decoder's decoder output:
    the encoder reads the prompt as training encoded it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq2seq = decoder_start(model) is not None
    eos = tokenizer.eos_token_id
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        if seq2seq:
            chunk = [c + [eos] if eos is not None and c[-1:] != [eos] else c for c in chunk]
        else:
            chunk = [bos_prefix(tokenizer, c) + c for c in chunk]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        # a causal LM returns prompt + continuation; an encoder-decoder the decoder start token + continuation
        for row in gen[:, 1:] if seq2seq else gen[:, width:]:
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


@torch.no_grad()
def eval_loss(model, tokenizer, examples: list[Example], max_length: int, batch_size: int = 16) -> dict:
    """``{"loss": mean token loss over the responses (as training computes it), "loss_tokens", "too_long"}``;
    examples longer than ``max_length`` are counted in ``too_long`` and left out (loss None when none fit)."""
    from ..train.loop import token_loss_sum  # the training loss itself, so the two are comparable
    from .encode import collate, encode_example

    start = decoder_start(model)
    encoded = [e for ex in examples if (e := encode_example(tokenizer, ex.prompt, ex.response, max_length, start))]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], tokenizer.pad_token_id).items()}
        loss_sum, n = token_loss_sum(model, batch, causal=start is None)
        total, tokens = total + float(loss_sum), tokens + n
    model.train(was_training)
    return {"loss": total / tokens if tokens else None, "loss_tokens": tokens, "too_long": len(examples) - len(encoded)}
