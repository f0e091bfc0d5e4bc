"""Data parallel training on 2 CPU processes (gloo): every method under DDP, full/LoRA/LISA under FSDP2, resume
across process counts. A 2-process run with batch 4 must reach the adapter of a 1-process run with batch 8.

One ``torchrun`` launch runs all the 2-process trainings (tests/distributed_worker.py); the 1-process
references run in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from leantune.cli import app

COMMON = ["--model", "builtin:tiny-llama", "--task", "builtin:arith", "--eval-samples", "0", "--no-progress",
          "--max-length", "64"]
# name: (steps, strategy, method flags); light_peft's estimation phase takes 20 steps
CASES = {
    "ddp-full": (6, "ddp", ["--method", "full"]),
    "ddp-lora": (6, "ddp", ["--method", "lora"]),
    "ddp-s2ft": (6, "ddp", ["--method", "s2ft", "-o", "selection=activation"]),  # calibration data on every rank
    "ddp-lisa": (10, "ddp", ["--method", "lisa", "-o", "gamma=1", "-o", "period=3"]),  # blocks switch in flight
    "ddp-light_peft": (22, "ddp", ["--method", "light_peft"]),  # prunes at step 20, two steps after
    "fsdp-full": (6, "fsdp", ["--method", "full"]),
    "fsdp-lora": (6, "fsdp", ["--method", "lora"]),
    "fsdp-lisa": (10, "fsdp", ["--method", "lisa", "-o", "gamma=1", "-o", "period=3"]),
    "fsdp-houlsby": (4, "fsdp", ["--method", "houlsby"]),  # an attached module method, sharded with its block
}
RESUME = ["--lr-schedule", "constant", "--save-every", "3"]
LISA = ["--method", "lisa", "-o", "gamma=1", "-o", "period=3"]


def reference(name: str) -> str:
    return "one-" + name.split("-", 1)[1]  # ddp-lora and fsdp-lora share the 1-process run


def cli(args) -> None:
    res = CliRunner().invoke(app, ["train", *COMMON, *args])
    assert res.exit_code == 0, res.output


def two(out: Path, name: str, steps: int, strategy: str, flags: list[str]) -> list[str]:
    return ["train", *COMMON, "--batch-size", "4", "--max-steps", str(steps), "--distributed", strategy,
            "--output-dir", str(out / name), *flags]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    for name, (steps, _, flags) in CASES.items():  # the 1-process references, batch 8
        ref = out / reference(name)
        if not ref.exists():
            cli(["--batch-size", "8", "--max-steps", str(steps), "--output-dir", str(ref), *flags])
    for name, flags in (("lisa", LISA), ("lora", ["--method", "lora"])):  # straight runs with the resume schedule
        cli(["--batch-size", "8", "--max-steps", "10", "--output-dir", str(out / f"straight-{name}"), *RESUME, *flags])
    # 1 -> 2: six steps on one process; the launch continues them to ten on two (FSDP: the optimizer state is
    # loaded whole and sharded)
    cli(["--batch-size", "8", "--max-steps", "6", "--output-dir", str(out / "resume-1to2"), *RESUME, "--method", "lora"])
    jobs = [two(out, name, steps, strategy, flags) for name, (steps, strategy, flags) in CASES.items()]
    jobs.append(two(out, "resume-2to1", 6, "fsdp", [*RESUME, *LISA]))
    jobs.append(two(out, "resume-1to2", 10, "fsdp", [*RESUME, "--method", "lora"]))
    (out / "runs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "LEANTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    worker = Path(__file__).with_name("distributed_worker.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*launch, str(worker), str(out), str(out / "runs.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # 2 -> 1: the FSDP checkpoint at step 6 goes on for four more steps in one process
    cli(["--batch-size", "8", "--max-steps", "10", "--output-dir", str(out / "resume-2to1"), *RESUME, *LISA])
    refused = {m: subprocess.run([*launch, "-m", "leantune.cli", "train", *COMMON, "--batch-size", "4", "--max-steps",
                                  "1", "--distributed", "fsdp", "--output-dir", str(out / f"refused-{m}"), "--method", m],
                                 env=env, capture_output=True, text=True, timeout=300)
               for m in ("light_peft", "compacter")}
    return out, refused


def assert_same_adapter(a_dir: Path, b_dir: Path, tol: float = 1e-4) -> None:
    a, b = load_file(a_dir / "adapter.safetensors"), load_file(b_dir / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].float().abs().max())
        diff = float((a[k].float() - b[k].float()).abs().max())
        assert diff <= tol * max(scale, 1e-12), f"{k}: max |Δ| {diff:.3g} against max |a| {scale:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_reach_the_one_process_adapter(runs, name):
    out, _ = runs
    assert_same_adapter(out / reference(name), out / name)
    meta = json.loads((out / name / "leantune.json").read_text())
    assert meta["train"]["world_size"] == 2


@pytest.mark.parametrize("name", list(CASES))
def test_only_rank_zero_writes(runs, name):
    out, _ = runs
    steps = CASES[name][0]
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))  # one line per step, not two
    assert not [p for p in (out / name).rglob("*") if ".tmp" in p.name]


def test_the_loss_logged_is_the_global_mean(runs):
    out, _ = runs
    one = [json.loads(x) for x in (out / "one-lora" / "metrics.jsonl").read_text().splitlines()]
    two_ = [json.loads(x) for x in (out / "ddp-lora" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two_, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]


@pytest.mark.parametrize("name,straight", [("resume-2to1", "straight-lisa"), ("resume-1to2", "straight-lora")])
def test_resume_on_another_number_of_processes(runs, name, straight):
    out, _ = runs
    assert_same_adapter(out / straight, out / name)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lisa_optimizer_state_is_the_active_blocks_share_on_every_rank(runs, strategy):
    out, _ = runs
    seen_blocks = set()
    for rank in (0, 1):
        rows = json.loads((out / f"lisa-state-{strategy}-rank{rank}.json").read_text())
        for r in rows:
            assert r["held"] == r["share"], r  # moments for what trains now on this rank, nothing that left
            seen_blocks.add(tuple(r["blocks"]))
    assert len(seen_blocks) > 1  # the active block changed during the run
    if strategy == "fsdp":  # sharded: each rank holds a part
        full = json.loads((out / "lisa-state-ddp-rank0.json").read_text())
        half = json.loads((out / "lisa-state-fsdp-rank0.json").read_text())
        assert all(h["held"] < f["held"] for h, f in zip(half, full, strict=True))


@pytest.mark.parametrize("method,why", [("light_peft", "slices parameters to new shapes"),
                                        ("compacter", "slow weights are shared by every block")])
def test_a_method_that_cannot_shard_refuses_fsdp_at_start(runs, method, why):
    _, refused = runs
    done = refused[method]
    assert done.returncode != 0
    assert f"method {method!r} cannot train under FSDP" in done.stdout + done.stderr
    assert why in done.stdout + done.stderr


def test_python_m_leantune_cli_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "leantune.cli", "methods", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and any(m["name"] == "lisa" for m in json.loads(done.stdout))


def test_unknown_strategy_is_a_clear_error():
    from leantune.train import TrainConfig

    with pytest.raises(ValueError, match="distributed must be auto, no, ddp or fsdp"):
        TrainConfig(distributed="zero3")

