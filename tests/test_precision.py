"""The precision policy: a bf16/fp16 base stays in its dtype, everything the optimizer updates is float32."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import leantune
from conftest import fixed_batch, tiny
from leantune.cli import app
from leantune.data import encode_examples, get_task
from leantune.methods import list_methods
from leantune.train import TrainConfig, TrainHook, train
from leantune.train.loop import build_adamw

IN_PLACE = ["full", "lisa", "bitfit", "ln_tuning"]  # methods that train base tensors themselves


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 2-layer, hidden-512 LLaMA saved in bf16, and its exact fp32 copy (the bf16 values, upcast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model.to(dtype).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _train_cli(model_dir, method, out, *extra):
    res = CliRunner().invoke(app, ["train", "--model", model_dir, "--method", method, "--task", "builtin:arith",
                                   "--max-steps", "3", "--batch-size", "4", "--max-length", "64",
                                   "--eval-samples", "0", "--no-progress", "--output-dir", str(out), *extra])
    assert res.exit_code == 0, res.output
    return out


def _changed_entries(adapter_dir, model_dir) -> tuple[int, set[str]]:
    """Entries of the adapter's tensors that differ from the base's (a bias the method added: from zero), and the
    dtypes the adapter stores."""
    base, _ = leantune.load_model(model_dir, dtype="fp32")
    params = dict(base.named_parameters())
    saved = load_file(adapter_dir / "adapter.safetensors")
    changed = 0
    for name, t in saved.items():
        ref = params[name].detach() if name in params else torch.zeros_like(t)
        changed += int((t.float() != ref.float()).sum())
    return changed, {str(t.dtype) for t in saved.values()}


@pytest.mark.parametrize("method", IN_PLACE)
def test_bf16_base_changes_as_many_entries_as_its_fp32_copy(folders, tmp_path, method):
    """The review measured LISA on a bf16 folder changing 55 % of what the fp32 run changes: updates smaller than
    half a bf16 step were rounded away. With float32 masters, the bf16 run changes as much as the fp32 run."""
    low = _train_cli(folders["bf16"], method, tmp_path / "bf16")
    ref = _train_cli(folders["fp32"], method, tmp_path / "fp32")
    n_low, dtypes = _changed_entries(low, folders["bf16"])
    n_ref, _ = _changed_entries(ref, folders["fp32"])
    assert n_ref > 0
    assert n_low >= 0.95 * n_ref, f"{method}: bf16 base changed {n_low} entries, its fp32 copy {n_ref}"
    assert dtypes == {"torch.float32"}  # the adapter stores the masters, not the rounded weights
    meta = json.loads((low / "leantune.json").read_text())
    assert meta["base"]["dtype"] == "bfloat16"


def test_lisa_adapter_from_a_bf16_folder_refuses_a_base_moved_half_a_percent(folders, tmp_path):
    adapter = _train_cli(folders["bf16"], "lisa", tmp_path / "lisa")
    moved, _ = leantune.load_model(folders["bf16"])
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.005)
    with pytest.raises(leantune.io.AdapterError, match="differ at bfloat16 precision"):
        leantune.load(moved, adapter)
    leantune.load(leantune.load_model(folders["fp32"])[0], adapter)  # its exact fp32 copy is the same base


def test_base_dtype_flag_loads_the_base_in_that_dtype(folders, tmp_path):
    out = _train_cli(folders["bf16"], "lora", tmp_path / "lora", "--base-dtype", "fp32", "-o", "r=2")
    assert json.loads((out / "leantune.json").read_text())["base"]["dtype"] == "float32"
    model, _ = leantune.load_model(folders["bf16"], dtype="auto")
    assert model.dtype == torch.bfloat16  # auto keeps the checkpoint's dtype
    with pytest.raises(ValueError, match="base dtype 'int8' is not one of auto, fp32, bf16, fp16"):
        leantune.load_model(folders["bf16"], dtype="int8")


@pytest.mark.parametrize("method", IN_PLACE)
def test_optimizer_updates_float32_masters_of_a_bf16_base(method):
    model, _ = tiny()
    model.to(torch.bfloat16)
    m = leantune.apply(model, method)
    opt = build_adamw(m, 1e-3, TrainConfig())
    updated = [p for g in opt.param_groups for p in g["params"]]
    assert updated and all(p.dtype == torch.float32 for p in updated)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the base keeps its storage
    assert m.masters.nbytes() == 4 * sum(p.numel() for p in updated)


@pytest.mark.parametrize("method,options", [("lora", {"r": 4}), ("lora", {"r": 4, "dora": True}),
                                            ("s2ft", {}), ("light_peft", {})])
def test_new_tensors_are_float32_on_a_bf16_base_and_train(method, options):
    model, _ = tiny()
    model.to(torch.bfloat16)
    m = leantune.apply(model, method, **options)
    named = list(m.trainable_parameters())
    assert named and all(p.dtype == torch.float32 for _, p in named)
    before = {n: p.detach().clone() for n, p in named}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    batch = fixed_batch()
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    model.train()
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert out.logits.dtype == torch.bfloat16  # computed in the base's dtype, no autocast needed
    out.loss.backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in named)
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if n in base)


def test_lisa_frees_the_masters_of_blocks_that_leave():
    model, tok = tiny()
    model.to(torch.bfloat16)
    m = leantune.apply(model, "lisa", gamma=1, period=1, always_on="none", seed=3)
    seen = []

    class Watch(TrainHook):
        def on_step_end(self, ctx):
            active = sum(p.numel() for i in m.active for p in m.block_params[i].values())
            seen.append((m.active, m.masters.nbytes(), 4 * active))

    data = encode_examples(tok, get_task("builtin:arith").split("train")[:32], 64)
    train(model, data, TrainConfig(max_steps=6, batch_size=4, lr=1e-3, progress=False), pad_id=0, hooks=[Watch()])
    assert len({a for a, _, _ in seen}) > 1  # the active block changed during the run
    assert all(nbytes == want for _, nbytes, want in seen)


class _Stop(TrainHook):
    def on_step_end(self, ctx):
        if ctx.step == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_resume_on_a_bf16_base_continues_from_the_exact_masters(tmp_path, method):
    """The checkpoint holds the float32 masters; a resumed run must continue from them, not from the rounded
    weights (a resumed run that rebuilt its masters from the bf16 model would drift from the straight one)."""
    def run(out, hooks=()):
        torch.manual_seed(0)
        model, tok = tiny()
        model.to(torch.bfloat16)
        leantune.apply(model, method)
        data = encode_examples(tok, get_task("builtin:arith").split("train")[:32], 64)
        cfg = TrainConfig(max_steps=5, batch_size=4, lr=3e-3, save_every=1, progress=False, output_dir=str(out))
        train(model, data, cfg, pad_id=0, hooks=list(hooks))

    run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", [_Stop()])
    run(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(tmp_path / "b" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["lora", "full"])
def test_merged_export_comes_back_in_the_base_dtype(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from leantune.export import save_merged

    model, tok = tiny()
    model.to(torch.bfloat16)
    m = leantune.apply(model, method)
    with torch.no_grad():
        for _, p in m.trainable_parameters():
            p.add_(0.01)
    save_merged(model, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def _float32_activation_bytes(model, batch) -> int:
    """Bytes of float32 tensors shaped like activations — leading (rows, tokens), or rows x tokens flattened, as a
    linear layer saves its input — that one forward under bf16 autocast keeps for backward (each counted once)."""
    rows, tokens = batch["input_ids"].shape
    seen: dict[int, int] = {}

    def pack(t):
        if t.dtype == torch.float32 and t.dim() >= 2 and (tuple(t.shape[:2]) == (rows, tokens)
                                                          or t.shape[0] == rows * tokens):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=batch["input_ids"], labels=batch["labels"])
    return sum(seen.values())


@pytest.mark.parametrize("method", sorted(cls.name for cls in list_methods()))
def test_under_autocast_a_methods_terms_keep_no_float32_copy_of_an_activation(method):
    """Under bf16 autocast a term runs in autocast's dtype (as LoRA's, PEFT's and AdapterHub's do): what backward
    keeps is the bf16 activation itself, not a float32 copy of it (at 8B, 4 x 2048 tokens: 128 MiB per term and
    layer). The reference is the bf16 base with its input embeddings requiring grad: the same forward, saving the
    base's own float32 tensors (RMSNorm computes in float32) and nothing of a method's."""
    batch = fixed_batch()
    base, _ = tiny()
    base.to(torch.bfloat16)
    base.enable_input_require_grads()
    reference = _float32_activation_bytes(base, batch)
    model, _ = tiny()
    model.to(torch.bfloat16)
    leantune.apply(model, method)
    assert _float32_activation_bytes(model, batch) <= reference


@pytest.mark.parametrize("method", sorted(cls.name for cls in list_methods()))
def test_under_autocast_every_trainable_tensor_gets_the_float32_gradient_to_bf16_precision(method):
    """Terms computed in autocast's dtype still reach every trainable tensor with its float32 gradient, to bf16's
    precision: relative error at most 10 % per tensor (measured: at most 1.5 %, except UniPELT's prefix-gate bias at
    4.8 %, a sum over the tokens whose terms nearly cancel), and zero where it is zero in float32 (LoRA's A while B
    is zero). A term scaled or cut off under autocast is off by far more."""
    batch = fixed_batch()
    grads = {}
    for mode in ("fp32", "autocast"):
        torch.manual_seed(0)
        model, _ = tiny()
        m = leantune.apply(model, method)
        model.train()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        grads[mode] = {n: p.grad.detach().float().flatten() for n, p in m.trainable_parameters() if p.grad is not None}
    assert grads["fp32"] and grads["fp32"].keys() == grads["autocast"].keys()
    for n, g in grads["fp32"].items():
        a = grads["autocast"][n]
        if g.norm() == 0:
            assert a.norm() == 0, n
        else:
            assert (a - g).norm() <= 0.1 * g.norm(), n
