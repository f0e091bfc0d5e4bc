"""Soft prompts (prompt_tuning, prefix_tuning, prefix_flat) and the hybrids that carry a prefix (mam, unipelt).

Checked against slow obvious references: prefixes against the base model given the same keys/values as a filled
KV cache (transformers' own past), prompts against the base given the virtual embeddings as ``inputs_embeds``.
Then what users hit: cached generation equals uncached token by token, left and right padding give the same logits
on the real tokens, the MLP -> flat fold is exact, a checkpoint resumes the MLP, and the gates.
"""

from __future__ import annotations

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, tiny, train_steps
from leantune.train.loop import token_loss_sum

SOFT = ["prompt_tuning", "prefix_tuning", "prefix_flat", "mam", "unipelt"]


def _perturb(m, scale=0.5):
    """Move every trainable tensor off its init (B = 0, W_up = 0 would hide the parts behind them)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _n, p in m.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.float().std(correction=0) + 0.1))


def _padded(ids: torch.Tensor, lengths: list[int], side: str, pad: int = 0):
    """Rows of ``ids`` cut to ``lengths``, padded on ``side``; position ids counted over the real tokens."""
    width = max(lengths)
    out = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        out[i, sl], mask[i, sl] = ids[i, :n], 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return out, mask, pos


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_prefix_equals_the_base_with_the_prefix_as_its_cache(model_name):
    """GQA (tiny-llama: 2 KV heads of 24) and GPT-2: one prefix per KV head, as transformers' own cache holds keys."""
    from transformers import DynamicCache

    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok), length=9)
    m = leantune.apply(model, "prefix_flat", length=5)
    _perturb(m)
    ours = logits(model, batch)
    state = m.state()
    anat = m.anatomy
    assert state[f"{anat.attention_modules()[0][0]}.prefix.keys"].shape == (anat.n_kv_heads, 5, anat.head_dim)
    plain, _ = tiny(model_name)
    cache = DynamicCache(config=plain.config)
    for i, (name, _mod) in enumerate(anat.attention_modules()):
        k, v = state[f"{name}.prefix.keys"], state[f"{name}.prefix.values"]
        cache.update(k[None].expand(2, -1, -1, -1), v[None].expand(2, -1, -1, -1), i)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = torch.arange(ids.shape[1])[None].expand(2, -1)  # the real tokens keep their own positions
    with torch.no_grad():
        ref = plain(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 5, dtype=mask.dtype), mask], 1),
                    position_ids=pos, past_key_values=cache).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-bert"])
def test_prompt_equals_the_base_given_the_virtual_embeddings(model_name):
    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok), length=9)
    m = leantune.apply(model, "prompt_tuning", num_virtual_tokens=4)
    _perturb(m)
    ours = logits(model, batch)
    virtual = m.state()[next(iter(m.state()))]
    plain, _ = tiny(model_name)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embeds = torch.cat([virtual[None].expand(2, -1, -1), plain.get_input_embeddings()(ids)], 1)
        ref = plain(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], 1))
    assert ours.shape == ids.shape + (ours.shape[-1],)  # the virtual positions are cut off: no loss, no prediction
    torch.testing.assert_close(ours, ref.logits[:, 4:], rtol=1e-5, atol=1e-5)


def test_prompt_init_from_vocabulary_text_and_random():
    model, tok = tiny()
    emb = model.get_input_embeddings()
    m = leantune.apply(model, "prompt_tuning", num_virtual_tokens=5, init="text", init_text="ab")
    w = next(iter(m.state().values()))
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(w, emb.weight[torch.tensor((ids * 3)[:5])], rtol=0, atol=0)
    model, _ = tiny()
    w = next(iter(leantune.apply(model, "prompt_tuning", num_virtual_tokens=5).state().values()))
    rows = (model.get_input_embeddings().weight[:, None] == w[None]).all(-1)  # each virtual token is a vocabulary row
    assert rows.any(0).all()
    model, _ = tiny()
    w = next(iter(leantune.apply(model, "prompt_tuning", num_virtual_tokens=5, init="random").state().values()))
    assert not (model.get_input_embeddings().weight[:, None] == w[None]).all(-1).any()


# the hybrids' prefix is prefix_tuning's own: they run on the GQA model only (the matrices cover the other families)
GEN_CASES = [(f, m) for f in ("builtin:tiny-llama", "builtin:tiny-gpt2") for m in ("prompt_tuning", "prefix_tuning")]
GEN_CASES += [("builtin:tiny-llama", m) for m in ("prefix_flat", "mam", "unipelt")]


@pytest.mark.parametrize(("model_name", "method"), GEN_CASES)
def test_cached_generation_equals_uncached_token_by_token(model_name, method):
    model, tok = tiny(model_name)
    m = leantune.apply(model, method)
    _perturb(m, 0.2)
    g = torch.Generator().manual_seed(5)
    ids, mask, _ = _padded(torch.randint(3, len(tok), (2, 7), generator=g), [7, 4], "left", tok.pad_token_id)
    runs = []
    for use_cache in (True, False):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                             pad_token_id=tok.pad_token_id, eos_token_id=None, output_scores=True,
                             return_dict_in_generate=True)
        runs.append(out)
    cached, uncached = runs
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


PAD_CASES = [(f, m) for f in ("builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-bert")
             for m in ("prompt_tuning", "prefix_tuning")] + [("builtin:tiny-llama", m) for m in ("mam", "unipelt")]


@pytest.mark.parametrize(("model_name", "method"), PAD_CASES)
def test_left_and_right_padding_give_the_same_logits_on_real_tokens(model_name, method):
    model, tok = tiny(model_name)
    m = leantune.apply(model, method)
    _perturb(m, 0.2)
    model.eval()
    g = torch.Generator().manual_seed(6)
    full = torch.randint(3, len(tok), (3, 8), generator=g)
    lengths = [8, 5, 3]
    out = {}
    for side in ("left", "right"):
        ids, mask, pos = _padded(full, lengths, side, tok.pad_token_id)
        with torch.no_grad():
            lg = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out[side] = [lg[i][mask[i].bool()] for i in range(3)]
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out["left"][i], out["right"][i], rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # and equal to the row alone, unpadded
            alone = model(input_ids=full[i:i + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long)).logits[0]
        torch.testing.assert_close(out["right"][i], alone, rtol=1e-4, atol=1e-4)


def test_prompt_training_with_a_response_only_loss_mask():
    """Labels cover the real tokens only; the loss never sees a virtual position, and the prompt gets a gradient."""
    model, tok = tiny()
    m = leantune.apply(model, "prompt_tuning", num_virtual_tokens=3)
    batch = fixed_batch(len(tok), length=10)
    batch["labels"][:, :6] = -100  # the prompt part
    batch["attention_mask"][1, 8:] = 0
    batch["labels"][1, 8:] = -100
    model.train()
    loss, n = token_loss_sum(model, batch, causal=True)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    loss.backward()
    (name, p), = list(m.trainable_parameters())
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_fold_is_exact_and_saves_plain_prefixes(tmp_path):
    model, tok = tiny()
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "prefix_tuning", length=4, reparam_hidden=32)
    train_steps(model, batch, steps=2)
    before = logits(model, batch)
    mlp_state = m.training_state()
    assert any(".mlp." in k for k in mlp_state) and not any(".mlp." in k for k in m.state())
    leantune.save(model, tmp_path / "a")
    m.fold()
    assert m.mlp is None and all(".mlp." not in n for n, _ in m.trainable_parameters())
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)
    fresh, _ = tiny()
    loaded = leantune.load(fresh, tmp_path / "a")
    assert loaded.mlp is None  # a saved prefix_tuning adapter is plain prefixes
    torch.testing.assert_close(logits(fresh, batch), before, rtol=0, atol=0)


def test_checkpoint_state_resumes_the_mlp():
    model, tok = tiny()
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "prefix_tuning", length=4, reparam_hidden=32)
    train_steps(model, batch, steps=2)
    saved = {k: v.clone() for k, v in m.training_state().items()}
    fresh, _ = tiny()
    m2 = leantune.apply(fresh, "prefix_tuning", length=4, reparam_hidden=32)
    m2.load_training_state(saved)
    assert m2.mlp is not None
    for k, v in m2.training_state().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["prefix_tuning", "mam", "unipelt"])
def test_checkpoint_resume_through_the_loop(method, tmp_path):
    """A run stopped at a checkpoint and resumed ends where an uninterrupted run ends (the MLP, not its fold)."""
    from leantune.train.loop import TrainConfig, train

    model, tok = tiny()
    data = [{"input_ids": list(range(3, 13)), "labels": [-100] * 4 + list(range(7, 13))}] * 8

    def run(steps, resume, out):
        mdl, _ = tiny()
        torch.manual_seed(0)
        leantune.apply(mdl, method)
        cfg = TrainConfig(max_steps=steps, lr=1e-2, batch_size=2, seed=0, output_dir=str(out), resume=resume,
                          save_every=2, lr_schedule="constant", progress=False)
        train(mdl, data, cfg, pad_id=tok.pad_token_id)
        return logits(mdl, fixed_batch(len(tok)))

    straight = run(4, False, tmp_path / "a")
    run(2, False, tmp_path / "b")
    resumed = run(4, True, tmp_path / "b")
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-6)


def test_unipelt_gated_lora_and_adapter_start_at_identity_and_the_gates_act():
    model, tok = tiny()
    batch = fixed_batch(len(tok))
    base = logits(model, batch)
    m = leantune.apply(model, "unipelt")
    lora, prefix, adapter = m.parts
    for _n, _l, pre in prefix.children():
        pre.active = False
    torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=0)  # B = 0 and W_up = 0: the identity
    _perturb(m)
    moved = logits(model, batch)
    for part in (lora, adapter, prefix):  # a gate shut hard (bias -inf) takes its part out
        for _n, _l, child in part.children():
            if hasattr(child, "active"):
                child.active = True
            with torch.no_grad():
                child.gate.bias.fill_(-1e4)
    for _n, _l, pre in prefix.children():
        pre.active = False  # a shut prefix gate still leaves the prefix's keys in the softmax (as in the paper)
    torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=1e-6)
    assert not torch.allclose(moved, base, atol=1e-4)


def test_unipelt_prefix_gate_scales_the_prefix_share():
    """out = real share + g · prefix share: with g = 1 it is plain prefix attention, with g = 0 the prefix's values
    are zero."""
    model, tok = tiny()
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "unipelt")
    _lora, prefix, _adapter = m.parts
    _perturb(prefix)
    plain_model, _ = tiny()
    flat = leantune.apply(plain_model, "prefix_flat", length=prefix.config.length)
    with torch.no_grad():
        for (_n, _l, ours), (_n2, _l2, theirs) in zip(prefix.children(), flat.children(), strict=True):
            k, v = ours.kv()
            theirs.keys.copy_(k)
            theirs.values.copy_(v)
            ours.gate.bias.fill_(1e4)  # g = 1
    for part in (m.parts[0], m.parts[2]):
        for _n, _l, child in part.children():
            child.active = False
    torch.testing.assert_close(logits(model, batch), logits(plain_model, batch), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for (_n, _l, ours), (_n2, _l2, theirs) in zip(prefix.children(), flat.children(), strict=True):
            ours.gate.bias.fill_(-1e4)  # g = 0
            theirs.values.zero_()
    torch.testing.assert_close(logits(model, batch), logits(plain_model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix_tuning", "mam", "unipelt"])
def test_families_without_an_attention_entry_point_refuse(method):
    model, _ = tiny("builtin:tiny-falcon")
    with pytest.raises(ValueError, match="defines no attention entry point"):
        leantune.apply(model, method)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", SOFT)
def test_merge_refuses_with_the_reason(method):
    model, _ = tiny()
    m = leantune.apply(model, method)
    assert m.capabilities.inference_overhead in ("extra_input", "gating") and not m.capabilities.mergeable
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        m.merge()


def test_eager_attention_gives_the_sdpa_logits():
    """The wrapper builds an additive mask for eager attention and a boolean one for sdpa."""
    outs = []
    for impl in ("sdpa", "eager"):
        model, tok = tiny()
        model.set_attn_implementation(impl)
        m = leantune.apply(model, "prefix_flat", length=3)
        _perturb(m)
        batch = fixed_batch(len(tok))
        batch["attention_mask"][0, :3] = 0
        outs.append(logits(model, batch)[1])
        assert model.config._attn_implementation == f"leantune_prefix_{impl}"
        m.remove()
        assert model.config._attn_implementation == impl
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
