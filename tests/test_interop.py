"""Hugging Face PEFT interop, checked against the real ``peft`` package: our export loads in PEFT with the same
logits, a PEFT-made adapter imports into leantune with the same logits, and unsafe or unsupported folders are
refused with clear messages."""

from __future__ import annotations

import json

import pytest
import torch

import leantune
from leantune.interop.peft import export_peft, load_peft, save_peft_lora
from leantune.io import AdapterError

peft = pytest.importorskip("peft")

TARGETS = {"tiny-llama": ["q_proj", "v_proj", "down_proj"], "tiny-gpt2": ["c_attn", "c_proj"]}
VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


def base(name: str):
    return leantune.load_model(f"builtin:{name}")


def probe(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


@torch.no_grad()
def randomize(params, seed: int, scale: float = 0.05) -> None:
    """Non-zero B (and moved DoRA magnitudes) so that the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


def leantune_lora(name: str, variant: str):
    model, tok = base(name)
    method = leantune.apply(model, "lora", r=4, alpha=8, targets="q,v,down" if name == "tiny-llama" else "qkv,o",
                            **VARIANTS[variant])
    randomize([p for n, p in method.trainable_parameters() if n.endswith((".B", ".magnitude"))], seed=1)
    return model, tok, method


def saved_base(tmp_path, name: str):
    """The tiny base saved as a Hugging Face folder (PEFT records it as base_model_name_or_path)."""
    model, tok = base(name)
    folder = tmp_path / f"base-{name}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def peft_made(tmp_path, name: str, variant: str, **extra):
    """An adapter created and saved by PEFT itself, with non-zero B; returns (folder, PEFT's logits)."""
    from transformers import AutoModelForCausalLM

    folder = saved_base(tmp_path, name)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], use_rslora=variant == "rslora",
                          use_dora=variant == "dora", fan_in_fan_out=name == "tiny-gpt2", **extra)
    pm = peft.get_peft_model(hf, cfg)
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n or "magnitude" in n], seed=2)
    out = tmp_path / f"peft-{name}-{variant}"
    pm.save_pretrained(out)
    return out, logits_of(pm, probe()), folder


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_export_loads_in_peft_with_equal_logits(tmp_path, name, variant):
    model, _, _ = leantune_lora(name, variant)
    ours = logits_of(model, probe())
    export_peft(model, tmp_path / "out")
    fresh, _ = base(name)
    assert not torch.allclose(logits_of(fresh, probe()), ours, atol=1e-3)  # the adapter does change the logits
    theirs = logits_of(peft.PeftModel.from_pretrained(fresh, tmp_path / "out"), probe())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_export_config_says_fan_in_fan_out_for_conv1d(tmp_path):
    model, _, _ = leantune_lora("tiny-gpt2", "lora")
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert cfg["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                     "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]


def test_export_uses_short_target_names_when_they_are_exact(tmp_path):
    model, _, _ = leantune_lora("tiny-llama", "dora")
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["use_dora"], cfg["r"], cfg["lora_alpha"]) == (
        ["down_proj", "q_proj", "v_proj"], True, 4, 8)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_import_of_peft_adapter_gives_peft_logits(tmp_path, name, variant):
    folder, theirs, base_folder = peft_made(tmp_path, name, variant)
    model, _ = leantune.load_model(base_folder)
    assert not torch.allclose(logits_of(model, probe()), theirs, atol=1e-3)  # PEFT's adapter changes the logits
    method = leantune.load(model, folder)
    assert method.name == "lora" and method.config.dora == (variant == "dora")
    torch.testing.assert_close(logits_of(model, probe()), theirs, atol=1e-5, rtol=1e-5)


def test_import_with_rank_and_alpha_patterns_and_some_layers(tmp_path):
    # per-module ranks/alphas and an adapter on layer 1 only: padded, rescaled, zero elsewhere, same function
    folder, theirs, base_folder = peft_made(
        tmp_path, "tiny-llama", "lora", rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
        layers_to_transform=[1])
    model, _ = leantune.load_model(base_folder)
    method = load_peft(model, folder)
    assert method.config.r == 4
    assert float(method.layers["model.layers.0.self_attn.q_proj"].lora.B.abs().sum()) == 0.0
    torch.testing.assert_close(logits_of(model, probe()), theirs, atol=1e-5, rtol=1e-5)


def test_generic_writer_with_per_module_ranks_and_unit_scale(tmp_path):
    # S²FT's export form: A = one-hot rows of selected input columns, B = the dense delta, scale 1
    model, _ = base("tiny-llama")
    g = torch.Generator().manual_seed(3)
    deltas = {}
    for name, cols in (("model.layers.0.self_attn.o_proj", [1, 5, 7]), ("model.layers.1.mlp.down_proj", [0, 9])):
        a = torch.zeros(len(cols), dict(model.named_modules())[name].in_features)
        a[range(len(cols)), cols] = 1.0
        deltas[name] = (a, torch.randn(64, len(cols), generator=g))
    save_peft_lora(tmp_path / "s2ft", deltas, alpha=None)
    cfg = json.loads((tmp_path / "s2ft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2} and cfg["r"] == 3
    merged = peft.PeftModel.from_pretrained(base("tiny-llama")[0], tmp_path / "s2ft").merge_and_unload()
    for name, (a, b) in deltas.items():
        change = dict(merged.named_modules())[name].weight - dict(model.named_modules())[name].weight
        torch.testing.assert_close(change, b @ a, atol=1e-6, rtol=1e-6)


def test_peft_folder_continues_training_through_the_pipeline(tmp_path):
    from leantune.pipeline import load_for_inference, run_training
    from leantune.train.loop import TrainConfig

    folder, theirs, base_folder = peft_made(tmp_path, "tiny-llama", "lora")
    model, _ = load_for_inference(None, str(folder))  # the base comes from base_model_name_or_path
    torch.testing.assert_close(logits_of(model, probe()), theirs, atol=1e-5, rtol=1e-5)
    out = tmp_path / "continued"
    summary = run_training(model_name=base_folder, method_name=None, method_options={}, task="builtin:arith",
                           data_path=None, max_length=64, eval_samples=2, adapter=str(folder),
                           train_config=TrainConfig(max_steps=2, batch_size=2, output_dir=str(out), progress=False))
    assert summary["method"] == "lora" and (out / "leantune.json").exists()


def test_refuses_pickled_weights_without_reading_them(tmp_path):
    folder, _, _ = peft_made(tmp_path, "tiny-llama", "lora")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(AdapterError, match="pickle"):
        leantune.load(base("tiny-llama")[0], folder)


@pytest.mark.parametrize("field,value,message", [
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "all", "bias='all'"),
    ("init_lora_weights", "pissa", "base model whose weights were changed"),
    ("peft_type", "IA3", "LORA adapters only"),
    ("a_future_option", {"on": True}, "unknown PEFT field"),
])
def test_refuses_lora_variants_it_cannot_compute(tmp_path, field, value, message):
    folder, _, _ = peft_made(tmp_path, "tiny-llama", "lora")
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=message):
        leantune.load(base("tiny-llama")[0], folder)


def test_adapter_for_another_base_names_the_module(tmp_path):
    folder, _, _ = peft_made(tmp_path, "tiny-llama", "lora")
    with pytest.raises(AdapterError, match=r"module 'model\.layers\.0\.mlp\.down_proj' is not a linear layer"):
        leantune.load(base("tiny-gpt2")[0], folder)


def test_leantune_folder_reader_points_to_the_peft_import(tmp_path):
    from leantune import io

    folder, _, _ = peft_made(tmp_path, "tiny-llama", "lora")
    with pytest.raises(AdapterError, match="load_peft"):
        io.load(base("tiny-llama")[0], folder)


@torch.no_grad()
def logits_as_is(model, ids) -> torch.Tensor:
    """Logits in whatever mode the model is in (``logits_of`` switches to eval, which would hide a dropout left on)."""
    return model(input_ids=ids).logits


@pytest.mark.parametrize("via", ["peft", "leantune"])
def test_adapter_with_dropout_loaded_into_an_eval_model_follows_its_mode(tmp_path, via):
    """An eval-mode base that gains a LoRA with dropout (PEFT import or leantune folder) gives the same logits twice,
    and PEFT's for its adapter."""
    folder, theirs, base_folder = peft_made(tmp_path, "tiny-llama", "lora", lora_dropout=0.5)
    if via == "leantune":
        model, _ = leantune.load_model(base_folder)
        leantune.load(model, folder)
        leantune.save(model, tmp_path / "ours")
        folder = tmp_path / "ours"
    model, _ = leantune.load_model(base_folder)
    assert not model.training
    leantune.load(model, folder)
    first, second = logits_as_is(model, probe()), logits_as_is(model, probe())
    assert torch.equal(first, second)
    torch.testing.assert_close(first, theirs, atol=1e-5, rtol=1e-5)
    assert all(not m.training for m in model.modules())


def test_a_training_model_keeps_dropout_on_in_what_it_gains():
    model, _ = base("tiny-llama")
    model.train()
    method = leantune.apply(model, "lora", r=2, dropout=0.5)
    assert all(mod.lora.training for mod in method.layers.values())


def test_mica_init_imports_as_plain_lora(tmp_path):
    """MiCA (B from the base's minor singular vectors, A = 0, B frozen) leaves the base as it is: plain LoRA."""
    folder, theirs, base_folder = peft_made(tmp_path, "tiny-llama", "lora")
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "mica"}))
    model, _ = leantune.load_model(base_folder)
    leantune.load(model, folder)
    torch.testing.assert_close(logits_of(model, probe()), theirs, atol=1e-5, rtol=1e-5)


# -- exports vLLM loads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [("lora", {"r": 4, "alpha": 8}), ("lora", {"r": 12, "rslora": True}),
                                            ("s2ft", {"budget": "count", "heads": 1, "channels": 5})])
def test_vllm_export_pads_to_a_rank_vllm_accepts_with_the_same_logits(tmp_path, method, options):
    from leantune.interop.peft import VLLM_RANKS

    model, _ = base("tiny-llama")
    m = leantune.apply(model, method, **options)
    randomize([p for n, p in m.trainable_parameters() if n.endswith((".B", ".delta"))], seed=3)
    ours = logits_of(model, probe())
    export_peft(model, tmp_path / "vllm", target="vllm")
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    top = max(a.shape[0] for a, _ in m.lora_factors()["modules"].values())
    assert cfg["r"] == min(r for r in VLLM_RANKS if r >= top)  # LoRA r=4 -> 8, r=12 -> 16; S²FT's k -> the next
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert cfg["use_dora"] is False and cfg["use_rslora"] is False and not cfg["modules_to_save"]
    fresh, _ = base("tiny-llama")
    theirs = logits_of(peft.PeftModel.from_pretrained(fresh, tmp_path / "vllm"), probe())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", ["q", ""])
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_expert_pairs_export_as_target_parameters_and_load_in_peft(tmp_path, name, targets):
    """experts=true: one pair per routed expert on the 3-D parameters, written as PEFT's target_parameters (its
    nesting of one wrapper per parameter and its expert-interleaved lora_B); PEFT's model gives our logits."""
    model, _ = base(name)
    method = leantune.apply(model, "lora", experts=True, r=4, alpha=8, targets=targets)
    randomize([p for _, p in method.trainable_parameters()], seed=4)
    ours = logits_of(model, probe())
    assert not torch.allclose(ours, logits_of(base(name)[0], probe()), atol=1e-3)  # the experts' update shows
    export_peft(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["target_modules"] == (["q_proj"] if targets else [])
    theirs = peft.PeftModel.from_pretrained(base(name)[0], tmp_path / "out")
    torch.testing.assert_close(logits_of(theirs, probe()), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_import_of_peft_target_parameters_gives_peft_logits(tmp_path, name):
    """A PEFT adapter on the expert parameters (and q_proj, at r=4 with alpha 8) imports as lora experts=true."""
    hf, _ = base(name)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    pm = peft.get_peft_model(hf, cfg)
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n], seed=5)
    pm.save_pretrained(tmp_path / "p")
    theirs = logits_of(pm, probe())
    model, _ = base(name)
    method = leantune.load(model, tmp_path / "p")
    assert method.config.experts and method.config.targets == "q"
    assert not torch.allclose(logits_of(base(name)[0], probe()), theirs, atol=1e-3)
    torch.testing.assert_close(logits_of(model, probe()), theirs, atol=1e-5, rtol=1e-5)


def test_vllm_export_refuses_expert_pairs(tmp_path):
    model, _ = base("tiny-mixtral")
    leantune.apply(model, "lora", experts=True, r=4)
    with pytest.raises(ValueError, match="expert parameters"):
        export_peft(model, tmp_path / "out", target="vllm")


@pytest.mark.parametrize("name,method,options,message", [
    ("tiny-llama", "lora", {"r": 4, "dora": True}, "vLLM does not load DoRA"),
    ("tiny-gpt2", "lora", {"r": 4}, "Conv1D"),
    ("tiny-llama", "ia3", {}, "vLLM serves LoRA adapters only"),
    ("tiny-llama", "bitfit", {}, "no exact LoRA form"),
])
def test_vllm_export_refuses_what_vllm_cannot_load(tmp_path, name, method, options, message):
    model, _ = base(name)
    leantune.apply(model, method, **options)
    with pytest.raises(ValueError, match=message):
        export_peft(model, tmp_path / "out", target="vllm")


def test_cli_vllm_export_prints_the_serve_line(tmp_path):
    from typer.testing import CliRunner

    from leantune.cli import app

    model, _ = base("tiny-llama")
    leantune.apply(model, "lora", r=4)
    leantune.save(model, tmp_path / "ad")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "ad"), "--format", "peft", "--target", "vllm",
                                   "--output-dir", str(tmp_path / "vllm")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["rank"] == 8 and out["serve"].startswith("vllm serve builtin:tiny-llama --enable-lora --max-lora-rank 8")
