"""Loading base models: built-in names, local Hugging Face folders (the path hub ids take), dtypes."""

from __future__ import annotations

import pytest
import torch

from conftest import fixed_batch, logits, tiny
from leantune import load_model


def test_builtin_models_are_deterministic():
    a, _ = tiny()
    b, _ = tiny()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_local_folder_loads_like_the_original(tmp_path):
    model, tok = tiny()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(str(tmp_path / "m"))
    batch = fixed_batch(len(tok))
    torch.testing.assert_close(logits(again, batch), logits(model, batch), rtol=0, atol=0)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    assert again.config.name_or_path == str(tmp_path / "m")


def test_fp16_folder_is_upcast_on_cpu(tmp_path):
    model, tok = tiny()
    model.half().save_pretrained(tmp_path / "m16")
    tok.save_pretrained(tmp_path / "m16")
    again, _ = load_model(str(tmp_path / "m16"))
    assert again.dtype == torch.float32
    kept, _ = load_model(str(tmp_path / "m16"), dtype="float16")  # asked for explicitly: kept
    assert kept.dtype == torch.float16


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(tmp_path / "f.bin"))
