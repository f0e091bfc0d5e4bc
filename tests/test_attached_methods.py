"""The module methods (adapters, Compacter, KronA, (IA)³) against hand-written references of their formulas.

Each reference is a fresh base model with plain forward hooks that compute the paper's formula from the method's
own tensors (random, so every factor matters); the method's model must give the same logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, tiny
from leantune.anatomy import PlacementError, anatomy, family_spec, weight_2d
from leantune.methods import get_method


def _randomize(method, ones_centered: bool = False):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if ones_centered else 0.0))


def _linear(layer, x):
    """The layer's own product, spelled out: x Wᵀ + b with W as (out, in)."""
    y = x @ weight_2d(layer).t()
    return y + layer.bias if layer.bias is not None else y


def _hooked_reference(model_name, install):
    ref, _ = tiny(model_name)
    anat = anatomy(ref)
    handles = install(anat)
    return ref, handles


def _bottleneck_ref(z, down_w, down_b, up_w, up_b, act, scale):
    return scale * (act(z @ down_w.t() + down_b) @ up_w.t() + up_b)


def _swish(h):
    return h * torch.sigmoid(h)


def _relu(h):
    return h.clamp(min=0)


def _layer(anat, block, role):
    return anat.blocks[block].linear(role)


def _sequential_install(method, roles, act, weights):
    """Hooks that add scale·W_up f(W_down h) to the output of each role's layer (weights: (layer idx, role) -> tensors)."""

    def install(anat):
        hs = []
        for b in range(len(anat.blocks)):
            for role in roles:
                w = weights[(b, role)]

                def hook(mod, args, out, w=w):
                    return out + _bottleneck_ref(out, *w, act, 1.0)

                hs.append(_layer(anat, b, role).register_forward_hook(hook))
        return hs

    return install


def _adapter_weights(method, anat, roles, phm: bool = False):
    out = {}
    for b in range(len(anat.blocks)):
        for role in roles:
            a = _layer(anat, b, role).adapter
            if phm:
                ws = [_kron_sum(lin) for lin in (a.down, a.up)]
                out[(b, role)] = (ws[0], a.down.bias.detach(), ws[1], a.up.bias.detach())
            else:
                out[(b, role)] = (a.down.weight.detach(), a.down.bias.detach(), a.up.weight.detach(), a.up.bias.detach())
    return out


def _kron_sum(phm):
    """Compacter's W = Σ_i A_i ⊗ (s_i t_iᵀ), with torch.kron."""
    A, s, t = phm.rule.A.detach(), phm.s.detach(), phm.t.detach()
    return sum(torch.kron(A[i], torch.outer(s[i], t[i])) for i in range(A.shape[0]))


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
@pytest.mark.parametrize(("method", "roles", "act"), [
    ("houlsby", ("o", "down"), _swish),
    ("pfeiffer", ("down",), _relu),
    ("compacter", ("o", "down"), torch.nn.functional.gelu),
    ("compacter_pp", ("down",), torch.nn.functional.gelu),
])
def test_sequential_adapters_match_the_bottleneck_formula(model_name, method, roles, act):
    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, method)
    _randomize(m)
    weights = _adapter_weights(m, m.anatomy, roles, phm=method.startswith("compacter"))
    ref, _ = _hooked_reference(model_name, _sequential_install(m, roles, act, weights))
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-bert"])
@pytest.mark.parametrize(("method", "scale"), [("parallel", 1.0), ("scaled_parallel", 4.0)])
def test_parallel_adapters_read_the_ffn_input_and_add_to_its_output(model_name, method, scale):
    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, method)
    _randomize(m)
    weights = _adapter_weights(m, m.anatomy, ("down",))

    def install(anat):
        hs, seen = [], {}
        for b in range(len(anat.blocks)):
            hs.append(_layer(anat, b, "up").register_forward_pre_hook(lambda mod, args, b=b: seen.__setitem__(b, args[0])))
            hs.append(_layer(anat, b, "down").register_forward_hook(
                lambda mod, args, out, b=b: out + _bottleneck_ref(seen[b], *weights[(b, "down")], _relu, scale)))
        return hs

    ref, _ = _hooked_reference(model_name, install)
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_krona_is_the_kronecker_product_update(model_name):
    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "krona", scale=0.5)
    _randomize(m)
    deltas = {n: 0.5 * torch.kron(c.A.detach(), c.B.detach()) for n, _layer_, c in m.children()}
    for _n, layer, c in m.children():
        assert c.A.shape[0] * c.B.shape[0] == weight_2d(layer).shape[0]
        assert c.A.shape[1] * c.B.shape[1] == weight_2d(layer).shape[1]

    def install(anat):
        return [mod.register_forward_hook(lambda mod, args, out, d=deltas[name]: out + args[0] @ d.t())
                for name, _role, _i, mod in anat.linears("q,v")]

    ref, handles = _hooked_reference(model_name, install)
    assert len(handles) == len(deltas)
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-5)


def test_krona_factor_shapes_follow_peft_lokr():
    factorization = pytest.importorskip("peft.tuners.lokr.layer").factorization
    from leantune.methods.krona import factor_pair

    for dim in range(1, 400):
        assert factor_pair(dim) == tuple(factorization(dim, -1)), dim


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-bert"])
def test_ia3_scales_keys_values_and_the_ffn_activation(model_name):
    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "ia3")
    _randomize(m, ones_centered=True)
    anat = m.anatomy
    q = anat.n_heads * anat.head_dim
    scales = []
    for b in range(len(anat.blocks)):
        blk = anat.blocks[b]
        if "qkv" in blk.linears:
            s = blk.linears["qkv"].ia3
            full = torch.cat([torch.ones(q), s.l_k.detach(), s.l_v.detach()])
            scales.append({"qkv": full, "ffn": blk.linear("down").ia3.l_ff.detach()})
        else:
            scales.append({"k": blk.linear("k").ia3.l_k.detach(), "v": blk.linear("v").ia3.l_v.detach(),
                           "ffn": blk.linear("down").ia3.l_ff.detach()})

    def install(ra):
        hs = []
        for b, blk in enumerate(ra.blocks):
            for role in ("qkv", "k", "v"):
                if role in scales[b] and role in blk.linears:
                    hs.append(blk.linears[role].register_forward_hook(lambda mod, a, out, v=scales[b][role]: out * v))
            hs.append(blk.linear("down").register_forward_pre_hook(lambda mod, a, v=scales[b]["ffn"]: (a[0] * v,)))
        return hs

    ref, _ = _hooked_reference(model_name, install)
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-5)


def test_compacter_slow_weights_are_shared_and_saved_once():
    model, _ = tiny("builtin:tiny-llama")
    m = leantune.apply(model, "compacter")
    rules = {id(c.down.rule.A) for _, _, c in m.children()} | {id(c.up.rule.A) for _, _, c in m.children()}
    assert len(rules) == 2  # one set for the down projections, one for the up projections
    assert sum(k.endswith("rule.A") for k in m.state()) == 2
    assert len(m.layers) == 2 * len(m.anatomy.blocks)  # Houlsby placement: two per block


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel", "scaled_parallel", "compacter", "compacter_pp",
                                    "krona", "ia3"])
def test_new_tensors_are_float32_on_a_bf16_base(method):
    model, tok = tiny("builtin:tiny-llama")
    model.to(torch.bfloat16)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, method)
    assert {p.dtype for _, p in m.trainable_parameters()} == {torch.float32}
    _randomize(m, ones_centered=method == "ia3")
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in m.trainable_parameters())


def test_a_family_without_a_placement_point_refuses_at_apply():
    model, _ = tiny("builtin:tiny-llama")
    spec = dataclasses.replace(family_spec(model), placements={"ffn_act": None})
    with pytest.raises(PlacementError, match="ffn_act"):
        get_method("ia3")().apply(model, anatomy(model, spec))
    assert not any(hasattr(mod, "ia3") for mod in model.modules())  # refused before anything was attached
    fresh, _ = tiny("builtin:tiny-llama")
    ok = get_method("ia3")(get_method("ia3").config_cls(points="keys,values")).apply(fresh, anatomy(fresh, spec))
    assert len(ok.layers) == 2 * len(ok.anatomy.blocks)


# -- PEFT round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "model_name"), [
    ("ia3", "builtin:tiny-llama"), ("ia3", "builtin:tiny-gpt2"), ("ia3", "builtin:tiny-bert"),
    ("krona", "builtin:tiny-llama"), ("krona", "builtin:tiny-bert"),
])
def test_peft_loads_the_export_with_equal_logits(method, model_name, tmp_path):
    peft = pytest.importorskip("peft")
    from leantune.interop.peft import export_peft

    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, method, **({"targets": "all-linear", "scale": 0.5} if method == "krona" else {}))
    _randomize(m, ones_centered=method == "ia3")
    ours = logits(model, batch)
    export_peft(model, tmp_path / "peft")
    base, _ = tiny(model_name)
    assert not torch.allclose(logits(base, batch), ours, atol=1e-3)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    assert type(loaded.peft_config["default"]).__name__ == {"ia3": "IA3Config", "krona": "LoKrConfig"}[method]
    torch.testing.assert_close(logits(loaded, batch), ours, rtol=0, atol=1e-5)


def test_krona_on_conv1d_refuses_a_peft_export_and_says_what_to_do(tmp_path):
    from leantune.interop.peft import export_peft

    model, _ = tiny("builtin:tiny-gpt2")
    leantune.apply(model, "krona")
    with pytest.raises(ValueError, match="Conv1D.*merged"):
        export_peft(model, tmp_path / "peft")
