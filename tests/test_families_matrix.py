"""Every registered method on every built-in family (the tiny 2-layer models of ``leantune.models``).

One test per cell walks the contract on a fresh model: apply keeps the logits -> three steps change only the
method's tensors -> save/load gives the same logits -> merge equals unmerged -> the merged export reloads in plain
transformers with those logits -> a LoRA-shaped fine-tune loads in ``peft`` with the same logits. A cell either works
or refuses at ``apply`` with its reason (``REFUSALS``: the part of the message that names what is missing).
Methods registered later join with their default config; a family joins by adding its tiny model to ``FAMILIES``.

Each cell's outcome is written to ``$LEANTUNE_MATRIX_OUT`` (JSON lines) when set: ``benchmarks/family_table.py``
turns them into docs/models.md.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, tiny, train_steps
from leantune.export import save_merged
from leantune.methods import list_methods
from leantune.methods.base import ConfigError

FAMILIES = {
    "llama": "builtin:tiny-llama",
    "gpt2": "builtin:tiny-gpt2",
    "bert": "builtin:tiny-bert",
    "gemma": "builtin:tiny-gemma",
    "gemma2": "builtin:tiny-gemma2",
    "gemma3_text": "builtin:tiny-gemma3",
    "phi3": "builtin:tiny-phi3",
    "gpt_neox": "builtin:tiny-neox",
    "opt": "builtin:tiny-opt",
    "falcon": "builtin:tiny-falcon",
    "olmo2": "builtin:tiny-olmo2",
    "deberta-v2": "builtin:tiny-deberta",
    "mixtral": "builtin:tiny-mixtral",
    "qwen2_moe": "builtin:tiny-qwen2-moe",
    "t5": "builtin:tiny-t5",
}
METHODS = sorted(cls.name for cls in list_methods())
# (family, method) -> words of the refusal at apply
REFUSALS = {
    # an FFN made of experts has no single FFN input/output/activation to attach an adapter or a scale to
    **{("mixtral", m): "defines no placement point" for m in ("houlsby", "pfeiffer", "parallel", "scaled_parallel",
                                                               "compacter", "compacter_pp", "ia3")},
    ("gpt_neox", "ia3"): "interleaved per head",
    # attention computed by the family's own code, not through transformers' attention interface: nowhere to add
    # key/value prefixes
    **{(f, m): "defines no attention entry point" for f in ("falcon", "deberta-v2", "t5")
       for m in ("prefix_tuning", "prefix_flat", "mam", "unipelt")},
    **{("mixtral", m): "defines no placement point" for m in ("mam", "unipelt")},
    ("t5", "prompt_tuning"): "encoder-decoder model",
}
# (family, method) -> words of the merged export's refusal (the adapter itself works)
EXPORT_REFUSALS = {
    **{(f, "bitfit"): "has no switch that gives them a bias" for f in ("gemma", "gemma2", "gemma3_text", "phi3",
                                                                         "olmo2", "mixtral", "qwen2_moe", "t5")},
    **{(f, "light_peft"): "without a prune plan" for f in FAMILIES},  # a merged export is of the pruned model
}
EXPORT_NOTES = {  # why, for docs/models.md
    "bitfit": "the family builds some of the layers BitFit gave a bias without one, whatever its config says: "
              "the adapter itself works",
    "light_peft": "before pruning, the pruned model exports: tests/test_cli.py --save-merged, Phi-3, GPT-NeoX, "
                  "Falcon, OLMo 2 and Qwen2-MoE by default, every decoder family with LEANTUNE_SLOW=1; T5 in "
                  "tests/test_t5.py",
}
MERGE_ATOL = 1e-5  # fp32, as tests/test_methods_matrix.py
EXPORT_ATOL = 1e-5


def _record(family: str, method: str, outcome: str, detail: str = "") -> None:
    path = os.environ.get("LEANTUNE_MATRIX_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"family": family, "method": method, "outcome": outcome, "detail": detail}) + "\n")


def _plain_class(model):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    if model.config.is_encoder_decoder:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM if not type(model).__name__.endswith("MaskedLM") else AutoModelForMaskedLM


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_method_cell(family, method, tmp_path):
    model, tok = tiny(FAMILIES[family])
    batch = fixed_batch(len(tok))
    base_logits = logits(model, batch)
    if (family, method) in REFUSALS:
        with pytest.raises((ConfigError, ValueError), match=REFUSALS[family, method]):
            leantune.apply(model, method)
        assert not any(p.requires_grad is False for p in model.parameters())  # refused before touching the model
        _record(family, method, "refused", REFUSALS[family, method])
        return
    m = leantune.apply(model, method)
    if m.capabilities.identity_at_init:  # soft prompts are not (tests/test_soft_prompts.py checks them instead)
        torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=1e-6)

    # three steps change only what the method trains
    trainable = {id(p) for _, p in m.trainable_parameters()}
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    train_steps(model, batch, steps=3)
    changed = [n for n, (p, old) in before.items() if not torch.equal(p.detach(), old)]
    assert changed, "three optimizer steps changed nothing"
    assert [n for n in changed if id(before[n][0]) not in trainable] == []
    routers = {id(p) for _, r in m.anatomy.routers() for p in r.parameters()}
    assert not routers & trainable, "an MoE router trains without the method's option"
    tuned = logits(model, batch)
    assert not torch.allclose(tuned, base_logits, atol=1e-4)

    # save / load on a fresh base
    leantune.save(model, tmp_path / "adapter")
    fresh, _ = tiny(FAMILIES[family])
    leantune.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, batch), tuned, rtol=0, atol=0)

    # a LoRA-shaped fine-tune loads in PEFT itself
    peft_note = "no LoRA form"
    if m.lora_factors() is not None:
        peft = pytest.importorskip("peft")
        from leantune.interop.peft import export_peft

        export_peft(model, tmp_path / "peft")
        plain, _ = tiny(FAMILIES[family])
        theirs = logits(peft.PeftModel.from_pretrained(plain, tmp_path / "peft"), batch)
        torch.testing.assert_close(theirs, tuned, rtol=1e-5, atol=1e-5)
        peft_note = "peft"

    # merge equals unmerged, then the merged export reloads in transformers alone
    if not m.capabilities.mergeable:  # an adapter that stays beside the base (bottleneck adapters, Compacter)
        with pytest.raises(NotImplementedError):
            m.merge()
        _record(family, method, "works", f"not mergeable (the adapter stays beside the base); PEFT export: {peft_note}")
        return
    m.merge()
    torch.testing.assert_close(logits(model, batch), tuned, rtol=0, atol=MERGE_ATOL)
    m.unmerge()
    if (family, method) in EXPORT_REFUSALS:
        with pytest.raises(ValueError, match=EXPORT_REFUSALS[family, method]):
            save_merged(model, tok, tmp_path / "merged")
        _record(family, method, "works", f"merged export refused ({EXPORT_NOTES[method]}); PEFT export: {peft_note}")
        return
    result = save_merged(model, tok, tmp_path / "merged")
    if result["kind"] == "huggingface":
        plain = _plain_class(model).from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(logits(plain, batch), tuned, rtol=1e-5, atol=EXPORT_ATOL)
    _record(family, method, "works", f"merged export: {result['kind']}; PEFT export: {peft_note}")
