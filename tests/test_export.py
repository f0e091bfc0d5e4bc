"""Merged export: a plain Hugging Face folder that transformers loads by itself with the logits of base + adapter;
and the `leantune export` command in a subprocess (both formats)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import leantune
from leantune.export import save_merged
from leantune.methods.base import Capabilities, Method

CASES = {
    "lora": ("lora", {"r": 4, "alpha": 8}),
    "rslora": ("lora", {"r": 4, "alpha": 8, "rslora": True}),
    "dora": ("lora", {"r": 4, "alpha": 8, "dora": True}),
    "bitfit": ("bitfit", {}),
    "ln_tuning": ("ln_tuning", {}),
    "krona": ("krona", {"targets": "all-linear"}),
    "ia3": ("ia3", {}),
}


def probe() -> torch.Tensor:
    return torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=probe()).logits


def tuned(name: str, case: str):
    """A tiny base with a method whose trainable tensors were moved (as if trained), and its unmerged logits."""
    model, tok = leantune.load_model(f"builtin:{name}")
    method_name, options = CASES[case]
    method = leantune.apply(model, method_name, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok, logits_of(model)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_merged_folder_loads_in_transformers_with_equal_logits(tmp_path, name, case):
    model, tok, ours = tuned(name, case)
    assert not torch.allclose(logits_of(leantune.load_model(f"builtin:{name}")[0]), ours, atol=1e-3)
    save_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(plain), ours, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("hi")["input_ids"] == tok("hi")["input_ids"]


def test_merged_model_has_no_method_left(tmp_path):
    model, tok, _ = tuned("tiny-llama", "dora")
    save_merged(model, tok, tmp_path / "merged")
    assert getattr(model, "leantune_method", None) is None
    assert not any("lora" in n for n, _ in model.named_modules())


def test_bitfit_on_some_roles_switches_the_config_and_zero_fills(tmp_path):
    # biases added to q and v only: the config switch gives k and o a bias too, which must be zero
    model, tok = leantune.load_model("builtin:tiny-llama")
    method = leantune.apply(model, "bitfit", targets="q,v")
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(0.1)
    ours = logits_of(model)
    save_merged(model, tok, tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is False
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert float(plain.model.layers[0].self_attn.k_proj.bias.abs().sum()) == 0.0
    torch.testing.assert_close(logits_of(plain), ours, atol=1e-5, rtol=1e-5)


def test_a_config_that_cannot_hold_bitfit_biases_is_refused(tmp_path):
    # Mistral builds its layers without biases whatever the config says: a plain Mistral folder cannot hold the
    # biases BitFit added (refused by the family's bias switches, before the late tensor check)
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    leantune.apply(model, "bitfit")
    with pytest.raises(ValueError, match=r"\['down', 'gate', 'k', 'o', 'q', 'up', 'v'\] layers, but a 'mistral' "
                                         "config has no switch"):
        save_merged(model, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


class _NoUnload(Method):
    """A mergeable method that never implemented unload()."""

    name = "no_unload_for_test"
    family = "reparametrization"

    @property
    def capabilities(self):
        return Capabilities(mergeable=True)

    def _apply(self, model, anat):
        anat.blocks[0].linears["q"].weight.requires_grad_(True)

    def merge(self):
        raise AssertionError("merge must not run when unload is missing")


def test_method_without_unload_gets_a_clear_error(tmp_path):
    model, tok = leantune.load_model("builtin:tiny-llama")
    _NoUnload().apply(model)
    with pytest.raises(ValueError, match="does not implement unload"):
        save_merged(model, tok, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_refuses_a_non_empty_output_folder(tmp_path):
    model, tok, _ = tuned("tiny-llama", "lora")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        save_merged(model, tok, tmp_path / "out")
    assert getattr(model, "leantune_method", None) is not None


def test_export_command_writes_both_formats(tmp_path):
    model, _, ours = tuned("tiny-llama", "lora")
    leantune.save(model, tmp_path / "adapter")
    env = {**os.environ, "LEANTUNE_NO_PROGRESS": "1"}
    for fmt in ("merged", "peft"):
        out = tmp_path / fmt
        proc = subprocess.run([sys.executable, "-m", "leantune.cli", "export", str(tmp_path / "adapter"),
                               "--format", fmt, "--output-dir", str(out)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["format"] == fmt
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), ours,
                               atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_export_command_names_an_unknown_format(tmp_path):
    from typer.testing import CliRunner

    from leantune.cli import app

    model, _, _ = tuned("tiny-llama", "lora")
    leantune.save(model, tmp_path / "adapter")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "adapter"), "--format", "gguf", "--output-dir",
                                   str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown export format 'gguf'" in res.output
