"""A quantized base (bitsandbytes NF4 / LLM.int8 on the CPU): which methods train on it and only change their own
tensors, adapters round trip and load on the full-precision base too, refusals, S²FT's gradient against the
dequantized base, LISA's dequantized blocks, the PEFT export, the merged export and the memory count.

Tolerances: a quantized layer computes with its dequantized weight, so a reference built on that weight (a plain
``nn.Linear`` holding ``dequantize(Q(W))``) agrees to float32 rounding of a different summation order: rtol 1e-4,
atol 1e-6 for gradients and logits (measured: about 1e-6 relative).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, train_steps
from leantune import export, files
from leantune.anatomy import is_quantized_layer
from leantune.data.encode import encode_examples
from leantune.data.tasks import get_task
from leantune.hooks import TrainHook
from leantune.methods.base import ConfigError
from leantune.models import byte_tokenizer, load_model
from leantune.quant import QuantizeConfig, dequantize_model_, quantization_of, quantize_model, tensor_bytes
from leantune.train.loop import TrainConfig, train

pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt", "ignore:.*budget"), pytest.mark.usefixtures("one_thread")]

RTOL, ATOL = 1e-4, 1e-6




def qbase(kind: str = "nf4", name: str = "builtin:tiny-llama"):
    return load_model(name, quantize=kind)[0]


def packed_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if is_quantized_layer(m)]


# -- the base ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_block_linears_are_quantized_head_and_norms_are_not_and_the_fingerprint_is_the_full_precision_one(kind):
    full = load_model("builtin:tiny-llama")[0]
    model = qbase(kind)
    names = packed_layers(model)
    assert len(names) == 14 and all(".layers." in n for n in names)  # 2 blocks x (q, k, v, o, gate, up, down)
    assert not is_quantized_layer(model.lm_head)
    assert files.fingerprint(model) == files.fingerprint(full)
    torch.testing.assert_close(logits(model, fixed_batch()), logits(full, fixed_batch()), rtol=0, atol=0.5)


def test_quantize_head_option_quantizes_the_lm_head():
    model = load_model("builtin:tiny-llama", quantize={"type": "nf4", "quantize_head": True})[0]
    assert is_quantized_layer(model.lm_head)


def test_nf4_weights_count_at_their_real_size():
    full = load_model("builtin:tiny-llama")[0]
    model = qbase("nf4")
    fp32 = sum(m.weight.numel() * 4 for n, m in full.named_modules() if n in set(packed_layers(model)))
    got = tensor_bytes(model)["quantized"]
    assert got <= 0.35 * fp32  # 4 bits + the (double-quantized) block scales
    assert got >= fp32 / 8  # at least the 4-bit codes themselves


def test_without_bitsandbytes_quantize_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RuntimeError, match=r"pip install 'leantune\[quant\]'"):
        load_model("builtin:tiny-llama", quantize="nf4")


def test_bad_quantize_value_is_a_clear_error():
    with pytest.raises(ValueError, match="'nf3' is not one of nf4, fp4, int8"):
        load_model("builtin:tiny-llama", quantize="nf3")


# -- methods on a quantized base -------------------------------------------------------------------------------

SUPPORTED = [("lora", {}), ("lora", {"dora": True}), ("lora", {"rslora": True}), ("ia3", {}), ("houlsby", {}),
             ("parallel", {}), ("bitfit", {}), ("ln_tuning", {}), ("s2ft", {}), ("lisa", {"gamma": 1}),
             # soft prompts touch no weight; KronA's term sits beside the layer as LoRA's; the PEFT bridge for the
             # types PEFT injects into bitsandbytes layers itself
             ("prompt_tuning", {}), ("prefix_tuning", {}), ("prefix_flat", {}), ("krona", {}),
             ("peft", {"peft_type": "LORA", "r": 4}), ("peft", {"peft_type": "IA3"}),
             # the hybrids: as their parts allow (prefix + scaled parallel adapter; gated LoRA + prefix + adapter)
             ("mam", {}), ("unipelt", {})]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method,opts", SUPPORTED, ids=[f"{m}-{'-'.join(str(v) if k == 'peft_type' else k for k, v in o.items()) or 'plain'}"
                                              for m, o in SUPPORTED])
def test_method_trains_on_a_quantized_base_changes_only_its_tensors_and_round_trips(method, opts, kind, tmp_path):
    model = qbase(kind)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    m = leantune.apply(model, method, **opts)
    before = {n: t.clone() for n, t in m.state().items()}
    train_steps(model, fixed_batch(), steps=3)
    after = m.state()
    assert any(not torch.equal(before[n], after[n]) for n in before if after[n].is_floating_point())
    for n, t in model.state_dict().items():  # the base: bitwise as loaded (quantized codes and scales included)
        if n in base and n not in after:
            assert torch.equal(t, base[n]), n
    leantune.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "leantune.json").read_text())
    assert meta["base"]["quantization"]["type"] == kind
    fresh = qbase(kind)
    leantune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, fixed_batch()), logits(model, fixed_batch()), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", ["full", "light_peft"])
def test_full_and_light_peft_refuse_a_quantized_base_at_start(method):
    model = qbase("nf4")
    with pytest.raises(ConfigError, match=f"method '{method}' cannot train on a nf4-quantized base: "):
        leantune.apply(model, method)
    assert getattr(model, "leantune_method", None) is None


def test_peft_bridge_on_nf4_wraps_the_4bit_layers_leaves_them_bitwise_and_refuses_types_without_bnb_layers():
    pytest.importorskip("peft")
    model = qbase("nf4")
    q = model.model.layers[0].self_attn.q_proj
    codes = q.weight.detach().clone()
    m = leantune.apply(model, "peft", peft_type="LORA", r=4)
    layer = m.layers["model.layers.0.self_attn.q_proj"]
    assert type(layer).__name__ == "Linear4bit" and type(layer).__module__ == "peft.tuners.lora.bnb"
    train_steps(model, fixed_batch(), steps=3)
    assert layer.get_base_layer() is q and torch.equal(q.weight, codes)
    with pytest.raises(ValueError, match="re-quantize the update silently"):
        leantune.merge(model)
    with pytest.raises(ConfigError, match="PEFT has no bitsandbytes layer for LOHA .*covers .*LORA"):
        leantune.apply(qbase("nf4"), "peft", peft_type="LOHA")


def test_krona_merge_into_a_quantized_layer_is_refused_before_anything_changes():
    model = qbase("nf4")
    m = leantune.apply(model, "krona")
    train_steps(model, fixed_batch(), steps=1)
    before = logits(model, fixed_batch())
    with pytest.raises(ValueError, match="krona: cannot merge into a quantized layer"):
        leantune.merge(model)
    assert not m.merged
    torch.testing.assert_close(logits(model, fixed_batch()), before, rtol=0, atol=0)


def test_s2ft_gradient_selection_refuses_a_quantized_base():
    with pytest.raises(ConfigError, match="selection='gradient' needs the gradient of the base weight"):
        leantune.apply(qbase("nf4"), "s2ft", selection="gradient")


def test_a_qlora_adapter_loads_on_the_full_precision_base(tmp_path):
    model = qbase("nf4")
    leantune.apply(model, "lora", r=4)
    train_steps(model, fixed_batch(), steps=2)
    leantune.save(model, tmp_path / "a")
    full = load_model("builtin:tiny-llama")[0]
    leantune.load(full, tmp_path / "a")  # the fingerprint matches: it is the unquantized base's
    assert torch.equal(full.leantune_method.state()["model.layers.0.self_attn.q_proj.lora_B"],
                       model.leantune_method.state()["model.layers.0.self_attn.q_proj.lora_B"])


def test_merging_into_a_quantized_layer_is_refused():
    model = qbase("nf4")
    leantune.apply(model, "lora", r=4)
    with pytest.raises(ValueError, match="re-quantize the update silently"):
        leantune.merge(model)


# -- S²FT: the block beside Q(W) -----------------------------------------------------------------------------


def test_s2ft_gradient_on_nf4_equals_the_gradient_on_the_dequantized_base():
    quant = qbase("nf4")
    plain = qbase("nf4")
    dequantize_model_(plain)  # plain nn.Linear layers holding dequantize(Q(W)): the fused path runs there
    assert not packed_layers(plain)
    methods = [leantune.apply(m, "s2ft", seed=3) for m in (quant, plain)]
    batch = fixed_batch()
    for model in (quant, plain):
        model.train()
        model(**batch).loss.backward()
    (a, b) = (dict(m.trainable_parameters()) for m in methods)
    assert a.keys() == b.keys() and a
    for n in a:
        assert a[n].grad.abs().sum() > 0
        torch.testing.assert_close(a[n].grad, b[n].grad, rtol=RTOL, atol=ATOL)


# -- LISA: dequantized blocks while active ---------------------------------------------------------------------


def _data(n: int = 24) -> list[dict]:
    return encode_examples(byte_tokenizer(), get_task("builtin:arith").split("train")[:n], max_length=48)


def _lisa_run(on_leave: str, steps: int = 12):
    model = qbase("nf4")
    method = leantune.apply(model, "lisa", gamma=1, period=3, seed=0, on_leave=on_leave)
    seen = []

    class Probe(TrainHook):
        def on_step_end(self, ctx):
            opt = ctx.optimizer
            seen.append((ctx.method.active, {id(p) for p in opt.state},
                         {id(p) for _, p in ctx.method.trainable_parameters()}))

    train(model, _data(), TrainConfig(max_steps=steps, batch_size=4, lr=1e-3, progress=False), hooks=[Probe()])
    return model, method, seen


@pytest.mark.parametrize("on_leave", ["requantize", "keep"])
def test_lisa_on_nf4_trains_every_block_and_frees_what_leaves(on_leave):
    model, method, seen = _lisa_run(on_leave)
    assert len({r[0] for r in seen}) == 2 and method.changed == {0, 1}  # both blocks were drawn and trained
    for _active, state_ids, trainable_ids in seen:  # optimizer state: exactly the active block + always-on parts
        assert state_ids == trainable_ids
    (active,) = method.active
    for i in range(2):
        layers = method.qlayers[i].values()
        if i == active:
            assert all(not is_quantized_layer(m) and m.weight.requires_grad for m in layers)
        else:
            assert all(p.grad is None and not p.requires_grad for p in method.block_params[i].values())
            # requantize: the dequantized copy is gone, the layer is 4-bit again; keep: full precision, frozen
            assert all(is_quantized_layer(m) == (on_leave == "requantize") for m in layers)


def test_lisa_on_nf4_saves_full_precision_blocks_that_load_on_the_full_precision_base(tmp_path):
    model, method, _ = _lisa_run("requantize", steps=6)
    leantune.save(model, tmp_path / "a")
    state = method.state()
    assert all(t.is_floating_point() for t in state.values())
    full = load_model("builtin:tiny-llama")[0]
    leantune.load(full, tmp_path / "a")
    requant = qbase("nf4")
    leantune.load(requant, tmp_path / "a")
    torch.testing.assert_close(logits(full, fixed_batch()), logits(model, fixed_batch()), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logits(requant, fixed_batch()), logits(model, fixed_batch()), rtol=RTOL, atol=ATOL)


def test_lisa_keep_base_refuses_a_quantized_base():
    with pytest.raises(ConfigError, match="keep_base=true"):
        leantune.apply(qbase("nf4"), "lisa", keep_base=True)


# -- exports ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])  # GPT-2: Conv1D comes back
def test_merged_export_of_a_qlora_adapter_is_full_precision_and_matches_the_quantized_model(tmp_path, name):
    from transformers import AutoModelForCausalLM

    model = qbase("nf4", name)
    leantune.apply(model, "lora", r=4)
    train_steps(model, fixed_batch(), steps=2)
    want = logits(model, fixed_batch())
    res = export.save_merged(model, None, tmp_path / "m")
    assert "dequantized" in res["quantization_note"] and "not re-quantized" in res["quantization_note"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(logits(merged, fixed_batch()), want, rtol=RTOL, atol=1e-5)


def test_peft_export_of_a_qlora_adapter_loads_in_peft_on_the_same_quantized_base(tmp_path):
    peft = pytest.importorskip("peft")
    from leantune.interop.peft import export_peft

    model = qbase("nf4")
    leantune.apply(model, "lora", r=4, alpha=8.0)
    train_steps(model, fixed_batch(), steps=2)
    export_peft(model, tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(qbase("nf4"), tmp_path / "p").eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(theirs, fixed_batch()), logits(model, fixed_batch()), rtol=RTOL, atol=ATOL)


def test_quantize_does_not_apply_twice_or_after_a_method():
    model = qbase("nf4")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(model, "nf4")
    full = load_model("builtin:tiny-llama")[0]
    leantune.apply(full, "lora")
    with pytest.raises(ValueError, match="before applying a method"):
        quantize_model(full, "nf4")


# -- the bench's quantized rows ---------------------------------------------------------------------------------


def test_bench_names_quantized_rows_and_refuses_a_method_that_cannot():
    from leantune.measure.bench import quantized_names, resolve_runs

    assert quantized_names(["full", "lora", "peft:lora", "s2ft"], "nf4") == ["full", "lora", "lora+nf4", "peft:lora",
                                                                              "s2ft", "s2ft+nf4"]
    runs, _ = resolve_runs(["lora", "lora+nf4"])
    assert [(r["key"], r["quantize"]) for r in runs] == [("lora@leantune", None), ("lora+nf4@leantune", "nf4")]
    with pytest.raises(ValueError, match="full does not train on a quantized base"):
        resolve_runs(["full+nf4"])
    with pytest.raises(ValueError, match="one of nf4, fp4, int8"):
        resolve_runs(["lora+q3"])


def test_efficiency_model_built_quantized_counts_its_weights_at_their_real_size():
    from leantune.measure.effmodel import EfficiencyModel
    from leantune.measure.memory import weight_bytes

    spec = EfficiencyModel(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=256, seq_len=16)
    full, quant = spec.build(), spec.build(quantize="nf4")
    assert len(packed_layers(quant)) == 14 and not any(p.is_meta for p in quant.parameters())
    fp32_blocks = sum(p.numel() * 4 for layer in full.model.layers for n, p in layer.named_parameters()
                      if "norm" not in n)
    assert weight_bytes(quant) == tensor_bytes(quant)["total"] - sum(b.numel() * b.element_size()
                                                                     for b in quant.buffers())
    assert tensor_bytes(quant)["quantized"] <= 0.35 * fp32_blocks
    leantune.apply(quant, "lora", r=4)
    train_steps(quant, {k: v for k, v in spec.batch().items()}, steps=1)  # it trains


# -- the pipeline (what the CLI walks) -----------------------------------------------------------------------


def test_train_records_the_quantization_and_eval_reloads_the_base_that_way(tmp_path):
    from leantune.pipeline import load_for_inference, run_evaluation, run_training

    out = tmp_path / "run"
    summary = run_training(model_name="builtin:tiny-llama", method_name="lora", method_options={"r": 4},
                           task="builtin:arith", data_path=None, max_length=48, eval_samples=2,
                           train_config=TrainConfig(max_steps=2, batch_size=4, progress=False, output_dir=str(out)),
                           quantize={"type": "int8"})
    assert summary["quantization"]["type"] == "int8"
    res = run_evaluation(model_name=None, adapter=str(out), task="builtin:arith", data_path=None, limit=2)
    assert res["quantization"]["type"] == "int8"
    model, _ = load_for_inference(None, str(out))
    assert packed_layers(model) and type(model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    full, _ = load_for_inference(None, str(out), quantize="none")
    assert not packed_layers(full)


def test_cli_quantize_flags_need_a_quantization():
    from leantune.cli import quantize_options

    assert quantize_options(None, None, None, None, None) is None
    assert quantize_options("nf4", None, False, None, None) == {**QuantizeConfig().to_dict(), "double_quant": False}
    assert quantize_options({"type": "nf4"}, "none", None, None, None) is None
    with pytest.raises(ValueError, match="--quantize-head given without --quantize"):
        quantize_options(None, None, None, None, True)


def test_flops_of_a_4bit_base_count_its_products_as_the_matmuls_they_stand_for():
    from leantune.measure.effmodel import EfficiencyModel
    from leantune.measure.flops import FlopCount

    spec = EfficiencyModel(hidden=128, layers=1, heads=4, kv_heads=2, intermediate=256, vocab=256, seq_len=16)
    totals = []
    for kind in (None, "nf4"):
        model = spec.build(quantize=kind)
        leantune.apply(model, "lora", r=4)
        with FlopCount() as fwd:
            loss = model(**spec.batch()).loss
        with FlopCount() as bwd:
            loss.backward()
        totals.append((fwd.total, bwd.total))
    assert totals[0] == totals[1]


def test_the_survey_suite_honours_quantize_with_a_quantized_row_or_the_reason_for_each_row(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from dataclasses import replace

    from leantune.measure import bench
    from leantune.measure.suite import suite_config
    from test_suite import TINY_EFF, _in_process

    cfg = bench.config_from_options(quick=True, preset=suite_config("survey", quick=True), quantize="nf4")
    labels = [e["label"] for e in cfg.entries]
    assert len(labels) == 40 and labels[:4] == ["full", "full+nf4", "houlsby", "houlsby+nf4"] and cfg.methods == labels
    by = {e["label"]: e for e in cfg.entries}
    refused = {k: v["unavailable"] for k, v in by.items() if "unavailable" in v}
    assert set(refused) == {"full+nf4", "light_peft+nf4", "peft:lora+nf4"}
    assert refused["full+nf4"].startswith("does not train on a nf4-quantized base: full fine-tuning updates")
    assert "leantune's methods only" in refused["peft:lora+nf4"]
    assert by["lora_qv+nf4"]["quantize"] == "nf4" and by["lora_qv+nf4"]["options"]["targets"] == "q,v"
    # a tiny run of three rows: the quantized one measured on the quantized base, the refused one a row saying so
    _in_process(monkeypatch)
    cfg = replace(cfg, entries=[by[k] for k in ("lora_qv", "lora_qv+nf4", "full+nf4")], base="builtin:tiny-llama",
                  tasks=["builtin:arith"], budget=bench.Budget(max_steps=2, batch_size=2, seeds=1, eval_samples=2),
                  timing=bench.TimingPlan(warmup_rounds=0, rounds=1, infer_warmup_rounds=0, infer_rounds=1),
                  efficiency_model=bench.parse_efficiency_model(TINY_EFF), output_dir=str(tmp_path), threads=1)
    res, failed = bench.run_bench(cfg)
    assert not failed, failed
    rows = {r["label"]: r for r in res["runs"]}
    assert set(rows) == {"lora_qv", "lora_qv+nf4"} and rows["lora_qv+nf4"]["quantize"] == "nf4"
    assert "quantize" not in rows["lora_qv"]
    assert rows["lora_qv+nf4"]["memory"]["weights"] < rows["lora_qv"]["memory"]["weights"]
    assert [(u["label"], u["quantize"]) for u in res["unavailable"]] == [("full+nf4", "nf4")]
    md = (tmp_path / "results.md").read_text()
    assert "| full+nf4 | – | not run: does not train on a nf4-quantized base: full fine-tuning" in md


# -- a pre-quantized checkpoint (config.json carries quantization_config, as a hub "...-bnb-4bit" model) -----------


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    """A folder that transformers saved from a tiny model it loaded in 4 bits, and the full-precision original."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("prequantized")
    model, tok = load_model("builtin:tiny-llama")
    model.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(root / "full", quantization_config=bnb, device_map="cpu")
    q.save_pretrained(root / "q4")
    tok.save_pretrained(root / "q4")
    return root


def test_a_prequantized_checkpoint_trains_as_stored_records_it_and_evals_and_exports_merged(prequantized, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from leantune.cli import app

    ckpt = str(prequantized / "q4")
    stored = load_file(prequantized / "q4" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    model = load_model(ckpt)[0]
    up = model.model.layers[0].mlp.up_proj
    assert type(up).__name__ == "Linear4bit" and torch.equal(up.weight.data, stored)  # as stored: not re-quantized
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--model", ckpt, "--method", "lora", "--task", "builtin:arith",
                                   "--max-steps", "3", "--batch-size", "2", "--max-length", "48", "--output-dir",
                                   str(out), "--no-progress", "--eval-samples", "2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "leantune.json").read_text())
    assert meta["base"]["quantization"] == {"type": "nf4", "double_quant": False, "compute_dtype": "fp32",
                                            "quantize_head": False, "threshold": 0.0, "prequantized": True}
    res = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--task", "builtin:arith", "--limit", "2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", str(out), "--format", "merged", "--output-dir", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    want = load_model(ckpt)[0]
    leantune.load(want, out)
    torch.testing.assert_close(logits(merged, fixed_batch()), logits(want, fixed_batch()), rtol=RTOL, atol=1e-5)


def test_an_adapter_on_a_prequantized_checkpoint_binds_to_its_dequantized_weights(prequantized, tmp_path):
    ckpt = str(prequantized / "q4")
    model = load_model(ckpt)[0]
    leantune.apply(model, "lora", r=4)
    train_steps(model, fixed_batch(), steps=1)
    leantune.save(model, tmp_path / "a")
    leantune.load(load_model(ckpt)[0], tmp_path / "a")  # the same checkpoint
    plain = load_model(ckpt)[0]
    dequantize_model_(plain)
    stored = plain.__dict__.pop(files.UNQUANTIZED_FINGERPRINT)
    assert files.fingerprint(plain) == stored  # the fingerprint is the dequantized model's own
    leantune.load(plain, tmp_path / "a")
    with pytest.raises(files.AdapterError, match="weights differ from those the adapter was trained on"):  # not the
        # original it was quantized from (NF4 moved most sampled values)
        leantune.load(load_model(str(prequantized / "full"))[0], tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a checkpoint stored quantized"):
        load_model(str(prequantized / "full"), quantize=json.loads((tmp_path / "a" / "leantune.json").read_text())
                   ["base"]["quantization"])


def test_quantize_that_disagrees_with_a_prequantized_checkpoint_is_a_clear_error(prequantized):
    ckpt = str(prequantized / "q4")
    with pytest.raises(ValueError, match=r"disagrees with the checkpoint.*type 'int8' asked, 'nf4' stored"):
        load_model(ckpt, quantize="int8")
    with pytest.raises(ValueError, match=r"double_quant True asked, False stored"):
        load_model(ckpt, quantize={"type": "nf4", "double_quant": True})
    with pytest.raises(ValueError, match=r"cannot be loaded in full precision"):
        load_model(ckpt, quantize="none")
    model = load_model(ckpt, quantize="nf4")[0]  # agrees: taken as stored
    assert quantization_of(model).prequantized


def test_a_prequantized_checkpoint_without_bitsandbytes_says_how_to_install(prequantized, monkeypatch):
    """The checkpoint's config asks for bitsandbytes: leantune's install hint, before transformers' own error."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RuntimeError, match=r"pip install 'leantune\[quant\]'"):
        load_model(str(prequantized / "q4"))
