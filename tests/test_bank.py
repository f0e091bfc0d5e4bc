"""The adapter bank: mixed batches equal each adapter alone on its rows, switch and fuse are exact, the base stays
bitwise the base."""

from __future__ import annotations

import warnings

import pytest
import torch

import leantune
from conftest import perturbed_adapter
from leantune.methods.base import list_methods
from leantune.methods.s2ft import fuse as s2ft_fuse
from leantune.serve.bank import AdapterBank, check_name

# (method, options): mixed ranks and index counts share one bank
MIXED = [
    ("lora", {"r": 4}),
    ("lora", {"r": 8, "rslora": True, "targets": "q,v,down"}),
    ("lora", {"r": 4, "dora": True}),  # an output scale, a low-rank term and (GPT-2) a bias term
    ("s2ft", {"budget": "count", "heads": 1, "channels": 6, "seed": 1}),
    ("s2ft", {"budget": "count", "heads": 2, "channels": 3, "seed": 2, "targets": "o,down,v,up"}),
    ("ia3", {}),
    ("bitfit", {}),
]


def base(name="builtin:tiny-llama"):
    model, _ = leantune.load_model(name)
    return model.float().eval()


def ids(seed=0, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (b, t), generator=g)


def make_adapter(folder, model_name, method, noise_seed, **opts):
    return perturbed_adapter(folder, base(model_name), method, noise_seed, 0.2, **opts)


@torch.no_grad()
def alone(model_name, folder, x):
    model = base(model_name)
    if folder is not None:
        leantune.load(model, folder)
    return model(input_ids=x).logits


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module", params=["builtin:tiny-llama", "builtin:tiny-gpt2"])
def bank_setup(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name.split(":")[1])
    opts = MIXED if name.endswith("llama") else [(m, {k: v for k, v in o.items() if k != "targets"}) for m, o in MIXED]
    folders = {f"a{i}.{m}": make_adapter(root / f"a{i}", name, m, i, **o) for i, (m, o) in enumerate(opts)}
    return name, folders


def filled_bank(name, folders):
    """A fresh base, its parameters before anything was added, and a bank holding every adapter of ``folders``."""
    model = base(name)
    before = params(model)
    bank = AdapterBank(model)
    for n, f in folders.items():
        bank.add(n, f)
    return model, before, bank


def test_every_mixed_batch_method_is_covered():
    mixed = {cls.name for cls in list_methods() if cls().capabilities.mixed_batch}
    assert mixed == {m for m, _ in MIXED}, "a method says mixed_batch: add it to MIXED"


def test_mixed_batch_logits_equal_each_adapter_alone(bank_setup):
    name, folders = bank_setup
    model, before, bank = filled_bank(name, folders)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # adding left the base as it was
    names = [*folders, None, *reversed(list(folders))]  # every adapter, the base, each twice
    x = ids(1, b=len(names))
    got = bank.forward(x, names)
    for i, n in enumerate(names):
        want = alone(name, folders[n] if n else None, x[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5, msg=f"row {i} ({n})")
    assert bank.current is None and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rows_on_consecutive_slots_read_the_stacks_as_views_and_equal_each_adapter_alone(bank_setup):
    name, folders = bank_setup
    _model, _before, bank = filled_bank(name, folders)
    loras, s2fts = ([n for n in folders if n.endswith(m)] for m in (".lora", ".s2ft"))
    for names in (loras, s2fts, s2fts[::-1]):  # in the bank's order; reversed: sorted back to it
        x = ids(3, b=len(names))
        got = bank.forward(x, names)
        views = [k.__name__ for slots in bank._slots_of[1].values() for k, s in slots.items() if s.start is not None]
        assert views, "no layer read its stacks as a view: the test does not reach that path"
        for i, n in enumerate(names):
            want = alone(name, folders[n], x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5, msg=f"row {i} ({n})")


def test_repeated_adapters_on_one_token_gather_each_adapter_once_and_equal_each_alone(bank_setup):
    name, folders = bank_setup
    _model, _before, bank = filled_bank(name, folders)
    loras = [n for n in folders if n.endswith(".lora")]
    names = [loras[i % 2] for i in range(8)] + [None, loras[0]]  # a decoding step's shape: few tokens, repeats
    x = ids(4, b=len(names), t=1)
    got = bank.forward(x, names)
    groups = [s.group for slots in bank._slots_of[1].values() for s in slots.values() if s.group is not None]
    assert groups, "no layer laid its rows out by adapter: the test does not reach that path"
    for i, n in enumerate(names):
        want = alone(name, folders[n] if n else None, x[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5, msg=f"row {i} ({n})")


def test_whole_batch_on_one_adapter_takes_the_switch_and_the_base_comes_back_bitwise(bank_setup):
    name, folders = bank_setup
    model, before, bank = filled_bank(name, folders)
    x = ids(2, b=2)
    for n in folders:
        got = bank.forward(x, [n, n])
        assert bank.current == n
        torch.testing.assert_close(got, alone(name, folders[n], x), atol=1e-5, rtol=1e-5, msg=n)
    bank.switch(None)
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_switch_only_adapters_run_as_their_own_group(tmp_path):
    krona = make_adapter(tmp_path / "krona", "builtin:tiny-llama", "krona", 3)
    lora = make_adapter(tmp_path / "lora", "builtin:tiny-llama", "lora", 4, r=4)
    model = base()
    before = params(model)
    bank = AdapterBank(model)
    bank.add("krona", krona)
    bank.add("lora", lora)
    assert not bank.adapters["krona"].mixed and bank.adapters["lora"].mixed
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    names = ["krona", "lora", None, "krona"]
    x = ids(3, b=4)
    got = bank.forward(x, names)
    for i, n in enumerate(names):
        want = alone("builtin:tiny-llama", {"krona": krona, "lora": lora}.get(n), x[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="switch only"):
        with bank.using(["krona", "lora"]):
            pass
    bank.switch(None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_dora_on_a_base_with_biases_gives_the_bias_back_what_its_output_scale_takes(tmp_path):
    """DoRA's terms: an output scale f (bias included), B's rows scaled by f, and (1 - f) ⊙ b back on the bias.
    GPT-2's layers have biases; a random-init base has them at zero, so this base gets nonzero ones."""
    model, tok = leantune.load_model("builtin:tiny-gpt2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    name = str(tmp_path / "base")
    dora = make_adapter(tmp_path / "dora", name, "lora", 5, r=4, dora=True)
    lora = make_adapter(tmp_path / "lora", name, "lora", 6, r=4)
    model = base(name)
    before = params(model)
    bank = AdapterBank(model)
    bank.add("dora", dora)
    bank.add("lora", lora)
    assert bank.adapters["dora"].mixed
    names = ["dora", "lora", None, "dora"]
    x = ids(7, b=4)
    got = bank.forward(x, names)
    for i, n in enumerate(names):
        want = alone(name, {"dora": dora, "lora": lora}.get(n), x[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5, msg=f"row {i} ({n})")
    # one adapter for the batch: the switch (the scale merged into W and the bias, the low-rank change, the bias back)
    torch.testing.assert_close(bank.forward(x[:2], ["dora", "dora"]), alone(name, dora, x[:2]), atol=1e-5, rtol=1e-5)
    assert bank.current == "dora"
    bank.switch(None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


SWITCH_ONLY = sorted(c.name for c in list_methods() if c().capabilities.mergeable and not c().capabilities.mixed_batch)


@pytest.mark.parametrize("method", SWITCH_ONLY)
def test_every_mergeable_method_is_served_through_the_switch_or_refused_with_the_reason(method, tmp_path):
    folder = make_adapter(tmp_path / method, "builtin:tiny-llama", method, 1)
    model = base()
    before = params(model)
    bank = AdapterBank(model)
    try:
        bank.add(method, folder)
    except ValueError as e:  # Light-PEFT mid-estimation: masks its merge does not fold in
        assert method == "light_peft" and "merged form does not compute what the adapter computes" in str(e)
        return
    x = ids(5, b=2)
    got = bank.forward(x, [method, None])
    torch.testing.assert_close(got[:1], alone("builtin:tiny-llama", folder, x[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], alone("builtin:tiny-llama", None, x[1:]), atol=0, rtol=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def s2ft_state(seed):
    model = base()
    m = leantune.apply(model, "s2ft", budget="count", heads=1, channels=6, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for _, p in m.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, {k: v.clone() for k, v in m.state().items()}


def dense_merge(w0, state, weight=1.0, into=None):
    from test_s2ft import dense_deltas

    out = dict(into or {n: w.clone() for n, w in w0.items()})
    for name, d in dense_deltas(w0, state, weight).items():
        out[name] = out[name] + d
    return out


def test_s2ft_switch_is_exact_index_add_and_switching_back_restores_the_base(tmp_path):
    (ma, _a), (mb, b) = s2ft_state(1), s2ft_state(2)
    leantune.save(ma, tmp_path / "a")
    leantune.save(mb, tmp_path / "b")
    model = base()
    w0 = params(model)
    bank = AdapterBank(model)
    bank.add("a", tmp_path / "a")
    bank.add("b", tmp_path / "b")
    bank.switch("a")
    bank.switch("b")  # a's columns restored from the copy kept at its switch, b's added
    want = dense_merge(w0, b)
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    bank.switch(None)
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())


def test_fuse_is_the_weighted_sum_of_the_changes(tmp_path):
    (ma, a), (mb, b) = s2ft_state(1), s2ft_state(2)
    leantune.save(ma, tmp_path / "a")
    leantune.save(mb, tmp_path / "b")
    lora = make_adapter(tmp_path / "l", "builtin:tiny-llama", "lora", 5, r=4)
    model = base()
    w0 = params(model)
    bank = AdapterBank(model)
    for n in ("a", "b"):
        bank.add(n, tmp_path / n)
    bank.add("l", lora)
    bank.fuse("ab", {"a": 0.5, "b": 2.0})  # powers of two: every product is exact
    bank.switch("ab")
    zero = {n: torch.zeros_like(w) for n, w in w0.items()}
    da, db = dense_merge(zero, a, 0.5), dense_merge(zero, b, 2.0)
    want = {n: w0[n] + (da[n] + db[n]) for n in w0}  # the fused block added once
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    with pytest.warns(UserWarning, match="overlap"):
        same = s2ft_fuse([a, b], weights=[0.5, 2.0])  # the saveable s2ft state of the same fuse
    ref = base()
    leantune.apply(ref, "s2ft", budget="count", heads=1, channels=6).load_state(same)
    x = ids(4, b=3)
    torch.testing.assert_close(bank.forward(x, ["ab", None, "l"])[:1], ref(input_ids=x[:1]).logits,
                               atol=1e-5, rtol=1e-5)
    # a fused LoRA (ranks concatenated) with a weight: the merged weights are base + w·ΔW
    bank.fuse("l2", {"l": -1.5})
    bank.switch("l2")
    lm = base()
    leantune.load(lm, lora)
    for n, mod in lm.leantune_method.layers.items():
        got = dict(model.named_parameters())[n + ".weight"]
        torch.testing.assert_close(got, w0[n + ".weight"] - 1.5 * mod.lora.delta_weight(), atol=1e-6, rtol=1e-6)


def test_generate_per_row_equals_each_adapter_alone(tmp_path):
    from leantune.data.evaluate import greedy_generate

    folders = {"x": make_adapter(tmp_path / "x", "builtin:tiny-llama", "lora", 7, r=4),
               "y": make_adapter(tmp_path / "y", "builtin:tiny-llama", "s2ft", 8, budget="count", heads=1,
                                 channels=6)}
    model, tok = leantune.load_model("builtin:tiny-llama")
    bank = AdapterBank(model.eval())
    for n, f in folders.items():
        bank.add(n, f)
    prompts, names = ["hello there", "a", "the cat sat"], ["x", "y", None]
    enc = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    got = bank.generate(enc, names, 6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for p, n, g in zip(prompts, names, got, strict=True):
        ref, _ = leantune.load_model("builtin:tiny-llama")
        if n:
            leantune.load(ref, folders[n])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = greedy_generate(ref.eval(), tok, [p], 6)[0]
        assert tok.decode(g, skip_special_tokens=True) == want


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", "base", "a b", "x\\y"])
def test_adapter_names_are_checked(bad):
    with pytest.raises(ValueError, match="adapter name|reserved"):
        check_name(bad)


def test_unknown_adapter_is_a_clear_error():
    bank = AdapterBank(base())
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        bank.forward(ids(), ["nope", None])


def test_serve_without_the_extra_says_how_to_install(monkeypatch):
    from typer.testing import CliRunner

    import leantune.serve.server as server
    from leantune.cli import app

    monkeypatch.setattr(server, "FastAPI", None)  # as if fastapi were not installed
    result = CliRunner().invoke(app, ["serve", "--model", "builtin:tiny-llama"])
    assert result.exit_code == 2
    assert "pip install 'leantune[serve]'" in result.output


def test_mixed_batch_under_autograd_equals_the_no_grad_path(tmp_path):
    folders = {n: make_adapter(tmp_path / n, "builtin:tiny-llama", m, i, **o) for i, (n, (m, o)) in
               enumerate({"l": ("lora", {"r": 4}), "s": ("s2ft", {"budget": "count", "heads": 1, "channels": 6,
                                                                  "targets": "o,down,v,up"}),
                          "i": ("ia3", {}), "b": ("bitfit", {})}.items())}
    bank = AdapterBank(base())
    for n, f in folders.items():
        bank.add(n, f)
    names = ["l", "s", "i", "b", None]
    x = ids(6, b=5)
    want = bank.forward(x, names)
    with torch.enable_grad(), bank.using(names):  # the out-of-place path
        got = bank.model(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
