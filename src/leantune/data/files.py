"""Your data as Examples: JSON Lines / JSON / CSV files, ``datasets`` folders and hub datasets; a seeded
validation split; packing of short examples.

A row is one of (detected per row by its keys):
  alpaca  ``{"instruction": str, "input": str (optional), "output": str}``
  chat    ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` ending with the
          assistant's answer (earlier turns are context; only the last answer carries a loss)
  pair    ``{"prompt": str, "completion": str}`` (or ``"response"``), used verbatim: no template
Alpaca and chat rows go through a prompt template (see :mod:`leantune.data.templates`).

Sources: ``*.jsonl`` (one JSON object a line), ``*.json`` (a JSON array, or JSON lines), ``*.csv`` / ``*.tsv``
(a header row; a ``messages`` column holds JSON), ``*.parquet``, a folder written by ``Dataset.save_to_disk``
(``datasets.load_from_disk``), any other folder that ``datasets.load_dataset`` reads (e.g. a folder of JSONL
files), or ``hf:NAME`` / ``hf:NAME:CONFIG`` for a dataset on the hub (or in the local datasets cache). A bad row is
an error that names the file, the line (or the row of a dataset) and the field.

Splits: a file is one flat list of rows ("all"); its ``train`` / ``validation`` splits are a seeded split by
fraction (the same seed and fraction always give the same rows). A dataset with named splits keeps them; when it
has no validation split (``validation``, ``valid``, ``val`` or ``dev``), one is taken from ``train`` by fraction.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .encode import IGNORE, DataError, Example, encode_examples
from .templates import ROLES, TemplateError, alpaca_messages, check_template, conversation_example

HUB_PREFIX = "hf:"
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
FORMATS_HINT = "instruction/input/output (alpaca), messages (chat) or prompt/completion"
log = logging.getLogger("leantune")


@dataclass(frozen=True)
class Row:
    where: str  # "file.jsonl:12" or "folder[train] row 3": what an error message names
    value: Any


@dataclass
class Source:
    name: str
    splits: dict[str, list[Row]]
    flat: bool  # one list of rows without named splits (a file, or a single saved Dataset)


class _FieldError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


# -- reading ------------------------------------------------------------------------------------------------


def read_source(source: str | Path) -> Source:
    """The raw rows of a file, folder or ``hf:`` dataset, by split; errors name the file and the line."""
    name = str(source)
    if name.startswith(HUB_PREFIX):
        return _from_datasets(_load_hub(name[len(HUB_PREFIX):]), name)
    path = Path(name)
    if not path.exists():
        raise DataError(
            f"data {name!r} does not exist; give a .jsonl, .json, .csv or .parquet file, a datasets folder, or "
            "hf:NAME for a dataset on the hub"
        )
    if path.is_dir():
        return _from_datasets(_load_folder(path), name)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_json_lines(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        return _from_datasets(_datasets().load_dataset("parquet", data_files=str(path), split="train"), name)
    else:
        raise DataError(f"data file {name!r}: unknown extension {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    if not rows:
        raise DataError(f"{name}: the file has no rows (it is empty); nothing to train or evaluate on")
    return Source(name, {"all": rows}, flat=True)


def _read_json_lines(path: Path) -> list[Row]:
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rows.append(Row(f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):
        return _read_json_lines(path)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return [Row(f"{path}: item {i}", v) for i, v in enumerate(items, 1)]


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            if header and not ({"instruction", "output", "messages", "prompt"} & set(header)):
                raise DataError(f"{path}:1: header has columns {header}; expected {FORMATS_HINT}")
            rows = []
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                if None in rec:
                    raise DataError(f"{where}: {len(rec[None])} more value(s) than the header has columns")
                if "messages" in rec and isinstance(rec["messages"], str):
                    try:
                        rec["messages"] = json.loads(rec["messages"])
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: field 'messages': not valid JSON ({e.msg})") from None
                rows.append(Row(where, rec))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not readable as CSV ({e})") from None
    return rows


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading datasets folders and hub datasets needs `pip install datasets`") from None
    return datasets


def _load_folder(path: Path):
    ds = _datasets()
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return ds.load_from_disk(str(path))
    try:
        return ds.load_dataset(str(path))
    except Exception as e:  # datasets raises many types for "cannot read this folder"
        raise DataError(
            f"data folder {str(path)!r}: neither a Dataset.save_to_disk folder nor data files that datasets can "
            f"read ({type(e).__name__}: {e})"
        ) from None


def _load_hub(spec: str):
    name, _, config = spec.partition(":")
    try:
        return _datasets().load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, gated: say which and what to do
        raise DataError(
            f"cannot load hub dataset {name!r}{f' (config {config!r})' if config else ''}: {type(e).__name__}: {e}. "
            "Offline, save it once with Dataset.save_to_disk and pass that folder."
        ) from None


def _from_datasets(obj, name: str) -> Source:
    ds = _datasets()
    if isinstance(obj, ds.Dataset):
        rows = [Row(f"{name} row {i}", r) for i, r in enumerate(obj, 1)]
        if not rows:
            raise DataError(f"{name}: the dataset has no rows; nothing to train or evaluate on")
        return Source(name, {"all": rows}, flat=True)
    if not isinstance(obj, ds.DatasetDict):
        raise DataError(f"{name}: expected a Dataset or DatasetDict, got {type(obj).__name__} (streaming is not supported)")
    splits = {split: [Row(f"{name}[{split}] row {i}", r) for i, r in enumerate(d, 1)] for split, d in obj.items()}
    empty = sorted(s for s, rows in splits.items() if not rows)
    if empty or not splits:
        raise DataError(f"{name}: split(s) {empty or '(none)'} have no rows; nothing to train or evaluate on")
    return Source(name, splits, flat=False)


# -- rows to examples ---------------------------------------------------------------------------------------


def row_example(row: Row, tokenizer, template: str = "auto") -> Example:
    """One row to an Example; errors name the row's file, line and field."""
    v = row.value
    if not isinstance(v, dict):
        raise DataError(f"{row.where}: a row must be an object with {FORMATS_HINT}; got {type(v).__name__}")
    try:
        if "messages" in v:
            return conversation_example(_messages(v["messages"]), tokenizer, template)
        if "instruction" in v or "output" in v:
            messages = alpaca_messages(_text(v, "instruction"), _text(v, "input", required=False, empty_ok=True),
                                       _text(v, "output"))
            return conversation_example(messages, tokenizer, template)
        if "prompt" in v:
            key = "response" if "response" in v and "completion" not in v else "completion"
            return Example(_text(v, "prompt", empty_ok=True), _text(v, key))
    except _FieldError as e:
        raise DataError(f"{row.where}: field {e.field!r} {e.problem}") from None
    except TemplateError as e:
        raise DataError(f"{row.where}: {e}") from None
    raise DataError(f"{row.where}: row has fields {sorted(v)}; expected {FORMATS_HINT}")


def _text(v: dict, field: str, required: bool = True, empty_ok: bool = False) -> str:
    x = v.get(field)
    if x is None:
        if required:
            raise _FieldError(field, "is missing")
        return ""
    if not isinstance(x, str):
        raise _FieldError(field, f"must be a string, got {type(x).__name__} {str(x)[:40]!r}")
    if not empty_ok and not x.strip():
        raise _FieldError(field, "is empty")
    return x


def _messages(msgs) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise _FieldError("messages", f"must be a non-empty list of {{role, content}} objects, got {str(msgs)[:40]!r}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _FieldError(f"messages[{i}]", f"must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _FieldError(f"messages[{i}].role", f"is {role!r}; use one of {', '.join(ROLES)}")
        try:
            content = _text(m, "content", empty_ok=role != "assistant")
        except _FieldError as e:
            raise _FieldError(f"messages[{i}].{e.field}", e.problem) from None
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise _FieldError(f"messages[{len(out) - 1}].role", "must be 'assistant': the last message is the answer to learn")
    if not any(m["role"] == "user" for m in out):
        raise _FieldError("messages", "has no user message")
    return out


# -- splits -------------------------------------------------------------------------------------------------


def fraction_split(rows: list, seed: int, val_fraction: float) -> tuple[list, list]:
    """(train, validation): a seeded choice of ``round(n * val_fraction)`` rows (at least one when the fraction
    is positive and there are two rows or more); both keep the original order."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(rows)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def default_split(src: Source) -> str:
    """What to evaluate on when no split is named: a file's rows ("all"), or a dataset's ``test`` split (else
    ``validation``)."""
    return "all" if src.flat else ("test" if "test" in src.splits else "validation")


def split_rows(src: Source, split: str | None, seed: int = 0, val_fraction: float = 0.1) -> list[Row]:
    """The rows of one split (None: :func:`default_split`)."""
    split = split or default_split(src)
    if src.flat:
        rows = src.splits["all"]
        if split == "all":
            return rows
        if split in ("train", "validation"):
            train, val = fraction_split(rows, seed, val_fraction)
            return train if split == "train" else val
        raise DataError(
            f"{src.name} has no named splits: use split 'all', or 'train' / 'validation' (the seeded "
            f"val_fraction={val_fraction} split that training uses); got {split!r}"
        )
    has_val = next((s for s in VALIDATION_NAMES if s in src.splits), None)
    if split == "validation" and has_val:
        return src.splits[has_val]
    if split in ("train", "validation") and not has_val and "train" in src.splits:
        train, val = fraction_split(src.splits["train"], seed, val_fraction)
        return train if split == "train" else val
    if split in src.splits:
        return src.splits[split]
    raise DataError(f"{src.name} has no split {split!r}; it has {sorted(src.splits)}")


def to_examples(rows: list[Row], tokenizer, template: str = "auto") -> list[Example]:
    check_template(template)
    return [row_example(r, tokenizer, template) for r in rows]


def load_examples(source, tokenizer, split: str | None = None, *, seed: int = 0, val_fraction: float = 0.1,
                  template: str = "auto", limit: int | None = None) -> list[Example]:
    """The Examples of one split (see :func:`split_rows`), the first ``limit`` of them when given."""
    rows = split_rows(read_source(source), split, seed, val_fraction)
    if limit is not None:
        rows = rows[:limit]
    examples = to_examples(rows, tokenizer, template)
    if not examples:
        raise DataError(f"{source}: split {split or 'default'!r} has no rows; nothing to evaluate")
    return examples


def load_examples_split(source, tokenizer, *, seed: int = 0, val_fraction: float = 0.1,
                        template: str = "auto") -> tuple[list[Example], list[Example]]:
    """(train Examples, validation Examples) for training: the dataset's own validation split when it has one,
    otherwise a seeded ``val_fraction`` of the rows (0 gives no validation)."""
    src = read_source(source)
    if not src.flat and "train" not in src.splits:
        raise DataError(f"{src.name} has no 'train' split; it has {sorted(src.splits)}")
    train = to_examples(split_rows(src, "train", seed, val_fraction), tokenizer, template)
    val = to_examples(split_rows(src, "validation", seed, val_fraction), tokenizer, template)
    return train, val


# -- encoding and packing -----------------------------------------------------------------------------------


def encode_with_report(tokenizer, examples: list[Example], max_length: int, source: str = "data"):
    """(encoded examples, ``{"examples", "too_long"}``): over-long examples are counted and reported, never
    truncated (the encoder also logs the count)."""
    encoded = encode_examples(tokenizer, examples, max_length, source)
    return encoded, {"examples": len(examples), "too_long": len(examples) - len(encoded)}


def pack_examples(encoded: list[dict], max_length: int) -> list[dict]:
    """Concatenate consecutive encoded examples into rows of at most ``max_length`` tokens.

    Each row carries ``position_ids`` that restart at 0 for every example: transformers 5.x models that build
    their mask with ``masking_utils`` (LLaMA family, GPT-2, ...) then attend block-causally, so an example never
    sees the one before it (check a model with :func:`check_packing`). The first label of every example after the
    first is ignored: it would be predicted from the previous example's last token."""
    rows: list[dict] = []
    cur: dict | None = None
    for e in encoded:
        n = len(e["input_ids"])
        if cur is not None and len(cur["input_ids"]) + n <= max_length:
            cur["input_ids"] += e["input_ids"]
            cur["labels"] += [IGNORE] + list(e["labels"][1:])
            cur["position_ids"] += list(range(n))
        else:
            cur = {"input_ids": list(e["input_ids"]), "labels": list(e["labels"]), "position_ids": list(range(n))}
            rows.append(cur)
    return rows


@torch.no_grad()
def check_packing(model) -> None:
    """Raise unless ``model`` keeps packed examples apart: the logits of two short sequences packed in one row
    (positions restarting) must equal their logits run alone."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise DataError(f"packing: {type(model).__name__} is an encoder-decoder; packing concatenates causal-LM rows "
                        "(one sequence per row), so train it without --packing")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (1, 6), generator=g), torch.randint(3, vocab, (1, 5), generator=g)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    was = model.training
    model.eval()
    try:
        alone = torch.cat([model(input_ids=x.to(device), use_cache=False).logits for x in (a, b)], dim=1).float()
        packed = model(input_ids=torch.cat([a, b], 1).to(device), position_ids=positions.to(device),
                       use_cache=False).logits.float()  # a cache switches transformers' packed-sequence masking off
    finally:
        model.train(was)
    low_precision = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tol = (2e-2 if low_precision else 1e-4) * (1 + alone.abs().max())
    if (packed - alone).abs().max() > tol:
        name = type(model).__name__
        raise DataError(
            f"packing: {name} does not keep packed examples apart (its attention ignores per-example position_ids), "
            "so examples would see each other; train without --packing"
        )
