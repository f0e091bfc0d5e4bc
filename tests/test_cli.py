"""The `leantune` command in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "LEANTUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "leantune.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"leantune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize(("method", "lr"), [("full", "1e-3"), ("lora", "3e-3"), ("bitfit", "1e-2"),
                                            ("ln_tuning", "3e-2")])
def test_train_builtin_tiny_llama_loss_goes_down(tmp_path, method, lr):
    out = tmp_path / method
    proc = run("train", "--model", "builtin:tiny-llama", "--method", method, "--task", "builtin:arith",
               "--max-steps", "25", "--batch-size", "16", "--lr", lr, "--output-dir", str(out),
               "--eval-samples", "8", "--no-progress")
    summary = json.loads(proc.stdout)
    assert summary["method"] == method and summary["steps"] == 25
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert (out / "leantune.json").exists() and (out / "adapter.safetensors").exists()


def test_recipe_yaml_and_option_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: builtin:tiny-llama\nmethod: {name: lora, options: {r: 4, alpha: 8}}\ntask: builtin:arith\n"
        "train: {max_steps: 3, batch_size: 4, lr: 0.001}\n"
    )
    out = tmp_path / "o"
    run("train", "--config", str(recipe), "-o", "r=2", "--output-dir", str(out), "--eval-samples", "2")
    meta = json.loads((out / "leantune.json").read_text())
    assert meta["config"]["r"] == 2 and meta["config"]["alpha"] == 8.0 and meta["train"]["max_steps"] == 3


def test_generate_with_adapter(tmp_path):
    out = tmp_path / "a"
    run("train", "--model", "builtin:tiny-llama", "--method", "lora", "--task", "builtin:arith", "--max-steps", "2",
        "--output-dir", str(out), "--eval-samples", "2")
    proc = run("generate", "--adapter", str(out), "--prompt", "What is 1 plus 2? Answer:", "--max-new-tokens", "3")
    assert proc.stdout.startswith("What is 1 plus 2? Answer:")


def test_methods_json_lists_the_contract():
    rows = json.loads(run("methods", "--json").stdout)
    names = {r["name"] for r in rows}
    assert {"full", "lora", "bitfit", "ln_tuning"} <= names
    for r in rows:
        assert {"name", "family", "capabilities", "description"} <= set(r)
        assert {"mergeable", "mixed_batch", "prunable", "needs_schedule"} <= set(r["capabilities"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "loraa"], "unknown method 'loraa'"),
        (["--method", "lora", "-o", "rank=4"], "unknown option"),
        (["--method", "lora", "-o", "r"], "key=value"),
        (["--method", "lora", "--model", "builtin:tiny-nope"], "unknown built-in model"),
        (["--method", "lora", "--task", "builtin:nope"], "unknown task"),
        (["--method", "lora", "--model", "/no/such/model"], "cannot load model"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    base = {"--model": "builtin:tiny-llama", "--task": "builtin:arith"}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    proc = run("train", *flat, *args, "--max-steps", "1", "--output-dir", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_encoder_with_generative_task_is_refused(tmp_path):
    proc = run("train", "--model", "builtin:tiny-bert", "--method", "lora", "--task", "builtin:arith",
               "--max-steps", "1", "--output-dir", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "encoder" in proc.stderr


@pytest.mark.parametrize(("method", "options", "kind"), [("lora", [], "huggingface"),
                                                        ("light_peft", ["-o", "uniform=false"], "leantune")])
def test_train_save_merged_says_which_folder(tmp_path, method, options, kind):
    out = tmp_path / method
    proc = run("train", "--model", "builtin:tiny-llama", "--method", method, *options, "--task", "builtin:arith",
               "--max-steps", "21", "--batch-size", "4", "--output-dir", str(out), "--eval-samples", "2",
               "--save-merged")
    merged = json.loads(proc.stdout)["merged"]
    assert merged["kind"] == kind and merged["reason"]
    assert (out / "merged").is_dir() and (out / "leantune.json").exists()


def test_base_info_names_the_shipped_recipe():
    info = json.loads(run("base", "info").stdout)
    assert info["name"] == "builtin:base" and len(info["recipe_hash"]) == 16


DECODER_FAMILIES = ["gemma", "gemma2", "gemma3", "phi3", "neox", "opt", "falcon", "olmo2", "mixtral", "qwen2-moe"]
CLI_METHODS = {"lora": 3, "s2ft": 3, "lisa": 3, "light_peft": 25}  # Light-PEFT estimates for 20 steps, then prunes
CLI_REFUSALS: dict[tuple[str, str], str] = {}  # (family, method) -> words of a refusal at start (none today)
# by default: Light-PEFT on the fused and multi-query layouts, OLMo 2's whole-projection q/k norms and an MoE (heads
# only), LoRA on experts; every decoder family x method with LEANTUNE_SLOW=1 (about 6 min)
CLI_CELLS = [(f, m) for f in DECODER_FAMILIES for m in CLI_METHODS] if os.environ.get("LEANTUNE_SLOW") == "1" else [
    ("phi3", "light_peft"), ("neox", "light_peft"), ("falcon", "light_peft"), ("olmo2", "light_peft"),
    ("qwen2-moe", "light_peft"), ("mixtral", "lora")]


@pytest.mark.parametrize(("family", "method"), CLI_CELLS)
def test_train_every_decoder_family_from_the_cli(tmp_path, family, method):
    out = tmp_path / "out"
    proc = run("train", "--model", f"builtin:tiny-{family}", "--method", method, "--task", "builtin:arith",
               "--max-steps", str(CLI_METHODS[method]), "--batch-size", "4", "--eval-samples", "4", "--no-progress",
               "--output-dir", str(out), "--save-merged", check=(family, method) not in CLI_REFUSALS)
    if (family, method) in CLI_REFUSALS:
        assert proc.returncode == 2 and CLI_REFUSALS[family, method] in proc.stderr
        assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused at start, before any step
        return
    assert json.loads(proc.stdout)["steps"] == CLI_METHODS[method]
    if method == "light_peft":
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("prune_heads_kept", 0) < r.get("prune_heads_total", 0) for r in rows)  # it did prune
    # the merged folder computes what the adapter on a fresh base computes
    import torch

    import leantune
    from leantune.prune import load_merged

    base, _ = leantune.load_model(f"builtin:tiny-{family}")
    leantune.load(base, out)
    ids = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_merged(out / "merged")(input_ids=ids).logits, base.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_save_merged_that_cannot_be_is_refused_before_training(tmp_path):
    """BitFit adds FFN biases that no Gemma config switch can hold: said at start, not after training."""
    proc = run("train", "--model", "builtin:tiny-gemma", "--method", "bitfit", "--task", "builtin:arith",
               "--max-steps", "3", "--output-dir", str(tmp_path / "out"), "--save-merged", "--no-progress", check=False)
    assert proc.returncode == 2 and "no switch that gives them a bias" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
