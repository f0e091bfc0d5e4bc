"""Your data in: every file form trains and evaluates end to end, loss masks cover exactly the response, bad rows
are named by file, line and field, the validation split is seeded and disjoint, packing keeps examples apart;
and `leantune eval --json` in a subprocess."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import leantune
from leantune.data.encode import IGNORE, DataError, Example, collate, encode_example
from leantune.data.files import (
    check_packing,
    encode_with_report,
    load_examples,
    load_examples_split,
    pack_examples,
    read_source,
    split_rows,
)
from leantune.data.templates import render_default
from leantune.models import byte_tokenizer
from leantune.pipeline import run_evaluation, run_training
from leantune.train.loop import TrainConfig, token_loss_sum

ALPACA = [
    {"instruction": "Give the opposite of the word.", "input": w, "output": o}
    for w, o in [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("wet", "dry")]
] + [{"instruction": f"Add {a} and {b}.", "output": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 9)]]
CHAT = [
    {"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": f"Capital of {c}?"},
                  {"role": "assistant", "content": k}]}
    for c, k in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Peru", "Lima"), ("Chile", "Santiago")]
] + [{"messages": [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": str(a + b)},
                   {"role": "user", "content": "Doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]}
     for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 9)]]
# A chat template that emits BOS itself and ends a turn with EOS, as Llama/Mistral templates do.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        for r in rows:
            w.writerow({"input": "", **r})
    return str(path)


def write_datasets_folder(path, rows) -> str:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["alpaca-jsonl", "csv", "chat-jsonl", "datasets-folder"])
def test_each_data_form_trains_and_evaluates(tmp_path, form):
    path = {
        "alpaca-jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", ALPACA),
        "csv": lambda: write_csv(tmp_path / "d.csv", ALPACA),
        "chat-jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", CHAT),
        "datasets-folder": lambda: write_datasets_folder(tmp_path / "ds", ALPACA),
    }[form]()
    out = tmp_path / "run"
    summary = run_training(model_name="builtin:tiny-llama", method_name="lora", method_options={"r": 4},
                           task=None, data_path=path, max_length=128, val_fraction=0.2,
                           train_config=TrainConfig(max_steps=2, batch_size=4, output_dir=str(out), progress=False))
    assert summary["examples"] == 8 and summary["eval_n"] == 2
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["eval_loss"])
    res = run_evaluation(model_name=None, adapter=str(out), task=None, data_path=path, split="validation",
                         val_fraction=0.2)
    assert res["n"] == 2 and 0.0 <= res["accuracy"] <= 1.0
    assert res["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)  # the same held-out rows as training's


def test_packing_trains_through_the_pipeline(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    summary = run_training(model_name="builtin:tiny-llama", method_name="lora", method_options={"r": 4},
                           task=None, data_path=path, max_length=256, val_fraction=0.0, packing=True,
                           train_config=TrainConfig(max_steps=2, batch_size=2, progress=False))
    assert summary["examples"] == 10 and summary["packed_rows"] < 10 and math.isfinite(summary["final_loss"])


def test_train_command_takes_val_fraction_and_packing(tmp_path):
    from typer.testing import CliRunner

    from leantune.cli import app

    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    res = CliRunner().invoke(app, ["train", "--model", "builtin:tiny-llama", "--method", "lora", "--data", path,
                                   "--max-steps", "1", "--batch-size", "2", "--output-dir", str(tmp_path / "o"),
                                   "--val-fraction", "0.3", "--packing", "--no-progress", "--max-length", "256"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["examples"] == 7 and summary["eval_n"] == 3 and summary["packed_rows"] >= 1


def test_eval_command_prints_json(tmp_path):
    model, _ = leantune.load_model("builtin:tiny-llama")
    leantune.apply(model, "lora", r=2)
    leantune.save(model, tmp_path / "adapter")
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    proc = subprocess.run(
        [sys.executable, "-m", "leantune.cli", "eval", "--adapter", str(tmp_path / "adapter"), "--data", path,
         "--json", "--limit", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LEANTUNE_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n"] == 3 and res["split"] == "all" and res["accuracy"] == 0.0 and res["loss"] > 0


def test_eval_of_a_builtin_task_scores_with_the_task(tmp_path):
    res = run_evaluation(model_name="builtin:tiny-llama", adapter=None, task="builtin:arith", data_path=None,
                         limit=4)
    from leantune.data.tasks import get_task

    assert (res["n"], res["split"], res["max_new_tokens"]) == (4, "test", get_task("builtin:arith").max_new_tokens)


# -- templates and loss masks -------------------------------------------------------------------------------


def test_default_template_masks_exactly_the_response():
    tok = byte_tokenizer()
    ex = load_examples_split_rows([{"instruction": "Add 2 and 3.", "input": "quickly", "output": "5"}], tok)[0]
    assert ex == Example("### User:\nAdd 2 and 3.\n\nquickly\n\n### Assistant:\n", "5")
    enc = encode_example(tok, ex.prompt, ex.response, 512)
    targets = [t for t in enc["labels"] if t != IGNORE]
    assert targets == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"][-len(targets):] == targets and enc["input_ids"][0] == tok.bos_token_id


def test_chat_template_gets_one_bos_and_masks_exactly_the_answer():
    tok = chat_tokenizer()
    ex = load_examples_split_rows([CHAT[5]], tok)[0]
    assert ex.prompt == "<s><|user|>1 plus 2?</s><|assistant|>3</s><|user|>Doubled?</s><|assistant|>"
    assert ex.response == "6"
    enc = encode_example(tok, ex.prompt, ex.response, 512)
    assert enc["input_ids"].count(tok.bos_token_id) == 1 and enc["input_ids"][0] == tok.bos_token_id
    assert [t for t in enc["labels"] if t != IGNORE] == tok("6", add_special_tokens=False)["input_ids"] + [2]


def test_template_choice_is_honoured():
    rows = [{"instruction": "Say hi.", "output": "hi"}]
    assert load_examples_split_rows(rows, chat_tokenizer(), template="default")[0].prompt == render_default(
        [{"role": "user", "content": "Say hi."}])
    with pytest.raises(ValueError, match="no chat template"):
        load_examples_split_rows(rows, byte_tokenizer(), template="chat")


def test_prompt_completion_rows_are_taken_verbatim(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    assert load_examples(path, chat_tokenizer()) == [Example("2+2=", " 4")]


def load_examples_split_rows(rows, tok, template="auto"):
    from leantune.data.files import Row, to_examples

    return to_examples([Row(f"row {i}", r) for i, r in enumerate(rows, 1)], tok, template)


# -- malformed input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines,message", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": '], r"d\.jsonl:2: not valid JSON"),
    (['{"instruction": "a", "output": "b"}', "", '{"instruction": "c"}'], r"d\.jsonl:3: field 'output' is missing"),
    (['{"instruction": "a", "output": 7}'], r"d\.jsonl:1: field 'output' must be a string, got int"),
    (['{"instruction": "a", "output": "  "}'], r"d\.jsonl:1: field 'output' is empty"),
    (['["a", "b"]'], r"d\.jsonl:1: a row must be an object"),
    (['{"text": "a"}'], r"d\.jsonl:1: row has fields \['text'\]"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], r"d\.jsonl:1: field 'messages\[0\]\.role' must be 'assistant'"),
    (['{"messages": [{"role": "bot", "content": "a"}]}'], r"d\.jsonl:1: field 'messages\[0\]\.role' is 'bot'"),
    (['{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}'],
     r"d\.jsonl:1: field 'messages\[0\]\.content' is missing"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(tmp_path / "d.jsonl", byte_tokenizer())


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"d\.jsonl: the file has no rows"):
        load_examples_split(tmp_path / "d.jsonl", byte_tokenizer())


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"d\.csv:3: 1 more value"):
        load_examples(tmp_path / "d.csv", byte_tokenizer())
    (tmp_path / "e.csv").write_text("question,answer\na,b\n")
    with pytest.raises(DataError, match=r"e\.csv:1: header has columns \['question', 'answer'\]"):
        load_examples(tmp_path / "e.csv", byte_tokenizer())


def test_datasets_rows_are_named_by_split_and_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds\[train\] row 2: field 'output' is missing"):
        load_examples(tmp_path / "ds", byte_tokenizer(), "train")


def test_over_long_examples_are_counted_not_hidden(tmp_path):
    tok = byte_tokenizer()
    examples = [Example("short", "a"), Example("x" * 100, "b"), Example("y" * 100, "c")]
    encoded, report = encode_with_report(tok, examples, 40)
    assert len(encoded) == 1 and report == {"examples": 3, "too_long": 2}
    with pytest.raises(DataError, match=r"2 of 2 longer than max_length=40"):
        encode_with_report(tok, examples[1:], 40)
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA[:4] + [{"instruction": "z" * 300, "output": "w"}])
    summary = run_training(model_name="builtin:tiny-llama", method_name="lora", method_options={"r": 2},
                           task=None, data_path=path, max_length=128, val_fraction=0.0,
                           train_config=TrainConfig(max_steps=1, batch_size=2, progress=False))
    assert (summary["examples"], summary["skipped_too_long"]) == (5, 1)


def test_json_array_and_parquet_files_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "d.json").write_text(json.dumps(ALPACA[:3]))
    datasets.Dataset.from_list(ALPACA[:3]).to_parquet(str(tmp_path / "d.parquet"))
    tok = byte_tokenizer()
    want = load_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA[:3]), tok)
    assert load_examples(tmp_path / "d.json", tok) == want == load_examples(tmp_path / "d.parquet", tok)
    (tmp_path / "e.json").write_text(json.dumps([ALPACA[0], {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"e\.json: item 2: field 'output' is missing"):
        load_examples(tmp_path / "e.json", tok)


def test_missing_path_says_what_to_give():
    with pytest.raises(DataError, match="does not exist.*hf:NAME"):
        read_source("/nonexistent/data.jsonl")


# -- splits -------------------------------------------------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_sized(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = byte_tokenizer()
    train, val = load_examples_split(path, tok, seed=3, val_fraction=0.2)
    again, val_again = load_examples_split(path, tok, seed=3, val_fraction=0.2)
    other = load_examples_split(path, tok, seed=4, val_fraction=0.2)[1]
    assert (len(train), len(val)) == (40, 10) and (train, val) == (again, val_again) and other != val
    assert sorted(e.response for e in train + val) == sorted(r["output"] for r in rows)
    assert load_examples_split(path, tok, val_fraction=0.0)[1] == []


def test_dataset_validation_split_is_used_as_is(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ALPACA[:6]), "validation": datasets.Dataset.from_list(ALPACA[6:8]),
        "test": datasets.Dataset.from_list(ALPACA[8:]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    train, val = load_examples_split(tmp_path / "ds", byte_tokenizer(), val_fraction=0.5)
    assert (len(train), len(val)) == (6, 2)
    assert [r.value["output"] for r in split_rows(read_source(tmp_path / "ds"), None)] == ["15", "18"]  # test


# -- packing ------------------------------------------------------------------------------------------------


def test_packed_rows_fit_and_restart_positions():
    tok = byte_tokenizer()
    encoded = [encode_example(tok, f"prompt {i}", "answer" * (i % 3 + 1), 256) for i in range(9)]
    rows = pack_examples(encoded, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows) and len(rows) < len(encoded)
    assert sum(r["position_ids"].count(0) for r in rows) == len(encoded)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in encoded)


@pytest.mark.parametrize("name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_packed_loss_equals_unpacked_loss(name):
    # the packed row's attention is block-causal: summed token loss equals that of the examples run one by one
    model, tok = leantune.load_model(name)
    check_packing(model)
    encoded = [encode_example(tok, p, r, 256) for p, r in [("one two", " three"), ("a b c", " d e"), ("x", " yz")]]
    packed = collate(pack_examples(encoded, 256), tok.pad_token_id)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        loss_packed, n_packed = token_loss_sum(model, packed, causal=True)
        alone = [token_loss_sum(model, collate([e], tok.pad_token_id), causal=True) for e in encoded]
    assert n_packed == sum(n for _, n in alone)
    torch.testing.assert_close(loss_packed, sum(v for v, _ in alone), atol=1e-4, rtol=1e-5)


def test_packing_check_refuses_a_model_that_ignores_positions():
    model, _ = leantune.load_model("builtin:tiny-llama")

    class NoPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    with pytest.raises(DataError, match="does not keep packed examples apart"):
        check_packing(NoPositions(model))
