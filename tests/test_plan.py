"""`leantune plan`: the fake-tensor plan of a step against the same step taken for real and measured.

The reference is a real CPU step of the same model, method and batch: gradients, optimizer state and saved
activations read by the bench's meters (measure/memory.py), and step_peak from the CPU allocator's own events (the
profiler's), from before the model was built. The grid is spread over the methods to stay cheap: every method
once on tiny-llama, tiny-gpt2 and the bench's efficiency architecture at a small size, the four (batch, length)
cells taken in turn; LEANTUNE_SLOW=1 runs every cell, and every method on the full-size efficiency model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from leantune.measure import plan as planner
from leantune.methods import list_methods

METHODS = [cls.name for cls in list_methods()]
CELLS = [(1, 16), (1, 48), (3, 16), (3, 48)]  # (batch size, sequence length)
SLOW = os.environ.get("LEANTUNE_SLOW") == "1"


def _plan_and_measure(model: str, method: str, batch: int, length: int, options=None, quantize=None, measure=True):
    settings = planner.PlanSettings(batch_size=batch, seq_len=length, device="cpu", quantize=quantize)
    options = planner.method_options(method, options, bench_settings=True)
    predicted = planner.plan_method(model, method, options, settings)
    measured = planner.plan_method(model, method, options, settings, fake=False) if measure else None
    return predicted.memory, measured and measured.memory


def _check(predicted: dict, measured: dict, where: str) -> None:
    assert predicted["weights"] == measured["weights"], where
    for key in ("grads", "optimizer", "activations"):
        assert predicted[key] == pytest.approx(measured[key], rel=0.05), f"{where}: {key}"
    assert predicted["step_peak"] == pytest.approx(measured["step_peak"], rel=0.10), f"{where}: step_peak"


SMALL_EFFICIENCY = "efficiency:small"  # the bench's efficiency model's architecture (LLaMA, GQA) at a test's size


def _source(model: str):
    if model == SMALL_EFFICIENCY:
        from leantune.measure.effmodel import EfficiencyModel

        return planner.efficiency_source(EfficiencyModel(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                                         vocab=256, seq_len=32, batch_size=2))
    return model


def _cases():
    """Every method once on each model, the (batch, length) cells taken in turn; LEANTUNE_SLOW=1: every cell, and
    every method on the full-size efficiency model too."""
    cases = []
    for k, model in enumerate(("builtin:tiny-llama", "builtin:tiny-gpt2", SMALL_EFFICIENCY)):
        for i, method in enumerate(m for m in METHODS if m != "light_peft"):
            cells = CELLS if SLOW else [CELLS[(i + k) % 4]]
            cases += [(model, method, b, n) for b, n in cells]
    if SLOW:
        cases += [(planner.EFFICIENCY, m, 2, 64) for m in METHODS if m != "light_peft"]
    return cases


@pytest.mark.parametrize(("model", "method", "batch", "length"), _cases())
def test_plan_matches_a_measured_cpu_step(model, method, batch, length):
    predicted, measured = _plan_and_measure(_source(model), method, batch, length)
    _check(predicted, measured, f"{method} on {model} at {batch}x{length}")


def _check_bound(predicted: dict, measured: dict, tight=("weights", "step_peak")) -> None:
    for key in planner.MEMORY_KEYS:
        assert predicted[key] >= measured[key], key
    for key in tight:
        assert predicted[key] <= 1.25 * measured[key], key


def _kept_counts(plan: dict) -> tuple:
    """What Light-PEFT's amounts fix: query heads per layer (cross-attention's too), FFN channels in all, adapter
    modules, ranks in all."""
    return ([len(h) for h in plan["heads"]] if plan["heads"] else None,
            [c and len(c) for c in plan.get("cross_heads") or []],
            sum(map(len, plan["ffn"])) if plan["ffn"] else None, plan["modules"] and len(plan["modules"]),
            plan["ranks"] and sum(map(len, plan["ranks"].values())))


@pytest.mark.parametrize("model", ["builtin:tiny-llama", "builtin:tiny-t5"]  # T5: cross-attention heads too
                         + (["builtin:tiny-gpt2", SMALL_EFFICIENCY] if SLOW else []))
def test_light_peft_bound_is_the_worst_prune_its_amounts_allow(model):
    """Prunes a run can reach: Light-PEFT's own selection rules fed random scores (some skewed, so whole layers
    and piled-up ranks come up). The bound's prunes keep exactly their counts (so they are prunes a run can reach
    too), and every figure of the bound is at least every such prune's and within 25 % of the largest."""
    source = planner.resolve_model(model) if model != SMALL_EFFICIENCY else _source(model)
    settings = planner.PlanSettings(batch_size=2, seq_len=32, device="cpu")
    samples = [planner.sample_prune_plan(source, {}, settings, seed=i, skew=k) for i in range(2) for k in (0.0, 3.0)]
    candidates = planner.light_peft_bound(source, {}, settings)
    assert len({repr(_kept_counts(p)) for p in samples + candidates}) == 1
    bound = planner.plan_method(source, "light_peft", {}, settings).memory
    reached = [planner.plan_method(source, "light_peft", {}, settings, prune_plan=p).memory
               for p in samples + candidates]
    for key in planner.MEMORY_KEYS:
        worst = max(f[key] for f in reached)
        assert worst <= bound[key] <= 1.25 * worst, key


@pytest.mark.parametrize(("method", "quantize"), [("lora", None), ("lisa", None), ("lora", "nf4")])
def test_plan_matches_the_bench_efficiency_job(tmp_path, method, quantize):
    """The bench's own efficiency job (measure/run.py, a real CPU step read by the bench's meters) on a small
    efficiency model: the plan of the same model, method and batch gives its figures."""
    from leantune.measure.effmodel import EfficiencyModel
    from leantune.measure.run import job_efficiency

    eff = EfficiencyModel(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, seq_len=32,
                          batch_size=2)
    options = planner.method_options(method, None, bench_settings=True)
    spec = {"run": {"method": method, "impl": "leantune", "options": options, "lr": None, "quantize": quantize},
            "efficiency_model": {**eff.__dict__}, "max_steps": 50, "adapter_dir": str(tmp_path / "a"), "device": "cpu"}
    bench = job_efficiency(spec)["memory"]
    plan = planner.plan_method(planner.efficiency_source(eff), method, options,
                               planner.PlanSettings(eff.batch_size, eff.seq_len, device="cpu", quantize=quantize)).memory
    for key in ("weights", "grads", "optimizer", "activations"):
        assert plan[key] == pytest.approx(bench[key], rel=0.05), key


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", SMALL_EFFICIENCY])
def test_light_peft_bound_holds_over_a_real_prune(model):
    """tiny-gpt2 (fused q/k/v, Conv1D) and the efficiency architecture: a real prune after the bench's settling
    steps is never above the bound; weights and peak within 25 % of it."""
    source = planner.resolve_model(model) if model != SMALL_EFFICIENCY else _source(model)
    settings = planner.PlanSettings(batch_size=2, seq_len=32, device="cpu")
    _, measured = planner.measure_real(source, "light_peft", {}, settings)
    _check_bound(planner.plan_method(source, "light_peft", {}, settings).memory, measured)


def test_light_peft_bound_holds_and_a_finished_runs_plan_is_exact(tmp_path):
    """A real prune (data-driven, after the bench's settling steps) is never above the bound in any figure; weights
    and peak within 25 %. Activations, the adapter's gradients and optimizer state are only bounded: the prunes a
    run can reach differ by up to 2x and 3.3x in them (which modules the data keeps; docs/plan.md). Then
    --prune-plan: that run's own plan, planned exactly."""
    from leantune import io

    source = planner.resolve_model("builtin:tiny-llama")
    settings = planner.PlanSettings(batch_size=2, seq_len=32, device="cpu")
    session, measured = planner.measure_real(source, "light_peft", {}, settings)  # settles: prunes on real data
    _check_bound(planner.plan_method(source, "light_peft", {}, settings).memory, measured)
    io.save(session.model, tmp_path / "run")
    prune = planner.prune_plan_from(tmp_path / "run")
    predicted = planner.plan_method(source, "light_peft", {}, settings, prune_plan=prune).memory
    exact = planner.plan_method(source, "light_peft", {}, settings, prune_plan=prune, fake=False).memory
    _check(predicted, exact, "light_peft with its plan")
    _check(exact, measured, "the real prune replayed from its plan")


def test_gradient_checkpointing_accumulation_and_bf16_are_planned_as_measured():
    settings = planner.PlanSettings(batch_size=2, seq_len=32, device="cpu", gradient_checkpointing=True,
                                    grad_accum=3, mixed_precision="bf16", base_dtype="bf16")
    for method in ("lora", "full"):
        predicted = planner.plan_method("builtin:tiny-llama", method, {}, settings).memory
        measured = planner.plan_method("builtin:tiny-llama", method, {}, settings, fake=False).memory
        _check(predicted, measured, method)
    plain = planner.plan_method("builtin:tiny-llama", "lora", {}, planner.PlanSettings(2, 32, device="cpu")).memory
    assert predicted["activations"] < plain["activations"]  # checkpointing keeps less


def test_largest_batch_and_length_fit_and_one_more_does_not():
    settings = planner.PlanSettings(batch_size=2, seq_len=64, device="cpu")
    budget = 3 * 2**20
    p = planner.plan_method("builtin:tiny-llama", "lora", {}, settings, device_memory=budget)
    assert p.max_batch_size and p.max_seq_len

    def peak(b, n):
        return planner.plan_method("builtin:tiny-llama", "lora", {}, planner.PlanSettings(b, n, device="cpu"))

    assert peak(p.max_batch_size, 64).needed <= budget < peak(p.max_batch_size + 1, 64).needed
    assert peak(2, p.max_seq_len).needed <= budget
    assert peak(2, int(p.max_seq_len * 1.02) + 1).needed > budget  # found within the search's 1.5 %


def test_cuda_plan_adds_the_named_allowance_and_rounds_blocks():
    cpu = planner.plan_method("builtin:tiny-llama", "lora", {}, planner.PlanSettings(2, 32, device="cpu"))
    cuda = planner.plan_method("builtin:tiny-llama", "lora", {}, planner.PlanSettings(2, 32, device="cuda"))
    assert cuda.memory["step_peak"] >= cpu.memory["step_peak"]  # 512-byte blocks
    assert cuda.needed == cuda.memory["step_peak"] + planner.allowance_bytes(cuda.memory["step_peak"],
                                                                            planner.PlanSettings(device="cuda"))
    assert cpu.needed == cpu.memory["step_peak"]


def test_cuda_plan_traces_adamw_foreach_temporary():
    """On CUDA AdamW runs foreach, holding sqrt(v) for every trainable tensor at once: full fine-tuning's peak
    is then at least weights + gradients + optimizer state + one more float32 copy of what trains."""
    full = planner.plan_method("builtin:tiny-llama", "full", {}, planner.PlanSettings(2, 16, device="cuda")).memory
    assert full["step_peak"] >= full["weights"] + full["optimizer"] + 2 * full["grads"]
    cpu = planner.plan_method("builtin:tiny-llama", "full", {}, planner.PlanSettings(2, 16, device="cpu")).memory
    assert cpu["step_peak"] < full["weights"] + full["optimizer"] + 2 * full["grads"]


def test_ddp_adds_a_gradient_copy_and_fsdp_refusals_are_the_methods():
    one = planner.plan_method("builtin:tiny-llama", "lora", {}, planner.PlanSettings(2, 16, device="cpu")).memory
    ddp = planner.plan_method("builtin:tiny-llama", "lora", {}, planner.PlanSettings(
        2, 16, device="cpu", distributed="ddp", world_size=2)).memory
    assert ddp["step_peak"] == one["step_peak"] + one["grads"]
    with pytest.raises(ValueError, match="FSDP"):
        planner.plan_method("builtin:tiny-llama", "compacter", {}, planner.PlanSettings(
            2, 16, device="cpu", distributed="fsdp", world_size=2))


def test_shipped_configs_have_the_published_sizes():
    """The configs leantune ships build models of the published parameter counts (meta device, no memory)."""
    expected = {"meta-llama/Llama-3.1-8B": 8_030_261_248, "Qwen/Qwen2.5-7B": 7_615_616_512,
                "mistralai/Mistral-7B-v0.3": 7_248_023_552, "meta-llama/Llama-3.2-1B": 1_235_814_400}
    assert sorted(planner.shipped_ids()) == sorted(expected)
    for name, count in expected.items():
        source = planner.resolve_model(name)
        with torch.device("meta"):
            model = source.build(torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_an_8b_plan_allocates_nothing(tmp_path):
    """Llama-3.1-8B (16 GB of bf16 weights) planned in a fresh process whose peak RSS stays under 2 GB."""
    script = textwrap.dedent("""
        import json
        from leantune.measure.memory import peak_bytes
        from leantune.measure.plan import PlanSettings, plan_method
        p = plan_method("meta-llama/Llama-3.1-8B", "lora", None,
                        PlanSettings(batch_size=4, seq_len=2048, mixed_precision="bf16"))
        print(json.dumps({"weights": p.memory["weights"], "rss": peak_bytes()}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["weights"] >= 8_030_261_248 * 2  # the whole bf16 model was planned (plus LoRA's fp32 factors)
    assert res["rss"] < 2 * 2**30  # the process's own high-water mark (VmHWM), not the parent's RSS


def test_cli_plot_draws_peak_against_length(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "peaks.png"
    proc = subprocess.run([sys.executable, "-m", "leantune.cli", "plan", "--model", "builtin:tiny-llama", "--method",
                           "lora", "--compare", "--seq-len", "32", "--plot", str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lora" in proc.stdout and "step_peak" in proc.stdout


def test_cli_compare_json_lists_every_method(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LEANTUNE_NO_PROGRESS": "1"}
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    proc = subprocess.run([sys.executable, "-m", "leantune.cli", "plan", "--model", str(cfg), "--compare",
                           "--batch-size", "2", "--seq-len", "32", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [m["method"] for m in out["methods"]] == METHODS
    for m in out["methods"]:
        assert set(m) >= {"method", "label", "options", "memory"}, m
        assert set(m["memory"]) == set(planner.MEMORY_KEYS), m
        assert all(isinstance(v, int) and v >= 0 for v in m["memory"].values())
    assert out["cheapest"] in METHODS


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nobody/none-such", "--method", "lora"], "cannot read the config"),
    (["--model", "builtin:tiny-llama", "--method", "lora", "--device-memory", "lots"], "give a size like"),
    (["--model", "builtin:tiny-llama", "--method", "lora", "-o", "r=-1"], "lora"),
    (["--model", "builtin:tiny-llama"], "--compare"),
    (["--model", "builtin:tiny-llama", "--method", "lora", "--world-size", "2"], "--distributed"),
])
def test_bad_input_is_a_clear_error(args, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "leantune.cli", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1500:]


@pytest.mark.parametrize(("quantize", "method", "packed"), [
    ("nf4", "lora", True), ("int8", "lora", True), ("fp4", "ia3", True),
    ("nf4", "lisa", False),  # LISA dequantizes the blocks it trains: here both of tiny-llama's
])
def test_a_quantized_base_is_planned_as_measured(quantize, method, packed):
    """--quantize: bitsandbytes' layers traced on fake tensors (packed codes and scales at their real sizes, the
    dequantized temporaries of forward and backward) against the same step on a really quantized CPU model."""
    predicted, measured = _plan_and_measure("builtin:tiny-llama", method, 2, 32, quantize=quantize)
    _check(predicted, measured, f"{method} on a {quantize} base")
    plain, _ = _plan_and_measure("builtin:tiny-llama", method, 2, 32, measure=False)
    assert (predicted["weights"] < plain["weights"]) == packed


def test_a_quantized_bf16_base_under_autocast_is_planned_as_measured():
    settings = planner.PlanSettings(2, 32, device="cpu", quantize="nf4", base_dtype="bf16", mixed_precision="bf16")
    predicted = planner.plan_method("builtin:tiny-llama", "lora", {}, settings).memory
    measured = planner.plan_method("builtin:tiny-llama", "lora", {}, settings, fake=False).memory
    _check(predicted, measured, "lora on an nf4 bf16 base under bf16 autocast")


def test_a_quantized_plan_refuses_what_the_method_refuses():
    from leantune.methods import get_method

    settings = planner.PlanSettings(batch_size=2, seq_len=16, device="cpu", quantize="nf4")
    reason = get_method("light_peft")().capabilities.quantized_refusal
    with pytest.raises(ValueError, match="light_peft does not train on a quantized base") as e:
        planner.plan_method("builtin:tiny-llama", "light_peft", {}, settings)
    assert reason in str(e.value)
    with pytest.raises(ValueError, match="--quantize 'nf3'"):
        planner.PlanSettings(quantize="nf3")


def test_fsdp_per_rank_shards_are_what_fsdp2_holds(tmp_path):
    """The FSDP plan's weights, gradients and optimizer state for rank 0 of 2 against what rank 0 holds after a
    real FSDP2 step of leantune's loop on 2 CPU processes (gloo): the same bytes."""
    env = {**os.environ, "LEANTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    worker = os.path.join(os.path.dirname(__file__), "plan_fsdp_worker.py")
    methods = ["full", "lora"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           worker, str(tmp_path), *methods], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    settings = planner.PlanSettings(2, 32, device="cpu", distributed="fsdp", world_size=2)
    for method in methods:
        held = json.loads((tmp_path / f"{method}-rank0.json").read_text())
        other = json.loads((tmp_path / f"{method}-rank1.json").read_text())
        plan = planner.plan_method("builtin:tiny-llama", method, {}, settings).memory
        for key in ("weights", "grads", "optimizer"):
            assert plan[key] == held[key] >= other[key], (method, key)


@pytest.mark.parametrize(("model", "method", "options"), [
    ("builtin:tiny-mixtral", "lora", None),  # experts frozen: their products save no input
    ("builtin:tiny-mixtral", "lora", {"experts": True}),
    ("builtin:tiny-qwen2-moe", "full", None),  # experts trained: inputs saved, weight gradients
    ("builtin:tiny-qwen2-moe", "s2ft", None),
])
def test_mixture_of_experts_float32_is_planned_as_measured(model, method, options):
    """transformers' experts multiply by grouped_mm, whose fake kernel takes bfloat16 only: a float32 MoE base
    is traced through a stand-in that must allocate and save what the op does."""
    predicted, measured = _plan_and_measure(model, method, 2, 32, options=options)
    _check(predicted, measured, f"{method} {options or ''} on {model}")
