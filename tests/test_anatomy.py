"""The anatomy table: roles, head counts, GQA, explicit head_dim, fused and Conv1D layers, unknown families."""

from __future__ import annotations

import pytest

from conftest import tiny
from leantune.anatomy import (
    FAMILIES,
    FamilySpec,
    UnsupportedModelError,
    anatomy,
    check_anatomy,
    is_conv1d,
    register_family,
    resolve_roles,
    weight_2d,
)


def test_llama_gqa_and_explicit_head_dim():
    model, _ = tiny("builtin:tiny-llama")
    a = anatomy(model)
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.hidden, a.intermediate) == (4, 2, 24, 64, 128)
    assert a.head_dim != a.hidden // a.n_heads  # the explicit value, not hidden / heads
    b = a.blocks[0]
    assert weight_2d(b.linear("q")).shape == (4 * 24, 64)
    assert weight_2d(b.linear("k")).shape == (2 * 24, 64)
    assert weight_2d(b.linear("o")).shape == (64, 4 * 24)
    assert weight_2d(b.linear("down")).shape == (64, 128)
    assert b.linear("gate") is model.model.layers[0].mlp.gate_proj
    assert a.embed is model.model.embed_tokens and a.head is model.lm_head and a.final_norm is model.model.norm
    assert len(a.blocks) == 2 and len(b.norms) == 2


def test_gpt2_fused_qkv_and_conv1d():
    model, _ = tiny("builtin:tiny-gpt2")
    a = anatomy(model)
    b = a.blocks[0]
    assert b.linear("q") is b.linear("v") is model.transformer.h[0].attn.c_attn
    assert is_conv1d(b.linear("o"))
    assert weight_2d(b.linear("qkv")).shape == (3 * 64, 64)  # (out, in) although Conv1D stores (in, out)
    assert weight_2d(b.linear("up")).shape == (256, 64)
    names = [n for n, role, _, _ in a.linears("q,k,v")]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]  # the fused layer once
    assert a.linears("q")[0][1] == "qkv"


def test_bert_roles_and_no_final_norm():
    model, _ = tiny("builtin:tiny-bert")
    a = anatomy(model)
    assert not a.causal and a.final_norm is None
    layer = model.bert.encoder.layer[1]
    assert a.blocks[1].linear("o") is layer.attention.output.dense
    assert a.blocks[1].linear("up") is layer.intermediate.dense
    assert a.blocks[1].linear("down") is layer.output.dense
    assert a.blocks[1].linear("gate") is None
    assert len(a.linears("all-linear")) == 2 * 6


def test_unknown_family_names_model_type_and_how_to_register():
    model, _ = tiny("builtin:tiny-llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match=r"'mystery'.*register_family"):
        anatomy(model)


def test_register_family_teaches_a_new_model_type():
    model, _ = tiny("builtin:tiny-llama")
    model.config.model_type = "my_llama"
    spec = FamilySpec(blocks="layers", embed="embed_tokens", final_norm="norm",
                      roles={"q": "self_attn.q_proj", "o": "self_attn.o_proj"}, norms=("input_layernorm",))
    register_family("my_llama", spec)
    try:
        a = anatomy(model)
        assert [role for _, role, _, _ in a.linears("all-linear")] == ["q", "o", "q", "o"]
    finally:
        del FAMILIES["my_llama"]


def test_bad_paths_in_a_family_spec_are_reported():
    model, _ = tiny("builtin:tiny-llama")
    spec = FamilySpec(blocks="layers", embed="embed_tokens", roles={"q": "attn.query"}, norms=())
    with pytest.raises(UnsupportedModelError, match="attn.query"):
        anatomy(model, spec)


def test_unknown_role_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown target role.*'qq'"):
        resolve_roles("q,qq")
    assert resolve_roles("all-linear") == ["q", "k", "v", "o", "gate", "up", "down", "cross_q", "cross_k", "cross_v",
                                           "cross_o"]


def _tiny_hf(kind):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[kind]
    extra = {"head_dim": 12} if kind == "qwen3" else {}
    return tf.AutoModelForCausalLM.from_config(cfg(**common, **extra))


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_llama_style_families(kind):
    import torch

    import leantune

    model = _tiny_hf(kind)
    a = anatomy(model)
    assert (a.n_heads, a.n_kv_heads) == (4, 2)
    assert a.head_dim == (12 if kind == "qwen3" else 8)
    assert weight_2d(a.blocks[0].linear("k")).shape == (2 * a.head_dim, 32)
    if kind == "qwen3":
        assert len(a.blocks[0].norms) == 4  # q_norm and k_norm too
    ids = torch.randint(0, 64, (1, 8))
    base = model(input_ids=ids).logits
    leantune.apply(model, "lora", r=4)
    torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=1e-6)


# -- layouts: the anatomy's rows against the model's own split of its fused output -------------------------


def _falcon(**kw):
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, **kw)
    return FalconForCausalLM(cfg)


FALCON_LAYOUTS = {
    "blocked": dict(multi_query=True, num_kv_heads=4),  # the config says 4 KV heads; the weights hold 1
    "per_head": dict(multi_query=False, num_kv_heads=4),
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
}


@pytest.mark.parametrize("layout", list(FALCON_LAYOUTS))
def test_falcon_head_rows_follow_falcons_own_split(layout):
    import torch

    model = _falcon(**FALCON_LAYOUTS[layout])
    a = check_anatomy(anatomy(model))
    assert a.qkv_layout == layout
    assert a.n_kv_heads == {"blocked": 1, "per_head": 4, "grouped": 2}[layout]
    attn = model.transformer.h[0].self_attention
    rows = weight_2d(a.blocks[0].linear("qkv")).shape[0]
    q, k, v = attn._split_heads(torch.arange(rows, dtype=torch.float32).view(1, 1, rows))  # [1, 1, heads, hd]
    g = a.n_heads // a.n_kv_heads
    for h in range(a.n_heads):
        assert a.head_rows("q", [h]).tolist() == q[0, 0, h].long().tolist()
    for j in range(a.n_kv_heads):
        col = j * g if layout == "grouped" else j  # grouped: k/v broadcast over each group's query heads
        assert a.head_rows("k", [j]).tolist() == k[0, 0, col].long().tolist()
        assert a.head_rows("v", [j]).tolist() == v[0, 0, col].long().tolist()


def test_neox_and_phi3_rows_follow_their_own_split():
    import torch

    for name in ("builtin:tiny-neox", "builtin:tiny-phi3"):
        model, _ = tiny(name)
        a = anatomy(model)
        b = a.blocks[0]
        rows = weight_2d(b.linear("qkv")).shape[0]
        x = torch.arange(rows)
        if name.endswith("neox"):  # GPTNeoXAttention: view(..., -1, 3 * head_size).chunk(3, dim=-1)
            q, k, v = x.view(-1, 3 * a.head_dim).chunk(3, dim=-1)
        else:  # Phi3Attention: [q | k | v] slices
            nq, nkv, hd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.head_dim
            q, k, v = (t.reshape(-1, hd) for t in (x[:nq], x[nq:nq + nkv], x[nq + nkv:]))
        for part, t in (("q", q), ("k", k), ("v", v)):
            for h in range(t.shape[0]):
                assert a.head_rows(part, [h]).tolist() == t[h].tolist(), (name, part, h)
    model, _ = tiny("builtin:tiny-phi3")
    a = anatomy(model)
    gate_up = weight_2d(a.blocks[0].linear("up")).shape[0]
    gate, up = torch.arange(gate_up).chunk(2)  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    assert a.ffn_rows("gate").tolist() == gate.tolist() and a.ffn_rows("up").tolist() == up.tolist()
    assert a.blocks[0].linear("gate") is a.blocks[0].linear("up") is model.model.layers[0].mlp.gate_up_proj


def test_qk_norm_kinds():
    assert anatomy(tiny("builtin:tiny-gemma3")[0]).qk_norm_kind() == "per_head"
    assert anatomy(tiny("builtin:tiny-olmo2")[0]).qk_norm_kind() == "whole"
    assert anatomy(tiny("builtin:tiny-llama")[0]).qk_norm_kind() is None


def test_register_family_refuses_a_spec_whose_shapes_do_not_add_up():
    model, _ = tiny("builtin:tiny-neox")
    model.config.model_type = "my_neox"
    good = FAMILIES["gpt_neox"]
    wrong_roles = FamilySpec(blocks="layers", embed="embed_in", roles={"q": "attention.query_key_value"}, norms=())
    with pytest.raises(UnsupportedModelError, match=r"role 'q'.*768|has 192 outputs, expected 64"):
        register_family("my_neox", wrong_roles, model)
    not_linear = FamilySpec(blocks="layers", embed="embed_in", roles={"o": "attention"}, norms=())
    with pytest.raises(UnsupportedModelError, match="not a linear layer"):
        register_family("my_neox", not_linear, model)
    with pytest.raises(UnsupportedModelError, match="qkv_layout 'zigzag'"):
        register_family("my_neox", FamilySpec(blocks="layers", embed="embed_in", roles={}, norms=(),
                                              qkv_layout="zigzag"))
    assert "my_neox" not in FAMILIES
    register_family("my_neox", good, model)
    try:
        assert anatomy(model).qkv_layout == "per_head"
    finally:
        del FAMILIES["my_neox"]


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_bias_switches_are_the_ones_the_family_reads(kind, tmp_path):
    """BitFit's merged export turns a config switch on: only where the family's layers read it."""
    import torch

    import leantune
    from leantune.export import save_merged

    model = _tiny_hf(kind)
    m = leantune.apply(model, "bitfit", targets="q,k,v,o")
    with torch.no_grad():
        for _, p in m.trainable_parameters():
            p.add_(0.1)
    if kind == "qwen3":  # attention_bias gives q, k, v, o a bias
        save_merged(model, None, tmp_path / "m")
    else:  # Mistral's and Qwen2's attention biases are fixed in code: refused, not silently dropped on reload
        with pytest.raises(ValueError, match="has no switch that gives them a bias"):
            save_merged(model, None, tmp_path / "m")


@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-qwen2-moe"])
def test_moe_experts_and_router_are_not_linear_roles(name):
    model, _ = tiny(name)
    a = check_anatomy(anatomy(model))
    moe = model.model.layers[0].mlp
    assert a.n_experts == 4 and a.blocks[0].router is moe.gate and a.blocks[0].experts is moe.experts
    assert a.intermediate == moe.experts.down_proj.shape[-1]
    assert all(mod is not moe.gate for _, _, _, mod in a.linears("all-linear"))  # the router is never "gate"
    if name.endswith("moe"):  # Qwen2-MoE's shared expert plays gate/up/down
        assert a.blocks[0].linear("down") is moe.shared_expert.down_proj
    else:
        assert a.blocks[0].linear("gate") is None and a.blocks[0].linear("down") is None
    assert [p for _, part, i, p in a.expert_params() if i == 0] == [moe.experts.gate_up_proj, moe.experts.down_proj]
    spec = FamilySpec(blocks="layers", embed="embed_tokens", roles={"gate": "mlp.gate"}, norms=())
    with pytest.raises(UnsupportedModelError, match="TopKRouter, not a linear layer"):
        anatomy(model, spec)


def test_full_and_lisa_freeze_the_router_unless_asked():
    import leantune

    for method, opts in (("full", {}), ("lisa", {"gamma": 2})):
        for train_router in (False, True):
            model, _ = tiny("builtin:tiny-mixtral")
            m = leantune.apply(model, method, train_router=train_router, **opts)
            names = {n for n, _ in m.trainable_parameters()}
            assert ("model.layers.0.mlp.gate.weight" in names) is train_router, (method, train_router)
            assert "model.layers.0.mlp.experts.down_proj" in names


@pytest.mark.parametrize(("name", "kv", "inter"), [("tiny-llama", 48, 128), ("tiny-gpt2", 64, 256),
                                                   ("tiny-bert", 64, 128)])
def test_placement_points_in_every_family(name, kv, inter):
    from leantune.anatomy import PLACEMENTS

    model, _ = tiny(f"builtin:{name}")
    anat = anatomy(model)
    assert anat.missing_placements(PLACEMENTS) == []
    for point in PLACEMENTS:
        places = anat.placements(point)
        assert [p.block for p in places] == list(range(len(anat.blocks)))
    keys, values = anat.placements("keys")[0], anat.placements("values")[0]
    assert (keys.size, values.size) == (kv, kv) and keys.side == values.side == "out"
    if name == "tiny-gpt2":  # rows of the fused c_attn: [q | k | v]
        assert keys.module is values.module and (keys.start, values.start, values.stop) == (64, 128, 192)
    else:
        assert keys.whole and values.whole and keys.module is not values.module
    act = anat.placements("ffn_act")[0]
    assert (act.side, act.size) == ("in", inter) and act.module is anat.blocks[0].linear("down")
    ffn_in, ffn_out = anat.placements("ffn_in")[0], anat.placements("ffn_out")[0]
    assert ffn_in.module is anat.blocks[0].linear("up") and ffn_in.side == "in" and ffn_in.size == anat.hidden
    assert ffn_out.module is anat.blocks[0].linear("down") and ffn_out.side == "out"
    assert anat.placements("attn_out")[0].module is anat.blocks[0].linear("o")


def test_a_removed_placement_point_is_refused_with_what_to_do():
    import dataclasses

    from leantune.anatomy import PlacementError, family_spec

    model, _ = tiny("builtin:tiny-llama")
    anat = anatomy(model, dataclasses.replace(family_spec(model), placements={"keys": None}))
    assert anat.missing_placements(["keys", "values"]) == ["keys"]
    with pytest.raises(PlacementError, match="placements=.*'keys'"):
        anat.placements("keys")
