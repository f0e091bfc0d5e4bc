"""T5, the encoder-decoder: its two-stack anatomy, the seq2seq data path and loss, evaluation by decoder generation,
loading a local folder, the methods that refuse part of it, and the CLI (the family matrix covers every method)."""

from __future__ import annotations

import json

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, loss_of, tiny, train_steps
from leantune.anatomy import anatomy, check_anatomy
from leantune.data.encode import IGNORE, collate, decoder_start, encode_example
from leantune.data.evaluate import greedy_generate
from leantune.train.loop import token_loss_sum

T5 = "builtin:tiny-t5"


def plain_t5():
    """T5 v1.0's layout: one ungated ``wi`` (ReLU), no ``wi_0``/``wi_1``."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    return T5ForConditionalGeneration(cfg)


def test_anatomy_has_an_encoder_and_a_decoder_stack_with_cross_attention():
    model, _ = tiny(T5)
    anat = check_anatomy(anatomy(model))
    assert [(b.index, b.stack) for b in anat.blocks] == [(0, "encoder"), (1, "encoder"), (2, "decoder"), (3, "decoder")]
    assert anat.seq2seq and anat.generative and not anat.causal
    assert (anat.n_heads, anat.n_kv_heads, anat.head_dim, anat.hidden, anat.intermediate) == (4, 4, 16, 64, 128)
    enc, dec = anat.blocks[0], anat.blocks[2]
    assert enc.linears["q"] is model.encoder.block[0].layer[0].SelfAttention.q
    assert {r: m for r, m in dec.linears.items() if r.startswith("cross_")} == {
        f"cross_{r}": getattr(model.decoder.block[0].layer[1].EncDecAttention, r) for r in "qkvo"}
    ffn = model.decoder.block[0].layer[2].DenseReluDense  # gated: wi_0 is the gate, wi_1 the up projection
    assert (dec.linears["gate"], dec.linears["up"], dec.linears["down"]) == (ffn.wi_0, ffn.wi_1, ffn.wo)
    assert not any(r.startswith("cross_") for r in enc.linears)
    # the relative position bias is no role: no method finds it among the linear layers
    names = {n for n, *_ in anat.linears("all-linear")}
    assert len(names) == 2 * 7 + 2 * 11 and not any("relative_attention_bias" in n for n in names)
    norms = [n for n, _ in anat.norms()]
    assert "encoder.final_layer_norm" in norms and anat.name_of(anat.final_norm) == "decoder.final_layer_norm"
    assert len(norms) == 2 * 2 + 2 * 3 + 2


def test_plain_t5_ffn_is_up_and_down():
    model = plain_t5()
    anat = check_anatomy(anatomy(model))
    ffn = model.encoder.block[0].layer[1].DenseReluDense
    assert anat.blocks[0].linears["up"] is ffn.wi and anat.blocks[0].linears["down"] is ffn.wo
    assert "gate" not in anat.blocks[0].linears and len(anat.blocks) == 3


def test_a_family_spec_file_describes_an_encoder_decoder(tmp_path):
    import yaml

    from leantune.anatomy import FAMILIES, load_family_specs

    cross = {f"cross_{r}": f"layer.1.EncDecAttention.{r}" for r in "qkvo"}
    ffn = {"gate": "DenseReluDense.wi_0", "up": "DenseReluDense.wi_1", "down": "DenseReluDense.wo"}
    spec = {"model_type": "my_t5", "blocks": "encoder.block", "embed": "shared", "final_norm": "decoder.final_layer_norm",
            "roles": {**{r: f"layer.0.SelfAttention.{r}" for r in "qkvo"}, **{k: f"layer.1.{v}" for k, v in ffn.items()}},
            "norms": ["layer.0.layer_norm", "layer.1.layer_norm"], "causal": False, "seq2seq": True,
            "n_heads_attr": "num_heads", "hidden_attr": "d_model", "stack": "encoder",
            "extra_norms": "encoder.final_layer_norm",
            "stacks": [{"name": "decoder", "blocks": "decoder.block", "norms": ["layer.0.layer_norm"],
                        "roles": {**{r: f"layer.0.SelfAttention.{r}" for r in "qkvo"}, **cross,
                                  **{k: f"layer.2.{v}" for k, v in ffn.items()}}}]}
    (tmp_path / "t5.yaml").write_text(yaml.safe_dump(spec))
    try:
        assert load_family_specs(tmp_path / "t5.yaml") == ["my_t5"]
        model, _ = tiny(T5)
        ours, builtin = anatomy(model, FAMILIES["my_t5"]), anatomy(model)
        assert [(b.stack, b.linears) for b in ours.blocks] == [(b.stack, b.linears) for b in builtin.blocks]
    finally:
        FAMILIES.pop("my_t5", None)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "stacks": [{"name": "decoder", "rows": 1}]}))
    with pytest.raises(ValueError, match="each of stacks is a mapping with name, blocks, roles, norms"):
        load_family_specs(tmp_path / "bad.yaml")


def test_packing_refuses_an_encoder_decoder():
    from leantune.data.encode import DataError
    from leantune.data.files import check_packing

    with pytest.raises(DataError, match="encoder-decoder"):
        check_packing(tiny(T5)[0])


def test_seq2seq_encoding_puts_the_prompt_in_the_encoder_and_the_response_in_the_labels():
    model, tok = tiny(T5)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    start = decoder_start(model)
    assert start == 0 and decoder_start(tiny("builtin:tiny-llama")[0]) is None
    enc = encode_example(tok, "12+3=", "15", 64, decoder_start=start)
    assert enc == {"input_ids": ids("12+3=") + [2], "labels": ids("15") + [2], "decoder_input_ids": [0] + ids("15")}
    assert encode_example(tok, "12+3=", "15", 4, decoder_start=start) is None  # the encoder side is too long
    batch = collate([enc, encode_example(tok, "1+1=", "2", 64, decoder_start=start)], tok.pad_token_id)
    assert batch["input_ids"][1].tolist() == ids("1+1=") + [2, 0]
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0]
    assert batch["labels"][1].tolist() == ids("2") + [2, IGNORE]
    assert batch["decoder_input_ids"][1].tolist() == [0] + ids("2") + [0]
    assert batch["decoder_attention_mask"][1].tolist() == [1, 1, 0]


def _batch(tok, model, pairs):
    start = decoder_start(model)
    return collate([encode_example(tok, p, r, 64, start) for p, r in pairs], tok.pad_token_id)


def test_seq2seq_loss_equals_t5s_own_loss_and_ignores_padding():
    model, tok = tiny(T5)
    pairs = [("12+30=", "42"), ("1+1=", "2"), ("7*8=", "56 ok")]
    batch = _batch(tok, model, pairs)
    with torch.no_grad():
        total, n = token_loss_sum(model, batch, causal=False)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        torch.testing.assert_close(total / n, theirs, rtol=1e-6, atol=1e-6)
        alone = [token_loss_sum(model, _batch(tok, model, [p]), causal=False) for p in pairs]
    assert n == sum(k for _, k in alone) == int((batch["labels"] != IGNORE).sum())
    torch.testing.assert_close(total, sum(t for t, _ in alone), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _greedy_one(model, tok, prompt: str, max_new: int) -> str:
    """Slow reference: the decoder run from scratch for every new token, one prompt at a time."""
    enc = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    dec = [model.config.decoder_start_token_id]
    for _ in range(max_new):
        nxt = int(model(input_ids=enc, decoder_input_ids=torch.tensor([dec])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        dec.append(nxt)
    return tok.decode(dec[1:], skip_special_tokens=True)


def test_greedy_generation_is_the_decoders_greedy_continuation():
    model, tok = tiny(T5)
    m = leantune.apply(model, "lora", targets="all-linear")
    with torch.no_grad():  # a LoRA that does something, so the check covers the adapter in generation too
        for mod in m.layers.values():
            mod.lora.B.normal_(0, 0.5)
    prompts = ["12+3=", "1+1=", "100*7="]  # different lengths: a padded batch
    got = greedy_generate(model, tok, prompts, max_new_tokens=6)
    assert got == [_greedy_one(model, tok, p, 6) for p in prompts]
    assert any(got)


def test_a_local_t5_folder_loads_as_a_seq2seq_lm(tmp_path):
    model, tok = tiny(T5)
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    loaded, _ = leantune.load_model(str(tmp_path / "t5"))
    assert type(loaded).__name__ == "T5ForConditionalGeneration"
    batch = _batch(tok, model, [("1+2=", "3")])
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def _pruned_t5():
    """Tiny T5 under Light-PEFT with 0/1 masks, then the same plan applied physically: (masked, pruned) logits.
    Layers keep different self-attention heads, so the shared relative position bias must give each its own."""
    from test_light_peft import empty_plan, randomize_adapter, set_masks_from_plan

    model, tok = tiny(T5)
    method = leantune.apply(model, "light_peft")
    assert [m is not None for m in method.masks.cross_head_masks] == [False, False, True, True]
    randomize_adapter(method)
    plan = empty_plan(method)
    plan.heads = plan.kv_heads = [[0, 2], [1, 2, 3], [3], [0, 1]]
    plan.cross_heads = [None, None, [1, 3], [2]]
    plan.ffn = [[1, 5, 6, 127], list(range(0, 128, 3)), [0, 2, 9], list(range(64, 128))]
    plan.validate()
    set_masks_from_plan(method, plan)
    with torch.no_grad():
        for m, kept in zip(method.masks.cross_head_masks, plan.cross_heads, strict=True):
            if m is not None:
                m.mask.zero_()[kept] = 1.0
    batch = _batch(tok, model, [("12+30=", "42"), ("1+1=", "2")])  # padding on both sides
    masked = logits(model, batch)
    method.apply_plan(plan)
    return model, tok, method, batch, masked


def test_light_peft_prunes_t5_heads_cross_heads_and_ffn_to_the_masked_model():
    model, tok, method, batch, masked = _pruned_t5()
    blocks = method.anatomy.blocks
    assert [b.linears["o"].in_features for b in blocks] == [32, 48, 16, 32]
    assert [b.linears["cross_o"].in_features for b in blocks[2:]] == [32, 16]
    assert [b.linears["down"].in_features for b in blocks] == [4, 43, 3, 64]
    torch.testing.assert_close(logits(model, batch), masked, rtol=1e-5, atol=1e-5)
    # generation (the decoder's self- and cross-attention caches) runs on the pruned shapes
    assert len(greedy_generate(model, tok, ["1+2="], max_new_tokens=3)) == 1


def test_pruned_t5_merged_export_is_a_leantune_folder_that_says_why(tmp_path):
    from leantune.prune import load_merged, save_merged

    model, tok, method, batch, _ = _pruned_t5()
    expected = logits(model, batch)
    export = save_merged(model, tmp_path / "merged")
    assert export.kind == "leantune" and "shares one relative position bias" in export.reason
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), batch), expected, rtol=1e-4, atol=1e-5)


def test_s2ft_activation_calibration_skips_the_decoders_padding():
    model, tok = tiny(T5)
    method = leantune.apply(model, "s2ft", selection="activation")
    for mod in method.layers.values():
        mod.s2ft.active = False  # the base alone, as calibrate() scores it
    pairs = [("12+30=", "42"), ("1+1=", "2 and more")]  # the decoder side pads the first row
    both = method._activation_scores([_batch(tok, model, pairs)])
    alone = [method._activation_scores([_batch(tok, model, [p])]) for p in pairs]
    decoder = {n for n in both if n.startswith("decoder.")}
    assert decoder  # norms are sums of squares over real tokens: rows add up only when padding is left out
    for n in both:
        torch.testing.assert_close(both[n] ** 2, alone[0][n] ** 2 + alone[1][n] ** 2, rtol=1e-4, atol=1e-6)


def test_cli_trains_t5_lora_on_arith_and_evaluates(tmp_path):
    from test_cli import run

    out = tmp_path / "t5"
    summary = json.loads(run("train", "--model", T5, "--method", "lora", "--task", "builtin:arith", "--max-steps",
                             "3", "--output-dir", str(out), "--eval-samples", "8", "--no-progress").stdout)
    assert summary["steps"] == 3 and summary["eval_n"] == 8 and summary["final_loss"] is not None
    assert (out / "adapter.safetensors").exists()
    proc = run("eval", "--adapter", str(out), "--task", "builtin:arith", "--limit", "8", "--json")
    res = json.loads(proc.stdout)
    assert res["n"] == 8 and 0.0 <= res["accuracy"] <= 1.0 and res["loss"] is not None
    fresh, tok = tiny(T5)
    leantune.load(fresh, out)  # the CLI's adapter is the T5 fine-tune: its loss is the one eval reports
    from leantune.data.evaluate import eval_loss
    from leantune.data.tasks import get_task

    assert eval_loss(fresh, tok, get_task("builtin:arith").split("test")[:8], 1024)["loss"] == pytest.approx(
        res["loss"], rel=1e-5)


def test_plan_of_a_t5_step_matches_the_measured_step():
    from test_plan import _check, _plan_and_measure

    predicted, measured = _plan_and_measure(T5, "lora", 2, 16)  # 16 tokens on each side of the encoder-decoder
    _check(predicted, measured, "lora on tiny-t5 at 2x16")
    assert measured["activations"] > 0


# -- the cross-attention's placement points: (IA)³ and the bottleneck adapters -----------------------------------


def _randomized(method, ones_centered: bool):
    from test_attached_methods import _randomize

    _randomize(method, ones_centered=ones_centered)
    return method


def _cross_layers(anat, role):
    return [b.linears[role] for b in anat.blocks if role in b.linears]


def test_ia3_scales_the_cross_attentions_keys_and_values_from_identity():
    model, tok = tiny(T5)
    batch = fixed_batch(len(tok))
    base = logits(model, batch)
    m = leantune.apply(model, "ia3")
    anat = m.anatomy
    for role, vec in (("cross_k", "l_k"), ("cross_v", "l_v")):
        layers = _cross_layers(anat, role)
        assert len(layers) == 2  # one per decoder block
        for layer in layers:
            scale = getattr(layer.ia3, vec)
            assert scale.dtype == torch.float32 and torch.equal(scale, torch.ones(layer.out_features))
    torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=0)
    off = leantune.apply(tiny(T5)[0], "ia3", cross=False)  # the option to leave the cross-attention out
    assert len(off.layers) == len(m.layers) - 4 and not any("EncDecAttention" in n for n in off.layers)


def test_ia3_gradients_on_t5_equal_the_full_weight_reference():
    """Every vector l (the cross-attention's included) against a copy whose weights are diag(l)·W (keys, values) or
    W·diag(l) (the FFN activation) trained whole: dL/dl is the row (column) sum of dL/dW' ⊙ W."""
    model, tok = tiny(T5)
    batch = fixed_batch(len(tok))
    m = _randomized(leantune.apply(model, "ia3"), ones_centered=True)
    loss_of(model, batch).backward()
    reference, _ = tiny(T5)
    named = dict(reference.named_modules())
    for name, _layer, c in m.children():
        w = named[name].weight
        with torch.no_grad():
            for point, (side, start, stop, _w) in c.segments.items():
                l = c.scale(point).detach()  # noqa: E741
                if side == "out":
                    w[start:stop] *= l[:, None]
                else:
                    w[:, start:stop] *= l[None, :]
        w.requires_grad_(True)
    loss_of(reference, batch).backward()
    cross = 0
    for name, layer, c in m.children():
        full = named[name].weight.grad
        for point, (side, start, stop, _w) in c.segments.items():
            expected = (full * layer.weight.detach()).sum(1 if side == "out" else 0)[start:stop]
            got = c.scale(point).grad
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
            cross += point.startswith("cross_")
    assert cross == 4


def test_ia3_on_t5_merges_saves_and_exports_to_peft_as_k_v_wo(tmp_path):
    peft = pytest.importorskip("peft")
    from leantune.interop.peft import export_peft

    model, tok = tiny(T5)
    batch = fixed_batch(len(tok))
    m = _randomized(leantune.apply(model, "ia3"), ones_centered=True)
    ours = logits(model, batch)
    leantune.save(model, tmp_path / "ia3")
    fresh, _ = tiny(T5)
    leantune.load(fresh, tmp_path / "ia3")
    torch.testing.assert_close(logits(fresh, batch), ours, rtol=0, atol=0)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # PEFT's own T5 default: k and v (self- and cross-attention: the names match in both) and wo as feedforward
    assert (sorted(config["target_modules"]), config["feedforward_modules"]) == (["k", "v", "wo"], ["wo"])
    loaded = peft.PeftModel.from_pretrained(tiny(T5)[0], tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, batch), ours, rtol=0, atol=1e-5)
    m.merge()
    torch.testing.assert_close(logits(model, batch), ours, rtol=1e-5, atol=1e-5)


def test_houlsby_sits_after_every_decoder_sublayer_the_cross_attention_included(tmp_path):
    from test_attached_methods import _bottleneck_ref, _swish

    model, tok = tiny(T5)
    batch = fixed_batch(len(tok))
    base = logits(model, batch)
    m = leantune.apply(model, "houlsby")
    anat = m.anatomy
    per_block = [sum(hasattr(mod, "adapter") for mod in b.module.modules()) for b in anat.blocks]
    assert per_block == [2, 2, 3, 3]  # encoder: self-attention, FFN; decoder: self-attention, cross-attention, FFN
    assert all(hasattr(layer, "adapter") for layer in _cross_layers(anat, "cross_o"))
    torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=0)  # W_up = 0: identity at init
    _randomized(m, ones_centered=False)
    ours = logits(model, batch)

    def add_adapter(a):  # the slow reference: the bottleneck's formula as a hook on a fresh model's layer output
        t = [p.detach() for p in (a.down.weight, a.down.bias, a.up.weight, a.up.bias)]
        return lambda mod, args, out: out + _bottleneck_ref(out, *t, _swish, a.scale)

    reference, _ = tiny(T5)
    named = dict(reference.named_modules())
    for name, _layer, a in m.children():
        named[name].register_forward_hook(add_adapter(a))
    torch.testing.assert_close(ours, logits(reference, batch), rtol=1e-5, atol=1e-5)
    leantune.save(model, tmp_path / "houlsby")
    fresh, _ = tiny(T5)
    leantune.load(fresh, tmp_path / "houlsby")
    torch.testing.assert_close(logits(fresh, batch), ours, rtol=0, atol=0)
    off = leantune.apply(tiny(T5)[0], "houlsby", cross=False)
    assert [sum(hasattr(mod, "adapter") for mod in b.module.modules()) for b in off.anatomy.blocks] == [2, 2, 2, 2]
    pfeiffer = leantune.apply(tiny(T5)[0], "pfeiffer")  # after the FFN only: nothing after any attention
    assert [sum(hasattr(mod, "adapter") for mod in b.module.modules()) for b in pfeiffer.anatomy.blocks] == [1] * 4


def test_the_cross_attention_adapters_train():
    model, tok = tiny(T5)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "houlsby")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch, steps=3)
    cross = [a for name, _l, a in m.children() if "EncDecAttention" in name]
    assert len(cross) == 2 and all(a.up.weight.abs().sum() > 0 for a in cross)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".adapter." not in n)


def test_cli_trains_t5_houlsby_with_its_cross_attention_adapters(tmp_path):
    from safetensors.torch import load_file

    from test_cli import run

    out = tmp_path / "houlsby"
    summary = json.loads(run("train", "--model", T5, "--method", "houlsby", "--task", "builtin:arith", "--max-steps",
                             "3", "--output-dir", str(out), "--eval-samples", "0", "--no-progress").stdout)
    assert summary["steps"] == 3 and summary["final_loss"] is not None
    saved = load_file(out / "adapter.safetensors")
    cross = [k for k in saved if "EncDecAttention.o.adapter.up.weight" in k]
    assert len(cross) == 2 and all(saved[k].abs().sum() > 0 for k in cross)  # trained, not the zero init
