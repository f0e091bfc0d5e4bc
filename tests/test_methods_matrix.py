"""The behavioural contract, run over method x model family (the three tiny models).

apply -> forward equals the base (every method starts at identity) -> one step changes only trainable tensors ->
save/load gives identical logits -> merge gives the unmerged logits -> unmerge keeps them -> remove gives the base
back (bitwise where ``restores_base``; LoRA within float rounding: unmerge subtracts what merge added).

Methods registered later join automatically with their default config.
"""

from __future__ import annotations

import pytest
import torch

import leantune
from conftest import TINY_MODELS, fixed_batch, logits, tiny, train_steps
from leantune.methods import list_methods

EXPLICIT = [
    ("full", {"keep_base": True}),
    ("lora", {}),
    ("lora", {"rslora": True, "r": 4}),
    ("lora", {"dora": True}),
    ("lora", {"targets": "q,v", "dropout": 0.1}),
    ("bitfit", {}),
    ("ln_tuning", {}),
    ("lisa", {"gamma": 1, "keep_base": True}),  # like full: remove() needs the opt-in copy of the base
    ("light_peft", {"base_method": "pfeiffer"}),
]
CASES = EXPLICIT + [(cls.name, {}) for cls in list_methods() if cls.name not in {n for n, _ in EXPLICIT}]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES]
MERGE_ATOL = 1e-5  # merged vs unmerged logits, fp32 (documented in docs/methods.md)
REMOVE_ATOL = 1e-6  # LoRA: base weights after merge + unmerge + remove, fp32


def _setup(model_name, method, options):
    model, tok = tiny(model_name)
    batch = fixed_batch(len(tok))
    base_logits = logits(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    m = leantune.apply(model, method, **options)
    return model, m, batch, base_logits, base_state


@pytest.mark.parametrize("model_name", TINY_MODELS)
@pytest.mark.parametrize(("method", "options"), CASES, ids=IDS)
class TestMethodContract:
    def test_starts_at_identity(self, model_name, method, options):
        model, m, batch, base_logits, _ = _setup(model_name, method, options)
        if not m.capabilities.identity_at_init:  # soft prompts: any prefix takes attention mass (tests/test_soft_prompts.py)
            assert not torch.allclose(logits(model, batch), base_logits, atol=1e-6)
            return
        torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=1e-6)

    def test_step_changes_only_trainable(self, model_name, method, options):
        model, m, batch, _, _ = _setup(model_name, method, options)
        trainable = {id(p) for _, p in m.trainable_parameters()}
        before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        train_steps(model, batch)
        changed = [n for n, (p, old) in before.items() if not torch.equal(p.detach(), old)]
        assert changed, "one optimizer step changed nothing"
        frozen_changed = [n for n in changed if id(before[n][0]) not in trainable]
        assert frozen_changed == []

    def test_save_load_identical_logits(self, model_name, method, options, tmp_path):
        model, m, batch, _, _ = _setup(model_name, method, options)
        train_steps(model, batch, steps=2)
        expected = logits(model, batch)
        leantune.save(model, tmp_path / "adapter")
        fresh, _ = tiny(model_name)
        loaded = leantune.load(fresh, tmp_path / "adapter")
        assert loaded.name == m.name
        # what was saved comes back (prefix tuning's MLP is folded into the saved prefixes, so it trains fewer tensors)
        assert {k: v.shape for k, v in loaded.state().items()} == {k: v.shape for k, v in m.state().items()}
        assert loaded.num_changed() == m.num_changed()
        torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)

    def test_merge_equals_unmerged(self, model_name, method, options):
        model, m, batch, _, _ = _setup(model_name, method, options)
        if not m.capabilities.mergeable:
            with pytest.raises(NotImplementedError):
                m.merge()
            return
        train_steps(model, batch, steps=2)
        unmerged = logits(model, batch)
        m.merge()
        torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=MERGE_ATOL)
        m.unmerge()
        torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=MERGE_ATOL)

    def test_remove_restores_base(self, model_name, method, options):
        model, m, batch, base_logits, base_state = _setup(model_name, method, options)
        train_steps(model, batch, steps=2)
        if m.capabilities.mergeable:
            m.merge()
        restored = m.remove()
        assert getattr(restored, "leantune_method", None) is None
        state = restored.state_dict()
        assert sorted(state) == sorted(base_state)
        atol = 0 if m.capabilities.restores_base else REMOVE_ATOL
        for k, v in base_state.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=atol, msg=lambda s, k=k: f"{k}: {s}")
        torch.testing.assert_close(logits(restored, batch), base_logits, rtol=0, atol=max(atol, 1e-6) * 10)
