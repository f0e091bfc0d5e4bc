"""Prompt/response pairs to token ids with a loss mask over the response only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


class DataError(ValueError):
    pass


def bos_prefix(tokenizer, ids: list[int]) -> list[int]:
    """``[BOS]`` to put before ``ids``, or ``[]`` when they already start with it (chat templates often emit it)."""
    bos = tokenizer.bos_token_id
    return [] if bos is None or ids[:1] == [bos] else [bos]


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> dict | None:
    """``{"input_ids", "labels"}``: BOS + prompt + response + EOS, labels = -100 outside the response (+EOS).

    Returns None when the example does not fit in ``max_length`` (the caller counts and reports it)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    bos = bos_prefix(tokenizer, p)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and r[-1:] != [tokenizer.eos_token_id] else []
    ids = bos + p + r + eos
    if len(ids) > max_length:
        return None
    labels = [IGNORE] * (len(bos) + len(p)) + r + eos
    return {"input_ids": ids, "labels": labels}


def encode_examples(tokenizer, examples, max_length: int, source: str = "data") -> list[dict]:
    """Encode many; too-long examples are dropped and reported with their count (never silently)."""
    out, too_long = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex.prompt, ex.response, max_length)
        if enc is None:
            too_long += 1
        else:
            out.append(enc)
    if not out:
        raise DataError(
            f"{source}: no usable examples ({too_long} of {len(examples)} longer than max_length={max_length}); "
            "raise --max-length or shorten the data"
        )
    if too_long:
        import logging

        logging.getLogger("leantune").warning(
            "%s: skipped %d of %d examples longer than max_length=%d", source, too_long, len(examples), max_length
        )
    return out


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors (labels -100 on padding)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "position_ids" in batch[0]:  # packed rows (data.files.pack_examples): positions restart per example
        out["position_ids"] = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            out["position_ids"][i, :len(b["position_ids"])] = torch.tensor(b["position_ids"])
    return out
