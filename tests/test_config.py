"""Method options: bad values are refused up front, naming the option and the value."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import leantune
from conftest import tiny
from leantune.io import sha256_file
from leantune.methods import ConfigError


@pytest.mark.parametrize("method,options,message", [
    ("lora", {"alpha": "nan"}, r"option 'alpha'.*'nan' is not a finite number"),
    ("lora", {"alpha": float("inf")}, r"option 'alpha'.*inf is not a finite number"),
    ("lora", {"dropout": float("nan")}, r"option 'dropout'.*nan is not a finite number"),
    ("light_peft", {"mask_l1": "nan"}, r"option 'mask_l1'.*'nan' is not a finite number"),
    ("light_peft", {"head_ratio": "-inf"}, r"option 'head_ratio'.*'-inf' is not a finite number"),
    ("lisa", {"gamma": True}, r"option 'gamma'.*cannot read True as int"),
    ("lisa", {"period": False}, r"option 'period'.*cannot read False as int"),
    ("lora", {"r": 2.5}, r"option 'r'.*cannot read 2.5 as int"),
    ("lora", {"alpha": True}, r"option 'alpha'.*cannot read True as float"),
    ("lora", {"rslora": 2}, r"option 'rslora'.*cannot read 2 as bool"),
])
def test_bad_option_values_are_refused_by_name(method, options, message):
    with pytest.raises(ConfigError, match=message):
        leantune.make_config(method, options)


def test_configs_built_in_python_get_the_same_checks():
    from leantune.methods.lisa import LisaConfig
    from leantune.methods.lora import LoraConfig

    model, _ = tiny()
    with pytest.raises(ConfigError, match=r"option 'alpha'.*nan is not a finite number"):
        leantune.apply(model, LoraConfig(alpha=float("nan")))
    with pytest.raises(ConfigError, match=r"option 'gamma'.*expected an int, got True"):
        leantune.apply(model, LisaConfig(gamma=True))


def test_cli_option_true_for_a_count_is_refused(tmp_path):
    from typer.testing import CliRunner

    from leantune.cli import app

    res = CliRunner().invoke(app, ["train", "--model", "builtin:tiny-llama", "--method", "lisa", "-o", "gamma=true",
                                   "--task", "builtin:arith", "--max-steps", "1", "--output-dir", str(tmp_path)])
    assert res.exit_code != 0 and "gamma" in res.output and "True" in res.output


def _tamper(folder, name, fn):
    """Rewrite one tensor of a saved adapter (and its recorded size and checksum, as a careless tool would)."""
    import json

    path = folder / "adapter.safetensors"
    tensors = load_file(path)
    tensors[name] = fn(tensors[name])
    save_file(tensors, path)
    meta = json.loads((folder / "leantune.json").read_text())
    meta["weights"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (folder / "leantune.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fn,message", [
    (lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("nan")), r"holds \d+ NaN/inf value"),
    (lambda t: t.clone().fill_(float("inf")), r"holds \d+ NaN/inf value"),
    (lambda t: t.to(torch.int32), r"is int32, where method 'lora' stores floating-point values"),
])
def test_adapter_tensors_that_are_not_finite_floats_are_refused(tmp_path, fn, message):
    model, _ = tiny()
    method = leantune.apply(model, "lora", r=2)
    leantune.save(model, tmp_path)
    first = next(iter(method.state()))
    _tamper(tmp_path, first, fn)
    with pytest.raises(ValueError, match=message):
        leantune.load(tiny()[0], tmp_path)
