"""Families from outside: a YAML family spec on the command line (also seen by child processes) and the
``leantune.families`` entry-point group of an installed package."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import leantune
from leantune import anatomy as anat_mod
from leantune.anatomy import FAMILIES, UnsupportedModelError, anatomy, load_family_specs, spec_from_dict

GRANITE_SPEC = """\
model_type: granite
blocks: layers
embed: embed_tokens
final_norm: norm
roles: {q: self_attn.q_proj, k: self_attn.k_proj, v: self_attn.v_proj, o: self_attn.o_proj,
        gate: mlp.gate_proj, up: mlp.up_proj, down: mlp.down_proj}
norms: [input_layernorm, post_attention_layernorm]
bias_switches: {q: attention_bias, k: attention_bias, v: attention_bias, o: attention_bias}
"""


def granite_folder(tmp_path):
    """A tiny Granite (a transformers family leantune does not ship a spec for) saved as a model folder."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from leantune.models import byte_tokenizer

    tok = byte_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GraniteForCausalLM(GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2))
    folder = tmp_path / "granite"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


@pytest.fixture
def forget_granite():
    yield
    FAMILIES.pop("granite", None)
    anat_mod._loaded_outside = False


def test_cli_trains_a_family_described_in_yaml(tmp_path, forget_granite):
    from test_cli import run

    folder, _ = granite_folder(tmp_path)
    spec = tmp_path / "granite.yaml"
    spec.write_text(GRANITE_SPEC)
    args = ["train", "--model", str(folder), "--method", "lora", "--task", "builtin:arith", "--max-steps", "2",
            "--batch-size", "4", "--eval-samples", "4", "--no-progress"]
    refused = run(*args, "--output-dir", str(tmp_path / "no"), check=False)
    assert refused.returncode != 0 and "'granite'" in refused.stderr and "--family-spec" in refused.stderr
    proc = run(*args, "--output-dir", str(tmp_path / "out"), "--family-spec", str(spec))
    assert json.loads(proc.stdout)["steps"] == 2
    ev = run("eval", "--adapter", str(tmp_path / "out"), "--task", "builtin:arith", "--limit", "2", "--json",
             "--family-spec", str(spec))
    assert json.loads(ev.stdout)["n"] == 2


def test_yaml_spec_registers_and_anatomy_reads_it(tmp_path, forget_granite):
    _, model = granite_folder(tmp_path)
    spec = tmp_path / "granite.yaml"
    spec.write_text(GRANITE_SPEC)
    assert load_family_specs(spec) == ["granite"]
    a = anatomy(model)
    assert (a.n_heads, a.n_kv_heads, a.head_dim) == (4, 2, 8)
    assert a.blocks[1].linear("down") is model.model.layers[1].mlp.down_proj


@pytest.mark.parametrize(("change", "message"), [
    ({"roles": {"qq": "self_attn.q_proj"}}, r"unknown role\(s\) \['qq'\]"),
    ({"qkv_layout": "zigzag"}, "qkv_layout 'zigzag'"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
])
def test_bad_yaml_specs_name_the_problem(change, message):
    import yaml

    d = {**yaml.safe_load(GRANITE_SPEC), **change}
    with pytest.raises(UnsupportedModelError, match=message):
        spec_from_dict(d)


def test_entry_point_group_teaches_a_family(tmp_path, forget_granite, monkeypatch):
    """An installed package declares ``[leantune.families] granite = pkg:SPEC``; leantune finds it on first use."""
    pkg = tmp_path / "site"
    (pkg / "granite_spec").mkdir(parents=True)
    (pkg / "granite_spec" / "__init__.py").write_text(
        "from leantune.anatomy import spec_from_dict\nimport yaml\n"
        f"SPEC = spec_from_dict(yaml.safe_load({GRANITE_SPEC!r}))[1]\n")
    dist = pkg / "granite_spec-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: granite-spec\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[leantune.families]\ngranite = granite_spec:SPEC\n")
    monkeypatch.syspath_prepend(str(pkg))
    anat_mod._loaded_outside = False
    _, model = granite_folder(tmp_path)
    m = leantune.apply(model, "lora", r=2)
    assert m.anatomy.spec is FAMILIES["granite"] and len(m.anatomy.blocks) == 2
    sys.modules.pop("granite_spec", None)


def test_child_processes_see_the_family_specs(tmp_path, forget_granite, monkeypatch):
    """The bench runs each job in a child process: --family-spec reaches it through $LEANTUNE_FAMILY_SPECS."""
    import subprocess

    from leantune.anatomy import SPEC_ENV, use_family_specs

    monkeypatch.setenv(SPEC_ENV, "")  # restored (to unset) after the test: the spec file goes with tmp_path
    spec = tmp_path / "granite.yaml"
    spec.write_text(GRANITE_SPEC)
    use_family_specs([spec])
    assert FAMILIES["granite"].embed == "embed_tokens"
    code = "from leantune.anatomy import known_family; print(known_family('granite').blocks)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "layers"


def test_plan_reads_a_family_described_in_yaml(tmp_path, forget_granite):
    from test_cli import run

    folder, model = granite_folder(tmp_path)
    spec = tmp_path / "granite.yaml"
    spec.write_text(GRANITE_SPEC)
    proc = run("plan", "--model", str(folder), "--method", "lora", "-o", "r=2", "--device", "cpu", "--seq-len", "16",
               "--json", "--family-spec", str(spec))
    (row,) = json.loads(proc.stdout)["methods"]
    # LoRA r=2 on all seven linear roles of 2 layers: fp32 gradients of exactly its A and B
    lora = sum(2 * (lin.in_features + lin.out_features) for layer in model.model.layers
               for lin in (*[getattr(layer.self_attn, f"{p}_proj") for p in "qkvo"],
                           *[getattr(layer.mlp, f"{p}_proj") for p in ("gate", "up", "down")]))
    assert row["method"] == "lora" and row["memory"]["grads"] == 4 * lora


def test_server_serves_a_family_described_in_yaml(tmp_path, forget_granite, monkeypatch):
    """`leantune serve --family-spec`: the app the command builds answers with the adapter on a Granite base as
    `leantune generate` does."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from typer.testing import CliRunner

    import leantune.serve.server as server
    from leantune.anatomy import SPEC_ENV
    from leantune.cli import app
    from test_serve import Live, complete

    monkeypatch.setenv(SPEC_ENV, "")  # restored after the test: --family-spec sets it for child processes
    folder, model = granite_folder(tmp_path)
    spec = tmp_path / "granite.yaml"
    spec.write_text(GRANITE_SPEC)
    load_family_specs(spec)
    m = leantune.apply(model, "lora", r=2)
    g = torch.Generator().manual_seed(0)
    m.load_state({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in m.state().items()})
    leantune.save(model, tmp_path / "adapter")
    FAMILIES.pop("granite")  # the command registers it from --family-spec, not this process's earlier call
    anat_mod._loaded_outside = False
    built = {}
    monkeypatch.setattr(server, "run", lambda app_, **kw: built.update(app=app_))
    args = ["serve", "--model", str(folder), "--adapter", f"g={tmp_path / 'adapter'}"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "'granite'" in refused.output and not built
    result = CliRunner().invoke(app, [*args, "--family-spec", str(spec)])
    assert result.exit_code == 0, result.output
    generated = CliRunner().invoke(app, ["generate", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
                                         "-p", "hello", "--max-new-tokens", "4", "--family-spec", str(spec)])
    assert generated.exit_code == 0, generated.output
    live = Live(built["app"])
    try:
        served = complete(live.port, "g", "hello", max_tokens=4)
        assert "hello" + served == generated.stdout.rstrip("\n")
        assert complete(live.port, "base", "hello", max_tokens=4) != served  # the adapter changes the answer
    finally:
        live.stop()
