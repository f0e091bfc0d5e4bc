"""Prompt/response pairs to token ids with a loss mask over the response only.

A causal LM reads one sequence (BOS + prompt + response + EOS, loss on the response); an encoder-decoder (T5) reads
the prompt in its encoder (prompt + EOS) and predicts the response with its decoder (labels = response + EOS,
decoder input = the labels shifted right behind the model's decoder start token)."""

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


def decoder_start(model) -> int | None:
    """The decoder start token of an encoder-decoder model (what seq2seq encoding needs), None for any other."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise DataError(f"{type(model).__name__}: an encoder-decoder whose config has no decoder_start_token_id; "
                        "set it in config.json (T5: the pad token id, 0)")
    return int(start)


def encode_example(tokenizer, prompt: str, response: str, max_length: int,
                   decoder_start: int | None = None) -> dict | None:
    """``{"input_ids", "labels"}``: BOS + prompt + response + EOS, labels = -100 outside the response (+EOS).
    With ``decoder_start`` (an encoder-decoder, :func:`decoder_start`): ``{"input_ids": prompt + EOS, "labels":
    response + EOS, "decoder_input_ids": [start] + labels[:-1]}``.

    Returns None when the example does not fit in ``max_length`` (the caller counts and reports it)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and r[-1:] != [tokenizer.eos_token_id] else []
    if decoder_start is not None:
        eos_id = tokenizer.eos_token_id
        enc = p + ([eos_id] if eos_id is not None and p[-1:] != [eos_id] else [])  # T5 ends its input with EOS
        labels = r + eos
        if len(enc) > max_length or len(labels) > max_length:
            return None
        return {"input_ids": enc, "labels": labels, "decoder_input_ids": [decoder_start] + labels[:-1]}
    bos = bos_prefix(tokenizer, p)
    ids = bos + p + r + eos
    if len(ids) > max_length:
        return None
    labels = [IGNORE] * (len(bos) + len(p)) + r + eos
    return {"input_ids": ids, "labels": labels}


def encode_examples(tokenizer, examples, max_length: int, source: str = "data",
                    decoder_start: int | None = None) -> list[dict]:
    """Encode many (seq2seq with ``decoder_start``); too-long examples are dropped and reported with their count
    (never silently)."""
    out, too_long = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex.prompt, ex.response, max_length, decoder_start)
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
    if "decoder_input_ids" in batch[0]:
        return _collate_seq2seq(batch, pad_id)
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


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-padded tensor, mask of the real entries)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return out, mask


def _collate_seq2seq(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder inputs and decoder inputs padded each to their own width; labels -100 on the decoder's padding."""
    ids, mask = _pad([b["input_ids"] for b in batch], pad_id)
    dec, dec_mask = _pad([b["decoder_input_ids"] for b in batch], pad_id)
    labels, _ = _pad([b["labels"] for b in batch], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask,
            "labels": labels}


def left_pad(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch: ``(input_ids, attention_mask)``, both (len(seqs), longest)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[j, width - len(s):] = 1
    return ids, mask
