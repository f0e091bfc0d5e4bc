"""LISA's optimizer state over training: leantune's (state follows the active blocks) against the reference
approach (flip ``requires_grad`` each period, one AdamW over all parameters for the whole run) and full FT.

    python benchmarks/lisa_memory.py --plot lisa_memory.png [--json lisa_memory.json] [--threads 1]

A LLaMA-style model (8 layers, hidden 256, random init) trains with γ=2, K=2 for 8 periods on random tokens.
After every optimizer step each run records the bytes of its optimizer state (exact: the tensors AdamW holds)
and the resident set size of its process. Each run is a fresh subprocess, so the RSS series are comparable.
leantune's series should stay flat at the analytic (γ blocks + always-on)/(all) share of full FT's; the
reference climbs toward full FT's as more blocks have been drawn once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import leantune
from leantune.hooks import TrainHook
from leantune.measure.memory import optimizer_bytes
from leantune.train.loop import TrainConfig, train


def rss_bytes() -> int | None:
    """Current resident set size (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def build_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
                      max_position_embeddings=a.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def random_tokens(a) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, a.vocab, (64, a.seq), generator=g).tolist()
    return [{"input_ids": x, "labels": x} for x in ids]


def adamw_bytes(params) -> int:
    """torch AdamW per fp32 parameter: exp_avg + exp_avg_sq (8 bytes an entry) and a 4-byte step."""
    return sum(8 * p.numel() + 4 for p in params)


class Record(TrainHook):
    def __init__(self, rows):
        self.rows = rows

    def on_step_end(self, ctx):
        active = list(getattr(ctx.method, "active", ()))
        self.rows.append({"step": ctx.step, "active": active, "opt_bytes": optimizer_bytes(ctx.optimizer),
                          "rss": rss_bytes()})


def run_leantune(a, method: str) -> list[dict]:
    model = build_model(a)
    options = {"gamma": a.gamma, "period": a.period, "seed": a.seed} if method == "lisa" else {}
    leantune.apply(model, method, **options)
    rows: list[dict] = []
    cfg = TrainConfig(max_steps=a.period * a.periods, batch_size=a.batch, lr=1e-4, progress=False,
                      lr_schedule="constant")
    train(model, random_tokens(a), cfg, hooks=[Record(rows)])
    return rows


def run_reference(a) -> list[dict]:
    """The reference callback's approach: one AdamW built over every parameter (after the LMFlow#726 fix), and
    at each period start only ``requires_grad`` flips. AdamW skips parameters without a gradient, but keeps the
    moments of every block that was ever drawn."""
    from leantune.data.encode import collate

    model = build_model(a)
    lisa = leantune.apply(model, "lisa", gamma=a.gamma, period=a.period, seed=a.seed)  # for the same draws
    opt = torch.optim.AdamW(lisa.candidate_parameters(), lr=1e-4)
    data, rows = random_tokens(a), []
    model.train()
    for step in range(a.period * a.periods):
        if step % a.period == 0:
            for i, params in enumerate(lisa.block_params):
                for p in params.values():
                    p.requires_grad_(i in lisa.draw(step // a.period))
        start = (step * a.batch) % len(data)
        batch = collate(data[start:start + a.batch], 0)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        active = [i for i, ps in enumerate(lisa.block_params) if next(iter(ps.values())).requires_grad]
        rows.append({"step": step + 1, "active": active, "opt_bytes": optimizer_bytes(opt), "rss": rss_bytes()})
    return rows


def worker(a) -> None:
    torch.set_num_threads(a.threads)
    rows = run_reference(a) if a.worker == "reference" else run_leantune(a, a.worker)
    print(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--json", help="write the series and the summary here")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--gamma", type=int, default=2)
    p.add_argument("--period", type=int, default=2)
    p.add_argument("--periods", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=["lisa", "reference", "full"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    t0 = time.perf_counter()
    series = {}
    for name in ("lisa", "reference", "full"):
        argv = [sys.executable, __file__, "--worker", name] + [
            f"--{k}={v}" for k, v in vars(a).items() if k not in ("plot", "json", "worker") and v is not None]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ,
                             "LEANTUNE_NO_PROGRESS": "1"})
        series[name] = json.loads(out.stdout.strip().splitlines()[-1])

    model = build_model(a)
    lisa = leantune.apply(model, "lisa", gamma=a.gamma, period=a.period, seed=a.seed)
    full_bytes = adamw_bytes(model.parameters())
    block = adamw_bytes(lisa.block_params[0].values())
    expected = adamw_bytes(lisa.always_on.values()) + a.gamma * block
    n_all = sum(p.numel() for p in model.parameters())
    share = (sum(p.numel() for p in lisa.always_on.values())
             + a.gamma * sum(p.numel() for p in lisa.block_params[0].values())) / n_all
    assert all(r["opt_bytes"] == full_bytes for r in series["full"]), "full FT state is not the analytic AdamW size"

    print(f"model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}: {n_all / 1e6:.1f}M parameters; "
          f"always-on {sum(p.numel() for p in lisa.always_on.values()) / 1e6:.2f}M, one block "
          f"{sum(p.numel() for p in lisa.block_params[0].values()) / 1e6:.2f}M")
    print(f"gamma={a.gamma}, period={a.period}, {a.periods} periods; analytic share (γ blocks + always-on)/(all) = "
          f"{share:.4f} of the parameters, {expected / full_bytes:.4f} of full FT's AdamW bytes\n")
    print(f"{'step':>4} {'period':>6} {'blocks':>8} | {'leantune':>9} {'reference':>9} (of full FT's optimizer bytes)"
          f" | RSS MB: {'leantune':>8} {'reference':>9} {'full':>7}")
    mb = 1 / 2**20
    for lr, rr, fr in zip(series["lisa"], series["reference"], series["full"], strict=True):
        rss = [f"{r['rss'] * mb:.0f}" if r["rss"] else "-" for r in (lr, rr, fr)]
        print(f"{lr['step']:>4} {(lr['step'] - 1) // a.period:>6} {','.join(map(str, lr['active'])):>8} | "
              f"{lr['opt_bytes'] / full_bytes:>9.3f} {rr['opt_bytes'] / full_bytes:>9.3f} | "
              f"{rss[0]:>16} {rss[1]:>9} {rss[2]:>7}")
    ours = [r["opt_bytes"] for r in series["lisa"]]
    ref_by_period = [round(series["reference"][k]["opt_bytes"] / full_bytes, 2)
                     for k in range(a.period - 1, len(ours), a.period)]
    flat = all(b == expected for b in ours)
    print(f"\nleantune: {'flat at exactly' if flat else 'NOT flat at'} the analytic {expected / full_bytes:.3f} of "
          f"full FT's optimizer bytes at every step")
    print(f"reference at the end of each period: {' -> '.join(f'{x:.2f}' for x in ref_by_period)}")
    print(f"took {time.perf_counter() - t0:.0f} s")

    summary = {"args": {k: v for k, v in vars(a).items() if k != "worker"}, "parameters": n_all,
               "analytic_param_share": share, "analytic_byte_share": expected / full_bytes, "full_ft_bytes": full_bytes,
               "leantune_flat": flat, "reference_share_by_period": ref_by_period, "series": series}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    if a.plot:
        plot(series, full_bytes, expected, a)
        print(f"plot: {a.plot}")
    if not flat:
        sys.exit(1)


def plot(series, full_bytes, expected, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"lisa": "leantune LISA (state follows active blocks)",
              "reference": "reference (flip requires_grad, one AdamW)", "full": "full fine-tuning"}
    for name, rows in series.items():
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r["opt_bytes"] / full_bytes for r in rows], marker="o", ms=3, label=labels[name])
        if all(r["rss"] for r in rows):
            ax2.plot(steps, [r["rss"] / 2**20 for r in rows], marker="o", ms=3, label=labels[name])
    ax1.axhline(expected / full_bytes, color="gray", ls=":", label="analytic (γ blocks + always-on) / all")
    for k in range(a.period, a.period * a.periods, a.period):
        ax1.axvline(k + 0.5, color="lightgray", lw=0.5)
    ax1.set(xlabel="optimizer step", ylabel="optimizer state / full FT's", ylim=(0, 1.05),
            title=f"AdamW state, γ={a.gamma}, K={a.period}, {a.layers} layers")
    ax2.set(xlabel="optimizer step", ylabel="process RSS (MiB)", title="resident memory (fresh process per run)")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
