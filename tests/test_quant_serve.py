"""Serving adapters on a quantized base (bitsandbytes NF4 on the CPU): the adapter bank's mixed rows equal each
adapter alone on the same quantized base, a batch of one adapter is served through its terms (never merged into the
4-bit weights), switch-only adapters are served unmerged, the base stays bitwise as loaded; ``leantune serve``
loads the base the way the adapters were trained and refuses adapters that disagree.

Tolerance: a mixed row and the adapter alone run the same bitsandbytes layer on the same codes (the base term is
bitwise the same computation) plus the adapter's term in float32, summed in another order (the bank's batched
products over factors padded to the largest rank vs the method's own products): rtol 1e-5, atol 1e-6 (measured:
0 on this model).
"""

from __future__ import annotations

import json

import pytest
import torch

import leantune
from conftest import fixed_batch, perturbed_adapter, train_steps
from leantune.models import load_model
from leantune.serve.bank import AdapterBank

pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt", "ignore:.*budget"), pytest.mark.usefixtures("one_thread")]

MODEL = "builtin:tiny-llama"
RTOL, ATOL = 1e-5, 1e-6
# every mixed-batch method (DoRA's terms included), and switch-only ones: KronA (its merge would write into the 4-bit
# weights: attached) and LN tuning (its merge writes only norms: the switch)
ADAPTERS = {
    "lora": ("lora", {"r": 4}), "s2ft": ("s2ft", {"budget": "count", "heads": 1, "channels": 6, "seed": 1}),
    "ia3": ("ia3", {}), "bitfit": ("bitfit", {}), "dora": ("lora", {"r": 4, "dora": True}), "ln": ("ln_tuning", {}),
    "krona": ("krona", {}),
}
ATTACHED = {"krona"}
try:  # the PEFT bridge's LoRA: PEFT's own 4-bit layer, whose merge would re-quantize: attached
    import peft  # noqa: F401

    ADAPTERS["peft_lora"] = ("peft", {"peft_type": "LORA", "r": 4})
    ATTACHED.add("peft_lora")
except ImportError:
    pass


def qbase(kind="nf4"):
    return load_model(MODEL, quantize=kind)[0]


def make_adapter(folder, method, noise_seed, kind="nf4", **opts):
    """An adapter made on a ``kind`` base (None: full precision), its tensors moved off their neutral init."""
    return str(perturbed_adapter(folder, load_model(MODEL, quantize=kind)[0], method, noise_seed, 0.3, **opts))


@torch.no_grad()
def alone(folder, x, kind="nf4"):
    model = qbase(kind)
    if folder is not None:
        leantune.load(model, folder)
    return model(input_ids=x).logits


def ids(seed, b, t=9):
    return torch.randint(3, 250, (b, t), generator=torch.Generator().manual_seed(seed))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qserve")
    return {n: make_adapter(root / n, m, i, **o) for i, (n, (m, o)) in enumerate(ADAPTERS.items())}


def filled(folders, kind="nf4"):
    model = qbase(kind)
    before = state(model)
    bank = AdapterBank(model)
    for n, f in folders.items():
        bank.add(n, f)
    assert same(state(model), before)  # adding left the quantized base as it was
    return bank, before


@pytest.fixture
def bank(folders):
    return filled(folders)


@pytest.mark.parametrize("kind", ["nf4", "int8"])  # the nf4-trained adapters load on an int8 base too
def test_mixed_rows_on_a_quantized_base_equal_each_adapter_alone(folders, kind):
    bank, before = filled(folders, kind)
    assert bank.quantized
    assert {n for n, a in bank.adapters.items() if a.attached is not None} == ATTACHED
    names = [*folders, None, *reversed(list(folders))]
    x = ids(1, len(names))
    got = bank.forward(x, names)
    base_rows = alone(None, x, kind)
    for i, n in enumerate(names):
        want = alone(folders[n] if n else None, x[i:i + 1], kind)
        torch.testing.assert_close(got[i:i + 1], want, rtol=RTOL, atol=ATOL, msg=f"row {i} ({n})")
        if n is not None:  # the adapter changes the output: the comparison is not the base against itself
            assert (want - base_rows[i:i + 1]).abs().max() > 1e-3, n
    bank.switch(None)
    assert same(state(bank.model), before)


def test_a_batch_of_one_adapter_is_served_through_its_terms_never_merged_into_the_4bit_weights(folders, bank):
    bank, before = bank
    x = ids(2, 2)
    for n in folders:
        got = bank.forward(x, [n, n])
        torch.testing.assert_close(got, alone(folders[n], x), rtol=RTOL, atol=ATOL, msg=n)
        if bank.adapters[n].mixed:
            assert bank.current is None  # no switch: the terms on top of the quantized layer's output
            with pytest.raises(ValueError, match="would re-quantize the update"):
                bank.switch(n)
    bank.switch(None)
    assert same(state(bank.model), before)


def test_switch_only_adapters_alternate_with_the_mixed_group_and_the_base_comes_back(folders, bank):
    bank, before = bank
    names = ["krona", "lora", None, "krona", "ln", "s2ft", "dora"]
    x = ids(3, len(names))
    for _ in range(2):  # the attached KronA applied and taken off, the bank's forwards put back, twice
        got = bank.forward(x, names)
        for i, n in enumerate(names):
            torch.testing.assert_close(got[i:i + 1], alone(folders.get(n), x[i:i + 1]), rtol=RTOL, atol=ATOL)
    bank.switch(None)
    assert same(state(bank.model), before) and getattr(bank.model, "leantune_method", None) is None
    with pytest.raises(ValueError, match="served unmerged on this quantized base"):
        bank.fuse("f", {"krona": 1.0})
    bank.fuse("f", {"lora": 0.5, "s2ft": 1.0})  # terms fuse as terms: fine on a quantized base


def test_a_switch_only_adapter_that_cannot_come_off_a_quantized_base_is_refused_naming_it(tmp_path):
    model = qbase()
    leantune.apply(model, "lisa", gamma=1)  # its blocks dequantized in place: its merge rewrites packed weights
    train_steps(model, fixed_batch(), steps=1)
    leantune.save(model, tmp_path / "lisa")
    bank = AdapterBank(qbase())
    before = state(bank.model)
    with pytest.raises(ValueError, match=r"adapter 'blocks' .*method 'lisa' cannot be merged into a quantized base "
                                         r"and cannot be taken off it"):
        bank.add("blocks", tmp_path / "lisa")
    assert same(state(bank.model), before) and not bank.names()  # tried on a copy: the bank's base untouched


def test_generate_through_the_bank_on_nf4_equals_each_adapter_alone(folders, bank):
    from leantune.data.evaluate import greedy_generate
    from leantune.models import byte_tokenizer

    bank, _ = bank
    tok = byte_tokenizer()
    prompts = ["The cat", "1 + 1 =", "hello"]
    names = ["lora", "dora", None]
    enc = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    got = bank.generate(enc, names, 4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for p, n, g in zip(prompts, names, got, strict=True):
        model = qbase().eval()
        if n:
            leantune.load(model, folders[n])
        assert tok.decode(g, skip_special_tokens=True) == greedy_generate(model, tok, [p], 4)[0]


# -- leantune serve: the base as the adapters were trained --------------------------------------------------------


def test_serve_loads_the_base_as_the_adapters_were_trained_and_answers_as_leantune_generate(folders):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from typer.testing import CliRunner

    from leantune.cli import app
    from leantune.serve.server import create_app, load_bank
    from test_serve import Live, complete

    bank, tok = load_bank(MODEL, {n: folders[n] for n in ("lora", "dora", "s2ft")})
    assert bank.quantized and type(bank.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    live = Live(create_app(bank, tok))
    try:
        for name in ("lora", "dora", "s2ft"):
            result = CliRunner().invoke(app, ["generate", "--model", MODEL, "--adapter", folders[name], "-p",
                                              "The cat", "--max-new-tokens", "4"])
            assert result.exit_code == 0, result.output
            assert result.stdout.rstrip("\n") == "The cat" + complete(live.port, name, "The cat", max_tokens=4)
    finally:
        live.stop()


def test_serve_refuses_adapters_trained_on_bases_quantized_differently(folders, tmp_path):
    from leantune.serve.server import load_bank, recorded_quantization

    full = make_adapter(tmp_path / "full", "lora", 9, kind=None, r=4)
    int8 = make_adapter(tmp_path / "int8", "lora", 9, kind="int8", r=4)
    with pytest.raises(ValueError, match=r"quantized differently \(lora: nf4 .*; plain: full precision\).*--quantize"):
        recorded_quantization({"lora": folders["lora"], "plain": full})
    with pytest.raises(ValueError, match=r"lora: nf4.*q8: int8"):
        load_bank(MODEL, {"lora": folders["lora"], "q8": int8})
    assert recorded_quantization({"a": folders["lora"], "b": folders["s2ft"]})["type"] == "nf4"
    # --quantize chooses explicitly: the full-precision fingerprint lets both load on one base
    bank, _ = load_bank(MODEL, {"lora": folders["lora"], "plain": full}, quantize="none")
    assert not bank.quantized
    meta = json.loads((tmp_path / "full" / "leantune.json").read_text())
    assert "quantization" not in meta["base"]


def test_serve_cli_quantize_option_reaches_the_bank(folders, monkeypatch):
    pytest.importorskip("fastapi")
    from typer.testing import CliRunner

    import leantune.serve.server as server
    from leantune.cli import app

    seen = {}
    monkeypatch.setattr(server, "run", lambda app_, **kw: seen.update(bank=app_.state.bank))
    result = CliRunner().invoke(app, ["serve", "--model", MODEL, "--adapter", f"a={folders['lora']}",
                                      "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert type(seen["bank"].model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    full = {"lora": folders["lora"]}
    result = CliRunner().invoke(app, ["serve", "--model", MODEL, "--adapter", f"a={full['lora']}",
                                      "--adapter", f"b={folders['ia3']}"])
    assert result.exit_code == 0, result.output
    assert type(seen["bank"].model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # as recorded


def test_an_adapter_added_at_run_time_must_match_the_servers_quantized_base(folders, tmp_path):
    """The admin endpoint: an adapter trained on a full-precision base would load on the nf4 server (its
    fingerprint is the full-precision weights') but answer unlike `leantune generate`: refused, naming both."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from leantune.serve.server import create_app, load_bank
    from test_serve import TOKEN, Live, call

    full = make_adapter(tmp_path / "full", "lora", 9, kind=None, r=4)
    bank, tok = load_bank(MODEL, {"lora": folders["lora"]})
    live = Live(create_app(bank, tok, admin_token=TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        status, _h, p = call(live.port, "POST", "/admin/adapters", {"name": "plain", "path": full}, auth)
        assert status == 400 and "full precision" in p and "nf4" in p, p
        assert "plain" not in bank.names()
        status, _h, p = call(live.port, "POST", "/admin/adapters", {"name": "again", "path": folders["s2ft"]}, auth)
        assert status == 200, p
    finally:
        live.stop()
