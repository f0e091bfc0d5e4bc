"""S²FT: gradients against the full-weight gradient, saved-for-backward bytes, budget and selection, merge /
unmerge / fuse exactness (the switch: tests/test_bank.py), save/load, and the LoRA / PEFT export."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import leantune
from leantune.anatomy import anatomy, in_out_features, is_conv1d, weight_2d
from leantune.methods import fused
from leantune.methods.base import ConfigError
from leantune.methods.s2ft import S2FT, S2FTConfig, fuse

MODELS = ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-bert"]


def base(name="builtin:tiny-llama", dtype=torch.float32):
    model, _ = leantune.load_model(name)
    return model.to(dtype)


def batch(seed=0, b=2, t=7, pad_last=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def randomize(method, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def loss_of(model, b):
    return model(**b).loss


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".s2ft." not in n}


def merged_reference(base_model, method):
    """A copy of the base with ΔW added densely, every target weight trainable: the slow obvious reference."""
    ref = copy.deepcopy(base_model)
    mods = dict(ref.named_modules())
    for name in method.layers:
        mod = mods[name]
        with torch.no_grad():
            weight_2d(mod).add_(method.delta_weight(name))
        mod.weight.requires_grad_(True)
    return ref, mods


# -- partial backprop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "layer-then-term"])
@pytest.mark.parametrize("name", MODELS)
def test_delta_grad_is_slice_of_full_weight_grad(name, path, monkeypatch):
    if path == "layer-then-term":  # the path autocast and other libraries' forwards take (methods/fused.py)
        monkeypatch.setattr(fused, "can_fuse", lambda *a: False)
    model = base(name, torch.float64)
    reference_base = copy.deepcopy(model)
    method = leantune.apply(model, "s2ft", targets="o,down,v,up", budget="count", heads=1, channels=5)
    randomize(method)
    b = batch()
    loss_of(model, b).backward()
    ref, mods = merged_reference(reference_base, method)
    loss_of(ref, b).backward()
    for m in method.layers.values():  # which path ran
        probe = m(torch.randn(1, 2, in_out_features(m)[0], dtype=torch.float64, requires_grad=True))
        assert ("_SliceLinear" in type(probe.grad_fn).__name__) == (path == "fused")
    for lname, mod in method.layers.items():
        s = mod.s2ft
        g = mods[lname].weight.grad
        g2d = g.t() if is_conv1d(mods[lname]) else g
        expected = g2d.index_select(s.dim, s.indices)
        torch.testing.assert_close(s.delta.grad, expected, rtol=1e-9, atol=1e-12)


def test_base_weights_get_no_gradient():
    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    loss_of(model, batch()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".s2ft." not in n)
    assert all(p.grad is not None for _, p in method.trainable_parameters())


def saved_bytes(fn):
    """Bytes of the distinct non-parameter storages autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


def test_saved_for_backward_is_the_k_columns_not_the_input():
    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    o_name = next(n for n in method.layers if n.endswith("o_proj"))
    o = method.layers[o_name]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(3, 5, 96, requires_grad=True)
    _, saved = saved_bytes(lambda: o(x))
    kept = [t for ptr, t in saved.items() if ptr not in params]
    k = len(o.s2ft.indices)
    assert k == 24
    assert [t.numel() for t in kept] == [3 * 5 * k]  # the k columns of every token (kept as a token-major block)
    assert torch.equal(kept[0].reshape(3, 5, k), x.detach()[..., o.s2ft.indices])
    # plain autograd on the full weight would keep the whole input
    full = torch.nn.Linear(96, 64)
    _, saved_full = saved_bytes(lambda: full(x))
    assert any(t.numel() == x.numel() for t in saved_full.values())


def test_grad_accumulates_over_micro_batches():
    model = base(dtype=torch.float64)
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    b1, b2 = batch(1), batch(2)
    (loss_of(model, b1) + loss_of(model, b2)).backward()
    together = [p.grad.clone() for _, p in method.trainable_parameters()]
    for _, p in method.trainable_parameters():
        p.grad = None
    loss_of(model, b1).backward()
    loss_of(model, b2).backward()
    for g, (_, p) in zip(together, method.trainable_parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_bf16_autocast_matches_plain_autograd_under_autocast():
    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    o = next(m for n, m in method.layers.items() if n.endswith("o_proj"))
    s = o.s2ft
    x = torch.randn(2, 5, 96).to(torch.bfloat16).float().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    d_ref = s.delta.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = o(x)
        y_ref = F.linear(x_ref, o.weight) + F.linear(x_ref[..., s.indices], d_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # The fused path adds the block into the bf16 product in one addmm_ (rounding once, where plain autocast
    # rounds both products, then their sum): it must be at least as close to the exact result on the same bf16
    # inputs, and within bf16 rounding of plain autograd.
    with torch.no_grad():
        bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
        exact = F.linear(bf(x), bf(o.weight)) + F.linear(bf(x)[..., s.indices], bf(s.delta))
    assert (y.double() - exact).abs().max() <= (y_ref.double() - exact).abs().max()
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=2**-7)
    g = torch.randn(y.shape).to(torch.bfloat16)
    y.backward(g)
    y_ref.backward(g)
    assert s.delta.grad.dtype == torch.float32
    torch.testing.assert_close(s.delta.grad, d_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)  # bf16 sums in a different order


def test_bf16_model_trains_a_float32_delta():
    model = base(dtype=torch.bfloat16)
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    loss_of(model, batch()).backward()
    for _, p in method.trainable_parameters():  # precision.py: what the optimizer updates is float32
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# -- identity, merge, unmerge, remove ----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_identity_at_init(name):
    model = base(name)
    b = batch()
    with torch.no_grad():
        before = model(input_ids=b["input_ids"]).logits
        leantune.apply(model, "s2ft", targets="o,down,v,up", budget="count", heads=1, channels=4)
        after = model(input_ids=b["input_ids"]).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", MODELS)
def test_merge_matches_unmerged_and_unmerge_is_bitwise(name):
    model = base(name)
    w0 = weights(model)
    method = leantune.apply(model, "s2ft", targets="o,down,v,up", budget="count", heads=1, channels=4)
    randomize(method)
    ids = batch()["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        leantune.merge(model)
        merged = model(input_ids=ids).logits
        changed = sum(int((p != w0[n]).sum()) for n, p in weights(model).items())
        leantune.unmerge(model)
        back = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert changed == method.num_changed()
    assert all(torch.equal(p, w0[n]) for n, p in weights(model).items())
    assert torch.equal(back, unmerged)


def test_remove_gives_back_the_base_architecture_and_weights():
    model = base()
    names = [n for n, _ in model.named_modules()]
    w0 = weights(model)
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    leantune.merge(model)
    leantune.remove(model)
    assert [n for n, _ in model.named_modules()] == names
    assert {n: p for n, p in weights(model).items()}.keys() == w0.keys()
    assert all(torch.equal(p, w0[n]) for n, p in weights(model).items())
    assert getattr(model, "leantune_method", None) is None


def test_merge_and_unload_is_the_plain_base_with_the_delta_folded_in():
    model = base()
    names = [n for n, _ in model.named_modules()]
    w0 = weights(model)
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    deltas = {n + ".weight": method.delta_weight(n) for n in method.layers}
    plain = method.merge_and_unload()
    assert [n for n, _ in plain.named_modules()] == names
    assert all(torch.equal(p, w0[n] + deltas[n] if n in deltas else w0[n]) for n, p in weights(plain).items())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# -- geometry: GQA, explicit head_dim, Conv1D, BERT --------------------------------------------------------


def test_gqa_explicit_head_dim_selects_whole_head_blocks():
    model = base()
    anat = anatomy(model)
    assert (anat.n_heads, anat.n_kv_heads, anat.head_dim, anat.hidden) == (4, 2, 24, 64)
    method = leantune.apply(model, "s2ft", targets="o,v", budget="count", heads=2)
    for name, mod in method.layers.items():
        s = mod.s2ft
        n_units = 4 if name.endswith("o_proj") else 2  # o: query heads; v: KV heads
        units = method.selected_units()[name]
        assert len(units) == min(2, n_units)
        expected = torch.cat([torch.arange(u * 24, (u + 1) * 24) for u in units])
        assert torch.equal(s.indices, expected)


def test_gpt2_conv1d_v_slice_lies_in_the_fused_v_rows():
    model = base("builtin:tiny-gpt2")
    method = leantune.apply(model, "s2ft", targets="o,v", budget="count", heads=1)
    c_attn = method.layers["transformer.h.0.attn.c_attn"]
    assert c_attn.s2ft.side == "out" and c_attn.weight.shape == (64, 192)  # Conv1D stores (in, out)
    idx = c_attn.s2ft.indices
    assert int(idx.min()) >= 128 and int(idx.max()) < 192 and len(idx) == 16
    assert method.layers["transformer.h.0.attn.c_proj"].s2ft.delta.shape == (64, 16)


def test_bert_targets_attention_output_and_ffn_output():
    model = base("builtin:tiny-bert")
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=3)
    assert sorted(method.layers) == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense",
    ]
    assert method.layers["bert.encoder.layer.0.attention.output.dense"].s2ft.delta.shape == (64, 16)


# -- budget ------------------------------------------------------------------------------------------------


def test_count_budget_is_exact_per_layer():
    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=3, channels=10)
    units = method.selected_units()
    for i in range(2):
        assert len(units[f"model.layers.{i}.self_attn.o_proj"]) == 3
        assert len(units[f"model.layers.{i}.mlp.down_proj"]) == 10
    assert method.num_trainable() == 2 * (3 * 24 * 64 + 10 * 64)


def test_count_budget_past_the_heads_is_an_error():
    with pytest.raises(ConfigError, match="4 heads, asked for 5"):
        leantune.apply(base(), "s2ft", budget="count", heads=5, channels=1)


def test_lora_budget_matches_lora_parameter_count():
    # tiny-llama, LoRA r=2 all-linear: 2 * 1120 = 2240 per layer. Half for heads: 1120 / 1536 rounds to 1 head;
    # the remaining 704 buy 11 channels of 64: exactly LoRA's count.
    method = leantune.apply(base(), "s2ft", lora_r=2)
    lora = leantune.apply(base(), "lora", r=2)
    assert method.num_trainable() == lora.num_trainable() == 4480
    assert all(len(u) == (1 if "o_proj" in n else 11) for n, u in method.selected_units().items())


def test_lora_budget_larger_than_the_targets_warns_and_trains_them_all():
    with pytest.warns(UserWarning, match="exceeds"):
        method = leantune.apply(base(), "s2ft")  # r=16 on a 64-wide model
    assert method.num_trainable() == 2 * (96 * 64 + 128 * 64)


def test_ratio_budget_rounds_and_keeps_one_per_layer():
    method = leantune.apply(base(), "s2ft", budget="ratio", ratio=0.1)
    units = method.selected_units()
    assert len(units["model.layers.0.self_attn.o_proj"]) == 1  # 0.4 heads -> at least one
    assert len(units["model.layers.1.mlp.down_proj"]) == 13  # 12.8 channels -> 13


# -- selection ---------------------------------------------------------------------------------------------


def test_random_selection_is_seeded():
    a = leantune.apply(base(), "s2ft", budget="count", heads=2, channels=8, seed=3).selected_units()
    b = leantune.apply(base(), "s2ft", budget="count", heads=2, channels=8, seed=3).selected_units()
    c = leantune.apply(base(), "s2ft", budget="count", heads=2, channels=8, seed=4).selected_units()
    assert a == b and a != c


def reference_input_norms(model, roles, batches):
    """Per layer, the L2 norm of every input column of o / down over the non-padding tokens."""
    anat = anatomy(model)
    sums, handles, cur = {}, [], {}
    for name, _r, _i, mod in anat.linears(roles):
        def hook(m, args, name=name):
            x = args[0] * cur["mask"][..., None]
            sums[name] = sums.get(name, 0) + (x**2).sum(dim=(0, 1))
        handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            cur["mask"] = b["attention_mask"]
            model(**b)
    for h in handles:
        h.remove()
    return sums


@pytest.mark.parametrize("order", ["smallest", "largest"])
def test_activation_selection_picks_by_input_norm(order):
    batches = [batch(1, pad_last=3), batch(2)]
    sums = reference_input_norms(base(), "o,down", batches)
    method = leantune.apply(base(), S2FT(S2FTConfig(budget="count", heads=2, channels=6, selection="activation",
                                                    order=order), calibration=batches))
    for name, units in method.selected_units().items():
        norms = sums[name].reshape(4, 24).sum(1) if name.endswith("o_proj") else sums[name]
        want = torch.argsort(norms, descending=order == "largest")[: len(units)]
        assert units == sorted(want.tolist())


def test_weight_selection_picks_smallest_column_norms():
    model = base()
    ref = {n: weight_2d(m).detach().pow(2).sum(0) for n, _r, _i, m in anatomy(model).linears("down")}
    method = leantune.apply(model, "s2ft", targets="down", budget="count", channels=7, selection="weight")
    for name, units in method.selected_units().items():
        assert units == sorted(torch.argsort(ref[name])[:7].tolist())


def test_gradient_selection_uses_the_full_weight_gradient():
    batches = [batch(1), batch(2)]
    ref_model = base()
    for _n, _r, _i, m in anatomy(ref_model).linears("down"):
        m.weight.requires_grad_(True)
    for b in batches:
        loss_of(ref_model, b).backward()
    ref = {n: m.weight.grad.pow(2).sum(0) for n, _r, _i, m in anatomy(ref_model).linears("down")}
    model = base()
    method = S2FT(S2FTConfig(targets="down", budget="count", channels=5, selection="gradient", order="largest"))
    leantune.apply(model, method)
    method.calibrate(batches)
    for name, units in method.selected_units().items():
        assert units == sorted(torch.argsort(ref[name], descending=True)[:5].tolist())
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if ".s2ft." not in n)


def test_uncalibrated_data_selection_refuses_to_train():
    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4, selection="activation")
    with pytest.raises(RuntimeError, match="calibrate"):
        model(input_ids=batch()["input_ids"])
    with pytest.raises(RuntimeError, match="calibrate"):
        method.schedule().on_train_begin(type("Ctx", (), {"method": method})())


def test_training_loop_calibrates_on_its_first_batches():
    from leantune.data import collate, encode_examples, get_task
    from leantune.train import TrainConfig, train
    from leantune.train.loop import BatchStream

    model, tok = leantune.load_model("builtin:tiny-llama")
    data = encode_examples(tok, get_task("builtin:arith").split("train")[:32], 64)
    cfg = dict(budget="count", heads=1, channels=4, selection="activation", calibration_batches=3)
    method = leantune.apply(model, "s2ft", **cfg)
    train(model, data, TrainConfig(max_steps=1, batch_size=4, progress=False), pad_id=tok.pad_token_id)
    stream = BatchStream(data, 4, 0)
    reference = leantune.apply(base(), "s2ft", **cfg)
    reference.calibrate([collate(stream.batch(i), tok.pad_token_id) for i in range(3)])
    assert method.selected_units() == reference.selected_units()


def test_calibrate_after_training_is_refused():
    method = leantune.apply(base(), "s2ft", budget="count", heads=1, channels=4, selection="activation")
    method.calibrate([batch()])
    randomize(method)
    with pytest.raises(RuntimeError, match="before training"):
        method.calibrate([batch()])


def test_exclude_selects_indices_disjoint_from_an_adapter():
    first = leantune.apply(base(), "s2ft", budget="count", heads=2, channels=60, seed=0)
    second = leantune.apply(base(), S2FT(S2FTConfig(budget="count", heads=2, channels=60, seed=0), exclude=first))
    for name, mod in first.layers.items():
        a, b = set(mod.s2ft.indices.tolist()), set(second.layers[name].s2ft.indices.tolist())
        assert len(b) == len(a) and not a & b
    with pytest.raises(ValueError, match="outside the excluded"):
        leantune.apply(base(), S2FT(S2FTConfig(budget="count", heads=3, channels=1), exclude=first))


# -- adapters: save/load, switch, fuse -----------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = base()
    method = leantune.apply(model, S2FT(S2FTConfig(budget="count", heads=1, channels=5, selection="activation"),
                                        calibration=[batch(1)]))
    randomize(method)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    leantune.save(model, tmp_path / "a")
    fresh = base()
    loaded = leantune.load(fresh, tmp_path / "a")  # no calibration data needed: indices come from the file
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, want)
    assert loaded.selected_units() == method.selected_units()
    assert all(not p.requires_grad for _, p in loaded.trainable_parameters())


def test_load_state_rejects_out_of_range_indices():
    method = leantune.apply(base(), "s2ft", budget="count", heads=1, channels=5)
    state = {k: v.clone() for k, v in method.state().items()}
    state["model.layers.0.mlp.down_proj.in_indices"][0] = 500
    with pytest.raises(ValueError, match=r"in \[0, 128\)"):
        method.load_state(state)


def make_adapter(seed, **kw):
    opts = {"budget": "count", "heads": 1, "channels": 6, "seed": seed, **kw}
    method = leantune.apply(base(), "s2ft", **opts)
    randomize(method, seed=seed + 10)
    return {k: v.clone() for k, v in method.state().items()}


def dense_deltas(model_weights, state, weight=1.0):
    """Reference: each (indices, D) of ``state`` as a dense (out, in) ΔW, times ``weight``."""
    out = {}
    for key, idx in state.items():
        if not key.endswith("_indices"):
            continue
        name, side = key.rsplit(".", 1)[0], key.rsplit(".", 1)[1].split("_")[0]
        dense = torch.zeros_like(model_weights[name + ".weight"])
        if side == "in":
            dense[:, idx] = state[f"{name}.in_delta"]
        else:
            dense[idx, :] = state[f"{name}.out_delta"]
        out[name + ".weight"] = weight * dense
    return out


def dense_merge(model_weights, deltas):
    return {n: w + deltas[n] if n in deltas else w.clone() for n, w in model_weights.items()}


def test_fuse_is_the_weighted_sum_of_the_deltas():
    a, b = make_adapter(1), make_adapter(2)
    w0 = weights(base())
    with pytest.warns(UserWarning, match="overlap"):
        fused = fuse([a, b], weights=[0.5, 2.0])  # powers of two: every product is exact
    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=6)
    method.load_state(fused)  # the fused adapter has more columns than this config selects
    method.merge()
    da, db = dense_deltas(w0, a, 0.5), dense_deltas(w0, b, 2.0)
    want = dense_merge(w0, {n: da[n] + db[n] for n in da})
    got = weights(model)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_fuse_of_disjoint_adapters_does_not_warn_and_saves(tmp_path):
    first = leantune.apply(base(), "s2ft", budget="count", heads=1, channels=6, seed=1)
    randomize(first, 1)
    second = leantune.apply(base(), S2FT(S2FTConfig(budget="count", heads=1, channels=6, seed=1), exclude=first))
    randomize(second, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fuse([first, second])
    model = base()
    leantune.apply(model, "s2ft", budget="count", heads=1, channels=6).load_state(fused)
    leantune.save(model, tmp_path / "fused")
    fresh = base()
    leantune.load(fresh, tmp_path / "fused")
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


# -- export: LoRA math and the real peft package ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_to_lora_reproduces_the_delta_exactly(name):
    model = base(name)
    method = leantune.apply(model, "s2ft", targets="o,down,v,up", budget="count", heads=1, channels=4)
    randomize(method)
    pairs = method.to_lora()
    assert sorted(pairs) == sorted(method.layers)
    for lname, (a, b) in pairs.items():
        assert a.shape[0] == b.shape[1] == len(method.layers[lname].s2ft.indices)
        assert torch.equal(b @ a, method.delta_weight(lname))


@pytest.mark.parametrize("name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_peft_loads_the_export_with_equal_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = base(name)
    model.save_pretrained(tmp_path / "base")
    method = leantune.apply(model, "s2ft", targets="o,down,v,up", budget="count", heads=1, channels=4)
    randomize(method)
    method.save_peft(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (name == "builtin:tiny-gpt2")
    other = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    other.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, other(input_ids=ids).logits
    assert not torch.equal(ours, base(name)(input_ids=ids).logits)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_peft_export_imports_back_as_a_leantune_lora(tmp_path):
    from leantune.interop.peft import load_peft

    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    randomize(method)
    method.save_peft(tmp_path / "peft")
    other = base()
    load_peft(other, tmp_path / "peft")
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# -- training loop -----------------------------------------------------------------------------------------


def test_training_loop_changes_only_the_selected_columns():
    from leantune.data.encode import Example, encode_examples
    from leantune.train.loop import TrainConfig, train

    model, tok = leantune.load_model("builtin:tiny-llama")
    w0 = weights(model)
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=8)
    data = encode_examples(tok, [Example(f"{i}+{i}=", str(2 * i)) for i in range(8)], 32)
    res = train(model, data, TrainConfig(max_steps=3, batch_size=4, grad_accum=2, progress=False, lr=1e-2))
    assert res.steps == 3
    assert all(torch.equal(p, w0[n]) for n, p in weights(model).items())  # base untouched while unmerged
    method.merge()
    for name, mod in method.layers.items():
        diff = (weight_2d(mod) != w0[name + ".weight"]).any(dim=0)
        assert set(torch.nonzero(diff).flatten().tolist()) <= set(mod.s2ft.indices.tolist())
        assert bool(diff.any())


def test_fused_input_slice_allocates_no_full_width_temporary(monkeypatch):
    # One adapted o_proj, forward and backward: the output (tokens x out), the k-column copy of x and the gradient
    # at it (tokens x k each), x's gradient (tokens x in) and D's (out x k). Nothing else: the unfused path also
    # allocates a full-width zero tensor to scatter k columns into, then sums it with the base's input gradient.
    from leantune.measure.memory import allocations as all_allocations

    def allocations(fn):
        return all_allocations(fn, min_bytes=17)  # no scalars

    model = base()
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=4)
    o = next(m for n, m in method.layers.items() if n.endswith("o_proj"))
    d_in, d_out = in_out_features(o)
    k, tokens = len(o.s2ft.indices), 3 * 5
    x = torch.randn(3, 5, d_in, requires_grad=True)
    g = torch.randn(3, 5, d_out)
    fused_allocs = allocations(lambda: o(x).backward(g))
    assert fused_allocs == sorted(4 * n for n in (tokens * d_out, tokens * k, tokens * k, tokens * d_in, d_out * k))
    x.grad = o.s2ft.delta.grad = None
    monkeypatch.setattr(fused, "can_fuse", lambda *a: False)
    unfused = allocations(lambda: o(x).backward(g))
    assert sum(unfused) - sum(fused_allocs) >= 2 * 4 * tokens * d_in
