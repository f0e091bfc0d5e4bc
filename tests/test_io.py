"""Adapter folders: round trip, fingerprints, and every way a folder can be wrong."""

from __future__ import annotations

import json

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, tiny, train_steps
from leantune.io import AdapterError, fingerprint
from leantune.methods import ConfigError, make_config


@pytest.fixture
def saved(tmp_path):
    model, tok = tiny()
    leantune.apply(model, "lora", r=4)
    train_steps(model, fixed_batch(len(tok)))
    leantune.save(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_folder_holds_config_and_safetensors(saved):
    meta = json.loads((saved / "leantune.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4 and meta["format_version"] == 1
    assert meta["base"]["name"] == "builtin:tiny-llama"
    assert meta["base"]["fingerprint"]["model_type"] == "llama"
    assert meta["weights"]["bytes"] == (saved / "adapter.safetensors").stat().st_size
    assert not list(saved.glob("*.tmp"))  # atomic writes leave no temporaries


def test_adapter_onto_other_family_is_refused(saved):
    other, _ = tiny("builtin:tiny-gpt2")
    with pytest.raises(AdapterError, match=r"another base model.*builtin:tiny-llama.*model_type"):
        leantune.load(other, saved)


def test_adapter_onto_same_architecture_other_weights_is_refused(saved):
    model, _ = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with pytest.raises(AdapterError, match="weights differ"):
        leantune.load(model, saved)
    with pytest.warns(UserWarning, match="differs from the one it was made for"):
        leantune.load(model, saved, strict_base=False)  # the user may insist


def test_fingerprint_tolerates_a_bf16_copy_of_the_same_base(saved):
    model, _ = tiny()
    leantune.load(model.to(torch.bfloat16), saved)


def test_fingerprint_refuses_a_sibling_whose_weights_moved_half_a_percent(saved):
    model, _ = tiny()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every weight moved by 0.5 % of its size, in a random direction (an instruct tune, say)
        for p in model.parameters():
            p.add_(p.abs() * 0.005 * torch.randn(p.shape, generator=g).sign())
    with pytest.raises(AdapterError, match=r"\d+ of 256 sampled values differ at float32 precision"):
        leantune.load(model, saved)


def test_fingerprint_taken_in_bf16_accepts_the_fp32_base_and_refuses_a_moved_one(tmp_path):
    model, _ = tiny()
    model.to(torch.bfloat16)
    leantune.apply(model, "lora", r=2)
    leantune.save(model, tmp_path / "a")
    same, _ = tiny()  # the fp32 weights the bf16 copy was rounded from
    leantune.load(same, tmp_path / "a")
    moved, _ = tiny()
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.005)
    with pytest.raises(AdapterError, match="differ at bfloat16 precision"):
        leantune.load(moved, tmp_path / "a")


def test_fingerprint_is_taken_before_the_method_changes_the_model():
    model, _ = tiny()
    fp = fingerprint(model)
    m = leantune.apply(model, "full")
    assert m.base_fingerprint == fp


def test_missing_folder(tmp_path):
    model, _ = tiny()
    with pytest.raises(AdapterError, match="does not exist"):
        leantune.load(model, tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "x").mkdir()
    model, _ = tiny()
    with pytest.raises(AdapterError, match="no leantune.json"):
        leantune.load(model, tmp_path / "x")


def test_missing_weights_file(saved):
    (saved / "adapter.safetensors").unlink()
    model, _ = tiny()
    with pytest.raises(AdapterError, match="missing"):
        leantune.load(model, saved)


def test_truncated_weights_file(saved):
    path = saved / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    model, _ = tiny()
    with pytest.raises(AdapterError, match="truncated"):
        leantune.load(model, saved)


def test_corrupted_weights_file_same_size(saved):
    path = saved / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    model, _ = tiny()
    with pytest.raises(AdapterError, match="checksum"):
        leantune.load(model, saved)


def test_garbage_safetensors_without_checksum_is_reported(saved):
    meta = json.loads((saved / "leantune.json").read_text())
    del meta["weights"]["sha256"], meta["weights"]["bytes"]
    (saved / "leantune.json").write_text(json.dumps(meta))
    (saved / "adapter.safetensors").write_bytes(b"\x00" * 64)
    model, _ = tiny()
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        leantune.load(model, saved)


def test_corrupt_json(saved):
    (saved / "leantune.json").write_text("{not json")
    model, _ = tiny()
    with pytest.raises(AdapterError, match="corrupt JSON"):
        leantune.load(model, saved)


def test_newer_format_version(saved):
    meta = json.loads((saved / "leantune.json").read_text())
    meta["format_version"] = 99
    (saved / "leantune.json").write_text(json.dumps(meta))
    model, _ = tiny()
    with pytest.raises(AdapterError, match="format_version 99.*upgrade leantune"):
        leantune.load(model, saved)


def test_unknown_method_in_folder(saved):
    meta = json.loads((saved / "leantune.json").read_text())
    meta["method"] = "magic"
    (saved / "leantune.json").write_text(json.dumps(meta))
    model, _ = tiny()
    with pytest.raises(AdapterError, match="unknown method 'magic'"):
        leantune.load(model, saved)


def test_weights_that_do_not_match_the_config(saved):
    meta = json.loads((saved / "leantune.json").read_text())
    meta["config"]["r"] = 8  # the file holds rank-4 tensors
    (saved / "leantune.json").write_text(json.dumps(meta))
    model, _ = tiny()
    with pytest.raises(ValueError, match="shape"):
        leantune.load(model, saved)


def test_peft_folder_is_recognised(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    model, _ = tiny()
    with pytest.raises(AdapterError, match="PEFT"):
        leantune.load(model, tmp_path)


def test_weight_file_name_never_becomes_a_path(saved):
    meta = json.loads((saved / "leantune.json").read_text())
    meta["weights"]["file"] = "../../etc/passwd"
    (saved / "leantune.json").write_text(json.dumps(meta))
    model, _ = tiny()
    with pytest.raises(AdapterError, match="passwd: missing"):
        leantune.load(model, saved)


def test_load_gives_same_logits_and_frozen_by_default(saved):
    model, tok = tiny()
    m = leantune.load(model, saved)
    assert all(not p.requires_grad for p in model.parameters())
    again, _ = tiny()
    leantune.load(again, saved, trainable=True)
    assert any(p.requires_grad for p in again.parameters())
    batch = fixed_batch(len(tok))
    torch.testing.assert_close(logits(model, batch), logits(again, batch), rtol=0, atol=0)
    assert m.num_trainable() > 0


def test_apply_twice_is_refused():
    model, _ = tiny()
    leantune.apply(model, "lora")
    with pytest.raises(RuntimeError, match="already carries method 'lora'"):
        leantune.apply(model, "bitfit")


# -- configs ------------------------------------------------------------------------------------------------


def test_config_json_round_trip():
    cfg = make_config("lora", {"r": "8", "targets": "q,v", "dora": "true"})
    assert (cfg.r, cfg.targets, cfg.dora) == (8, "q,v", True)
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"method 'lora': unknown option\(s\) \['rank'\].*'r'"):
        make_config("lora", {"rank": 8})


def test_newer_config_version_is_a_clear_error():
    with pytest.raises(ConfigError, match="newer than this leantune"):
        make_config("lora", {"format_version": 7})


def test_bad_value_is_a_clear_error():
    with pytest.raises(ConfigError, match="option 'r'.*'sixteen'"):
        make_config("lora", {"r": "sixteen"})
    with pytest.raises(ConfigError, match="r must be >= 1"):
        make_config("lora", {"r": 0})
    with pytest.raises(ConfigError, match="unknown target role"):
        make_config("lora", {"targets": "q,z"})


def test_unknown_method_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown method 'loraa'.*lora"):
        make_config("loraa")


def test_full_without_base_copy_cannot_restore():
    model, _ = tiny()
    m = leantune.apply(model, "full")
    assert not m.capabilities.restores_base
    with pytest.raises(RuntimeError, match="keep_base"):
        m.remove()


def test_counts_trainable_vs_changed_by_hand():
    model, _ = tiny()
    m = leantune.apply(model, "lora", r=4)
    # per block: q 64->96, k 64->48, v 64->48, o 96->64, gate/up 64->128, down 128->64
    shapes = [(64, 96), (64, 48), (64, 48), (96, 64), (64, 128), (64, 128), (128, 64)]
    assert m.num_trainable() == 2 * sum(4 * (i + o) for i, o in shapes)
    assert m.num_changed() == 2 * sum(i * o for i, o in shapes)
    model, _ = tiny()
    b = leantune.apply(model, "bitfit")
    assert b.num_trainable() == b.num_changed() == 2 * (96 + 48 + 48 + 64 + 128 + 128 + 64)


def test_bitfit_on_llama_adds_biases_and_remove_deletes_them():
    model, _ = tiny()
    assert model.model.layers[0].self_attn.q_proj.bias is None
    m = leantune.apply(model, "bitfit")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    m.remove()
    assert model.model.layers[0].self_attn.q_proj.bias is None
