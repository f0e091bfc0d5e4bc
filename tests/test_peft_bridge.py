"""The PEFT bridge (method ``peft``): any PEFT adapter type trains through leantune and its folder round-trips,
checked against the real ``peft`` package (LoHa and VeRA: leantune and plain PEFT load the folder with equal
logits), plus exact resume, merge, the folder rule and the option checks."""

from __future__ import annotations

import json

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, tiny, train_steps
from leantune.io import AdapterError
from leantune.methods.base import ConfigError

peft = pytest.importorskip("peft")

TYPES = {"LOHA": {"r": 4, "alpha": 8}, "VERA": {"r": 8}}


def trained(peft_type: str, steps: int = 3):
    model, _ = tiny()
    method = leantune.apply(model, "peft", peft_type=peft_type, target_modules="q,v", **TYPES[peft_type])
    batch = fixed_batch()
    before = logits(model, batch)
    train_steps(model, batch, steps=steps, lr=3e-2)
    return model, method, batch, before


@pytest.mark.parametrize("peft_type", list(TYPES))
def test_round_trip_in_leantune_and_in_plain_peft(tmp_path, peft_type):
    model, method, batch, before = trained(peft_type)
    ours = logits(model, batch)
    assert not torch.allclose(ours, before, atol=1e-4)  # the adapter learned something: the check below can fail
    leantune.save(model, tmp_path / "a")
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"leantune.json", "adapter_config.json", "adapter_model.safetensors"}
    meta = json.loads((tmp_path / "a" / "leantune.json").read_text())
    assert meta["method"] == "peft" and meta["weights"]["file"] == "adapter_model.safetensors"
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == peft_type

    fresh, _ = tiny()
    loaded = leantune.load(fresh, tmp_path / "a")
    assert loaded.name == "peft" and loaded.config.peft_type == peft_type
    torch.testing.assert_close(logits(fresh, batch), ours, rtol=0, atol=1e-6)

    plain, _ = tiny()
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a")
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=0, atol=1e-6)


def test_leantune_json_decides_how_the_folder_loads(tmp_path):
    """A folder with both files loads as leantune's: the base fingerprint in leantune.json is checked (PEFT's
    files alone carry none), and a damaged weights file is caught by its checksum."""
    model, *_ = trained("LOHA", steps=1)
    leantune.save(model, tmp_path / "a")
    other, _ = tiny("builtin:tiny-gpt2")
    with pytest.raises(AdapterError, match="fingerprint|another base|differs"):
        leantune.load(other, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        leantune.load(tiny()[0], tmp_path / "a")


def test_resume_equals_uninterrupted(tmp_path):
    from test_loop import _assert_same, _Interrupt, _params, _run

    opts = {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": "q,v"}
    cfg = {"max_steps": 4, "save_every": 2, "warmup_steps": 1}
    straight, _ = _run("peft", opts, output_dir=str(tmp_path / "a"), **cfg)
    with pytest.raises(KeyboardInterrupt):
        _run("peft", opts, output_dir=str(tmp_path / "b"), hooks=[_Interrupt(3)], **cfg)
    resumed, result = _run("peft", opts, init_seed=123, output_dir=str(tmp_path / "b"), **cfg)
    _assert_same(_params(straight), _params(resumed))
    assert [r["step"] for r in result.history] == [3, 4]


def test_capabilities_follow_the_peft_type_and_merge_is_exact():
    model, method, batch, _ = trained("LOHA", steps=2)
    assert method.capabilities.mergeable and method.family == "reparametrization"
    unmerged = logits(model, batch)
    method.merge()
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=1e-5)
    method.unmerge()
    merged_plain = method.merge_and_unload()
    assert not any("hada" in n for n, _ in merged_plain.named_parameters())
    torch.testing.assert_close(logits(merged_plain, batch), unmerged, rtol=0, atol=1e-5)
    ia3 = leantune.apply(tiny()[0], "peft", peft_type="IA3", target_modules="k,v,down", feedforward_modules="down")
    assert ia3.family == "additive" and ia3.capabilities.mergeable
    assert ia3.num_changed() > ia3.num_trainable()


@pytest.mark.parametrize("options,message", [
    ({"peft_type": "LOHA", "rr": 8}, "not fields of PEFT's LoHaConfig"),
    ({"peft_type": "NOPE"}, "not a PEFT type"),
    ({"peft_type": "PROMPT_TUNING"}, "prompt-learning"),
    ({"peft_type": "LORA", "task_type": "CAUSAL_LM"}, "set by leantune"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        leantune.apply(tiny()[0], "peft", **options)


def test_cli_trains_evaluates_and_exports_it(tmp_path):
    from typer.testing import CliRunner

    from leantune.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--model", "builtin:tiny-llama", "--task", "builtin:arith",
                                   "--method", "peft", "-o", "peft_type=LOHA", "-o", "r=4", "-o", "target_modules=q,v",
                                   "--max-steps", "2", "--batch-size", "2", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "leantune.json").read_text())["method"] == "peft"
    res = CliRunner().invoke(app, ["export", str(out), "--format", "peft",
                                   "--output-dir", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "exp" / "leantune.json").exists()
    res = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--task", "builtin:arith", "--limit", "2"])
    assert res.exit_code == 0 and "accuracy" in res.output, res.output
    res = CliRunner().invoke(app, ["export", str(out), "--format", "merged", "--output-dir", str(tmp_path / "m")])
    assert res.exit_code == 0 and (tmp_path / "m" / "config.json").exists(), res.output


def test_what_trains_is_float32_on_a_bf16_base():
    model, _ = leantune.load_model("builtin:tiny-llama", dtype="bfloat16")
    method = leantune.apply(model, "peft", peft_type="LOHA", r=4, target_modules="q,v")
    assert {p.dtype for _, p in method.trainable_parameters()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "hada" not in n} == {torch.bfloat16}
