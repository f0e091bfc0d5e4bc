"""The bench's measuring instruments against figures computed by hand, and one tiny bench end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import leantune
from leantune.measure.flops import FlopCount
from leantune.measure.memory import SavedTensorMeter, grad_bytes, optimizer_bytes, weight_bytes
from leantune.measure.step import Stepper

F32 = 4  # bytes per float32


def _mlp(d_in=8, hidden=16, d_out=4, act=nn.ReLU, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), act(), nn.Linear(hidden, d_out, bias=bias))


# -- memory -------------------------------------------------------------------------------------------------


def test_weight_bytes_count_frozen_and_trainable_parameters_once():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    expected = (8 * 16 + 16 + 16 * 4 + 4) * F32
    assert weight_bytes(model) == expected


def test_weight_bytes_count_tied_weights_once():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    assert weight_bytes(nn.ModuleList([emb, head])) == 10 * 6 * F32


def test_grad_bytes_are_the_trainable_parameters_only():
    model = _mlp()
    model[0].requires_grad_(False)  # first layer frozen: no gradient there
    model(torch.randn(3, 8)).sum().backward()
    assert grad_bytes(model) == (16 * 4 + 4) * F32


def test_optimizer_bytes_are_two_moments_and_a_step_per_parameter():
    model = _mlp()
    model[0].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    step_bytes = opt.state[params[0]]["step"].numel() * opt.state[params[0]]["step"].element_size()
    expected = sum(2 * p.numel() * F32 + step_bytes for p in params)
    assert optimizer_bytes(opt) == expected
    assert step_bytes == F32  # AdamW keeps its step count as a float32 scalar tensor on the CPU


def test_saved_bytes_of_one_linear_are_its_input():
    lin = nn.Linear(8, 5)
    x = torch.randn(2, 3, 8)  # 3D: the matmul saves a 2D view of x, the same storage
    with SavedTensorMeter(lin) as meter:
        y = lin(x)
    assert meter.saved_bytes() == 2 * 3 * 8 * F32
    y.sum().backward()


def test_saved_bytes_of_a_relu_mlp_count_the_shared_activation_once():
    # Linear1 saves x; ReLU saves its output h; Linear2 saves its input, the same h: x + h, not x + 2h.
    # x requires grad, so both Linears also save their weights: excluded (weights, not activations).
    model = _mlp(act=nn.ReLU)
    x = torch.randn(5, 8, requires_grad=True)
    with SavedTensorMeter(model) as meter:
        y = model(x)
    assert meter.saved_bytes() == (5 * 8 + 5 * 16) * F32
    y.sum().backward()


def test_saved_bytes_of_a_gelu_mlp_count_both_sides_of_the_activation():
    # GELU saves its input (pre-activation) and Linear2 saves GELU's output: two different storages.
    model = _mlp(act=nn.GELU)
    x = torch.randn(5, 8)
    with SavedTensorMeter(model) as meter:
        y = model(x)
    assert meter.saved_bytes() == (5 * 8 + 2 * 5 * 16) * F32
    y.sum().backward()


def test_saved_bytes_without_a_trainable_weight_skip_the_input():
    # Frozen first layer and an input without grad: nothing needs x for backward.
    model = _mlp(act=nn.ReLU)
    model[0].requires_grad_(False)
    with SavedTensorMeter(model) as meter:
        y = model(torch.randn(5, 8))
    assert meter.saved_bytes() == 5 * 16 * F32  # only h, for Linear2's weight gradient
    y.sum().backward()


def test_saved_bytes_forget_graph_parts_that_were_dropped():
    lin = nn.Linear(8, 8)
    with SavedTensorMeter(lin) as meter:
        lin(torch.randn(4, 8))  # output discarded: its graph and saved x are freed
        kept = lin(torch.randn(2, 8))
    assert meter.saved_bytes() == 2 * 8 * F32
    kept.sum().backward()


# -- FLOPs --------------------------------------------------------------------------------------------------


def _linear_stack(widths, bias=False):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _train_flops(model, x):
    with FlopCount() as fwd:
        loss = model(x).square().mean()
    with FlopCount() as bwd:
        loss.backward()
    return fwd.total, bwd.total


def test_full_finetuning_flops_are_six_n_tokens():
    # Tolerance: none. FlopCounterMode counts 2*m*n*k per matmul, so a bias-free stack of Linears whose input
    # needs a gradient costs exactly 2NT forward + 2NT (weight grads) + 2NT (input grads) backward.
    widths = [24, 64, 48, 64, 24]
    model = _linear_stack(widths)
    n = sum(p.numel() for p in model.parameters())
    tokens = 3 * 10
    fwd, bwd = _train_flops(model, torch.randn(3, 10, widths[0], requires_grad=True))
    assert fwd == 2 * n * tokens
    assert bwd == 4 * n * tokens
    assert fwd + bwd == 6 * n * tokens


def test_flops_skip_the_first_layers_input_gradient_when_the_input_is_data():
    # A language model's first block reads frozen embeddings: no input gradient there, 6NT - 2*N_first*T, which
    # for equal layers is 1/(3*layers) short of 6NT. Biases add no multiply-adds and do not count.
    widths = [32, 32, 32, 32, 32]
    model = _linear_stack(widths, bias=True)
    n_w = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    tokens = 4 * 6
    fwd, bwd = _train_flops(model, torch.randn(4, 6, 32))
    assert fwd + bwd == 6 * n_w * tokens - 2 * model[0].weight.numel() * tokens
    assert (6 * n_w * tokens - (fwd + bwd)) * (3 * 4) == 6 * n_w * tokens  # short of 6NT by exactly 1/(3*layers)


def test_lora_flops_count_its_inplace_product_like_the_explicit_form():
    # LoRA adds x·Aᵀ·Bᵀ into the base output with an in-place addmm_, which torch has no formula for. The forward
    # must count exactly the base model's FLOPs plus the explicit products, 2·r·(in + out) per token and layer.
    from leantune.anatomy import in_out_features

    base, _ = leantune.load_model("builtin:tiny-llama")
    tuned, _ = leantune.load_model("builtin:tiny-llama")
    method = leantune.apply(tuned, "lora", r=4)
    ids = torch.randint(3, 200, (2, 7))
    counts = []
    for model in (base, tuned):
        with FlopCount() as fc:
            model(input_ids=ids)
        counts.append(fc.total)
    extra = sum(2 * ids.numel() * 4 * sum(in_out_features(m)) for m in method.layers.values())
    assert extra > 0 and counts[1] - counts[0] == extra


def test_cpu_attention_counts_like_explicit_matmuls():
    # CPU SDPA has no formula in torch; leantune registers the flash formula: equal to eager attention's bmm.
    from transformers import LlamaConfig, LlamaForCausalLM

    counts = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 64, (2, 16))
        with FlopCount() as fc:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        counts[impl] = fc.total
    b, s, h, d = 2, 16, 4, 8
    attention = 2 * (2 * b * h * s * s * d)  # Q·Kᵀ and P·V per layer, 2 layers
    assert counts["sdpa"] == counts["eager"]
    assert counts["sdpa"] - attention > 0


# -- the training step the bench measures -------------------------------------------------------------------


def _tiny_batch(vocab=259, batch=2, length=10):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_stepper_takes_the_training_loops_step():
    from leantune.train.loop import TrainConfig, train

    batch = _tiny_batch(batch=1)
    ref, _ = leantune.load_model("builtin:tiny-llama")
    leantune.apply(ref, "lora")
    mine, _ = leantune.load_model("builtin:tiny-llama")
    leantune.apply(mine, "lora")
    with torch.no_grad():  # the same non-zero adapter in both
        for (_, p), (_, q) in zip(ref.leantune_method.trainable_parameters(),
                                  mine.leantune_method.trainable_parameters(), strict=True):
            p.normal_(0, 0.05)
            q.copy_(p)
    data = [{"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}]
    train(ref, data, TrainConfig(max_steps=1, batch_size=1, lr=1e-2, progress=False, lr_schedule="constant"))
    Stepper(mine, lr=1e-2, max_steps=1).step(batch)
    for (n, p), (_, q) in zip(ref.leantune_method.trainable_parameters(),
                              mine.leantune_method.trainable_parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=n)


def test_stepper_calls_the_methods_schedule_hooks_in_order():
    from leantune.hooks import TrainHook

    calls = []

    class Spy(TrainHook):
        def on_train_begin(self, ctx):
            calls.append("begin")

        def on_step_begin(self, ctx):
            calls.append(f"step_begin {ctx.step}")

        def extra_loss(self, ctx):
            calls.append("extra_loss")
            return torch.zeros(())

        def on_step_end(self, ctx):
            calls.append(f"step_end {ctx.step}")

    model, _ = leantune.load_model("builtin:tiny-llama")
    method = leantune.apply(model, "bitfit")
    method.schedule = lambda: Spy()
    stepper = Stepper(model)
    stepper.step(_tiny_batch())
    assert calls == ["begin", "step_begin 0", "extra_loss", "step_end 1"]


# -- the PEFT anchor ----------------------------------------------------------------------------------------


def test_peft_anchor_wraps_the_same_layers_as_leantunes_lora():
    pytest.importorskip("peft")
    from leantune.measure.peft_anchor import apply_peft_lora

    ours, _ = leantune.load_model("builtin:tiny-llama")
    lt = leantune.apply(ours, "lora", r=4, alpha=8)
    theirs, _ = leantune.load_model("builtin:tiny-llama")
    pf = apply_peft_lora(theirs, r=4, alpha=8)
    assert sorted(pf.targets) == sorted(lt.layers)
    assert pf.num_trainable() == lt.num_trainable()
    assert pf.num_changed() == lt.num_changed()


def test_peft_anchor_merges_to_the_same_logits():
    pytest.importorskip("peft")
    from leantune.measure.peft_anchor import apply_peft_lora

    model, _ = leantune.load_model("builtin:tiny-llama")
    method = apply_peft_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.normal_(0, 0.1)
    batch = _tiny_batch()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
        method.merge()
        merged = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)


# -- plan and report ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 7])
def test_round_orders_balance_positions_and_predecessors(n):
    from leantune.measure.timing import round_orders

    names = [f"m{i}" for i in range(n)]
    cycle = 2 * n if n % 2 else n
    positions, follows = {}, {}
    for _, order in round_orders(names, cycle):
        assert sorted(order) == names
        for pos, name in enumerate(order):
            positions[(name, pos)] = positions.get((name, pos), 0) + 1
        for a, b in zip(order, order[1:], strict=False):
            follows[(a, b)] = follows.get((a, b), 0) + 1
    # over one cycle: every method in every position, and right after every other method, equally often
    assert len(positions) == n * n and len(set(positions.values())) == 1
    assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1


def test_methods_whose_schedule_ends_are_measured_after_it_by_capability():
    # the bench reads the capability, never the name: a pruned Light-PEFT (its plan set) has nothing left to settle
    from leantune.measure.bench import _schedule_ends, resolve_runs
    from leantune.methods.light_peft import LightPeft, LightPeftConfig

    runs, _ = resolve_runs(["full", "lora", "lisa", "light_peft"])
    assert {r["key"]: r["settle"] for r in runs} == {"full@leantune": False, "lora@leantune": False,
                                                      "lisa@leantune": False, "light_peft@leantune": True}
    assert not LightPeft(LightPeftConfig(plan={"layers": []})).capabilities.schedule_ends
    assert _schedule_ends("light_peft", {}) and not _schedule_ends("lisa", {})


def test_unknown_methods_are_refused_with_the_list():
    from leantune.measure.bench import resolve_runs

    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_runs(["full", "nope"])
    with pytest.raises(ValueError, match="not a PEFT type"):  # peft:<type> is the PEFT bridge
        resolve_runs(["peft:bitfit"])
    with pytest.raises(ValueError, match="twice"):
        resolve_runs(["lora", "lora"])


def test_bench_lora_settings_are_rank_16_alpha_32_all_linear():
    from leantune.measure.bench import full_config, resolve_runs

    runs, _ = resolve_runs(["lora", "peft:lora"])
    for run in runs:
        cfg = full_config(run)
        assert (cfg["r"], cfg["alpha"], cfg["targets"]) == (16, 32.0, "all-linear")


def test_efficiency_model_flag_changes_only_named_fields():
    from leantune.measure.bench import parse_efficiency_model

    spec = parse_efficiency_model("hidden=256,layers=4")
    assert (spec.hidden, spec.layers, spec.intermediate) == (256, 4, 2048)
    with pytest.raises(ValueError, match="hidden"):
        parse_efficiency_model("width=3")


def _fake_results(step_lora=1.0, step_peft=1.0, step_full=1.5):
    mem = {"weights": 10, "grads": 1, "optimizer": 2, "activations": 5, "peak": 100}

    def run(method, impl, step, flops, acc):
        return {"method": method, "impl": impl, "config": {}, "trainable_params": 5, "changed_params": 9,
                "adapter_bytes": 40, "memory": mem, "train_flops_per_step": flops,
                "train_flops": {"forward": flops // 3, "backward": flops - flops // 3}, "seed": 0, "lr": 1e-3,
                "step_time_s": step, "tokens_per_s": 100 / step,
                "infer": {"latency_s": 0.02, "latency_merged_s": 0.01, "overhead": 2.0},
                "quality": {"accuracy": acc, "accuracy_shifted": acc / 2, "forgetting": 0.1}}

    return {"bench_version": 1, "machine": {"processor": "x", "cpu_count": 2}, "versions": {"torch": "2"},
            "git_commit": None, "base": {"name": "b", "params": 100, "accuracy": 0.1},
            "efficiency_model": {"name": "e", "params": 50, "block_params": 40, "batch_size": 4, "seq_len": 8,
                                 "measured_on": "cpu", "base_latency_merged_s": 0.01},
            "task": "t", "budget": {"max_steps": 1, "batch_size": 1, "max_length": 8, "seeds": [0], "sweep": None},
            "runs": [run("full", "leantune", step_full, 600, 0.9), run("lora", "leantune", step_lora, 400, 0.8),
                     run("lora", "peft", step_peft, 400, 0.8)]}


def test_report_checks_flag_a_lora_slower_than_peft(tmp_path):
    from leantune.measure.report import write_report

    text = write_report(_fake_results(step_lora=1.05, step_peft=1.0), tmp_path).read_text()
    assert "**1.050** (target ≤ 1.02: NOT met)" in text
    # LoRA: 400 FLOPs in 1.05 s; full: 600 in 1.5 s -> 0.952 of full FT's FLOP/s
    assert "**0.952**" in text and "target ≥ 0.9: met" in text


# -- end to end ---------------------------------------------------------------------------------------------


RUN_KEYS = {"method", "impl", "label", "config", "trainable_params", "changed_params", "adapter_bytes", "memory",
            "train_flops_per_step", "train_flops", "seed", "lr", "step_time_s", "tokens_per_s", "infer", "quality"}


def test_tiny_bench_end_to_end_writes_the_schema(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "leantune.cli", "bench", "--base", "builtin:tiny-llama", "--task", "builtin:arith",
           "--methods", "full,lora", "--max-steps", "2", "--seeds", "2", "--batch-size", "2", "--eval-samples", "2",
           "--timing-rounds", "1", "--threads", "1", "--output-dir", str(out), "--efficiency-model",
           "hidden=32,layers=2,heads=4,kv_heads=2,intermediate=64,vocab=64,seq_len=16,batch_size=2,"
           "prompt_tokens=4,new_tokens=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"bench_version", "machine", "versions", "git_commit", "base", "efficiency_model", "task",
                        "budget", "runs"}
    assert res["bench_version"] == 1 and res["task"] == "builtin:arith"
    assert {"name", "params", "accuracy"} <= set(res["base"])
    assert res["efficiency_model"]["hidden"] == 32 and res["efficiency_model"]["params"] > 0
    assert [(r["method"], r["impl"], r["label"], r["seed"]) for r in res["runs"]] == [
        ("full", "leantune", "full", 0), ("full", "leantune", "full", 1), ("lora", "leantune", "lora", 0),
        ("lora", "leantune", "lora", 1)]
    assert res["budget"]["seeds"] == [0, 1]
    for r in res["runs"]:
        assert set(r) == RUN_KEYS
        assert set(r["memory"]) == {"weights", "grads", "optimizer", "activations", "peak"}
        assert set(r["train_flops"]) == {"forward", "backward"}
        assert r["train_flops_per_step"] == r["train_flops"]["forward"] + r["train_flops"]["backward"] > 0
        assert set(r["infer"]) == {"latency_s", "latency_merged_s", "overhead"}
        assert set(r["quality"]) == {"accuracy", "accuracy_shifted", "forgetting"}
        assert 0.0 <= r["quality"]["accuracy"] <= 1.0
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0
        assert r["memory"]["peak"] > r["memory"]["weights"] > 0
        assert r["infer"]["latency_merged_s"] is not None  # both methods are mergeable
    full, _, lora, _ = res["runs"]
    assert full["lr"] == leantune.get_method("full").default_lr  # no tuned LRs for this base: the method's own
    assert full["trainable_params"] == res["efficiency_model"]["params"]
    assert lora["memory"]["grads"] < full["memory"]["grads"]
    assert lora["memory"]["optimizer"] < full["memory"]["optimizer"]
    md = (out / "results.md").read_text()
    assert "| full | leantune |" in md and "| lora | leantune |" in md
    assert "efficiency lora (leantune)" in proc.stdout  # the terminal says which method runs
    for png in ("accuracy_vs_peak_memory.png", "accuracy_vs_step_time.png", "memory_breakdown.png"):
        assert Path(out / png).stat().st_size > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="exec keeping ru_maxrss is Linux behaviour")
def test_cpu_peak_of_a_job_process_is_its_own_not_its_parents():
    """The bench runs each job in a child process; its CPU peak must not start from the parent's RSS (ru_maxrss
    survives exec on Linux). The parent holds 1.5 GiB; the child, which imports torch and leantune, holds far less."""
    held = bytearray(1536 << 20)
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = "from leantune.measure.memory import peak_bytes; print(peak_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < len(held)


def test_suite_plot_labels_cover_no_label_no_point_and_stay_inside():
    """The survey plot's crowded points (s2ft/pfeiffer, prefix_tuning/ia3 sat 10 px apart): every label box is
    clear of every other label, every point's marker, the legend, and inside the axes."""
    from leantune.measure.report import place_labels

    points = [(400.0, 300.0), (410.0, 302.0), (405.0, 290.0), (420.0, 310.0), (395.0, 305.0), (640.0, 60.0),
              (100.0, 500.0), (412.0, 296.0)]
    sizes = [(60.0, 13.0), (45.0, 13.0), (80.0, 13.0), (30.0, 13.0), (55.0, 13.0), (90.0, 13.0), (40.0, 13.0),
             (70.0, 13.0)]
    bounds, legend, marker = (80.0, 50.0, 700.0, 600.0), (560.0, 55.0, 690.0, 80.0), 5.0
    offsets, _far = place_labels(points, sizes, bounds=bounds, avoid=[legend], marker=marker)
    boxes = [(x + dx, y + dy, x + dx + w, y + dy + h)
             for (x, y), (dx, dy), (w, h) in zip(points, offsets, sizes, strict=True)]

    def apart(a, b):
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    for i, a in enumerate(boxes):
        assert bounds[0] <= a[0] and a[2] <= bounds[2] and bounds[1] <= a[1] and a[3] <= bounds[3], i
        assert apart(a, legend), i
        assert all(apart(a, b) for b in boxes[i + 1:]), i
        assert all(apart(a, (x - marker, y - marker, x + marker, y + marker)) for x, y in points), i
