"""Many adapters on one base: the adapter bank's mixed batch against one merged adapter and PEFT's mixed batch.

    python benchmarks/serve_throughput.py --output-dir DIR [--rounds 9] [--threads N] [--skip-one-thread] [--skip-server]

On the bench's efficiency model (random-init LLaMA-style, hidden 512, 8 layers, GQA, ~30M parameters;
``measure/effmodel.py``), for each mix:

  lora_32   32 distinct LoRA adapters (r=16, alpha=32, all linear layers), batch 32 x 32 tokens, one adapter a row
  lora_8    8 LoRA adapters, batch 16 x 128 tokens (rows 2 by 2 on each adapter)
  s2ft_32   32 S²FT adapters (default budget: LoRA r=16's parameter count on o and down), batch 32 x 32

prefill tokens/s of one no-grad forward of the batch through (a) the bank's mixed batch (``serve/bank.py``:
gathers and ``bmm``), (b) one adapter merged into a plain model (the same batch: the cost every row would pay if
all used one adapter), (c) PEFT's mixed batch (``PeftModel(..., adapter_names=...)``; the S²FT adapters exported as
rank-k LoRA, the only form PEFT has of them), as medians of interleaved rounds (Williams orders). The bank reads
the stacks of rows on consecutive slots as views; "gathered" is the same batch in a bank with one more adapter in
the middle of it, where every layer gathers each row's stacks (``index_select``): a batch of adapters scattered
over a larger bank. Decode tokens/s:
one greedy step of the same batch on a KV cache of the prompt, the same three ways. Targets (issue 16): lora_32
mixed >= 0.85x merged and >= 1.4x PEFT.

Also: padding ranks vs grouping rows by rank (one layer, half the rows r=8, half r=64); the server's throughput and
p50 / p99 latency under the load test's mix (200 concurrent requests across 8 LoRA adapters, a third streaming,
8 new tokens each, on loopback); the switch (bank: S²FT's k columns restored and ``index_add_``-ed) against LoRA's
merge + unmerge (two full ``B·A`` products) for one width x width layer, widths 512 to 8192 (plot).

Two settings, one run. The main one uses all the machine's cores (``--threads``, default ``os.cpu_count()``: torch's
own default, and the setting of the issue's anchors — PEFT's mixed batch at 0.58x merged for lora_32 "on a 2-core
CPU") on wall time. The mixes are then measured again on one thread, on the process's CPU seconds
(``"one_thread"`` in serve.json; ``--skip-one-thread`` leaves it out): a single thread's CPU time is what other jobs on
a shared machine disturb least, and it shows the bank's overhead without the second core's help. The two settings
split the work differently: with two threads the big GEMMs run on both cores while PEFT's per-adapter loop (Python,
one small product at a time) gains little, so PEFT falls further behind.

Writes DIR/serve.json, DIR/serve.md (the tables) and DIR/switch.png. Ratios within one run; absolute figures depend
on the machine and its load: wall time needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import leantune
from leantune.measure.effmodel import EfficiencyModel
from leantune.measure.timing import round_orders
from leantune.methods.terms import Columns
from leantune.serve.bank import AdapterBank, _merge_term

SPEC = EfficiencyModel()
MIXES = {"lora_32": ("lora", 32, 32, 32), "lora_8": ("lora", 8, 16, 128), "s2ft_32": ("s2ft", 32, 32, 32)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_adapters(root: Path, method: str, n: int) -> list[tuple[str, Path, Path]]:
    """(name, leantune folder, PEFT folder) of n adapters with random (trained-looking) values."""
    from leantune.interop.peft import export_peft

    out = []
    model = SPEC.build()
    for i in range(n):
        opts = {"r": 16, "alpha": 32} if method == "lora" else {"seed": i}
        m = leantune.apply(model, method, **opts)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, p in m.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        leantune.save(model, root / f"{method}{i}")
        export_peft(model, root / f"{method}{i}.peft")
        m.remove()
        out.append((f"{method}{i}", root / f"{method}{i}", root / f"{method}{i}.peft"))
    return out


def build_peft(adapters):
    from peft import PeftModel

    model = PeftModel.from_pretrained(SPEC.build().eval(), str(adapters[0][2]), adapter_name=adapters[0][0])
    for name, _f, pf in adapters[1:]:
        model.load_adapter(str(pf), adapter_name=name)
    return model.eval()


CLOCK = {"clock": time.process_time}


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each function, interleaved (one untimed warm-up round), on ``CLOCK`` (``--clock``: the
    process's CPU time by default, which other processes on a shared machine disturb far less than wall time)."""
    clock = CLOCK["clock"]
    times = {n: [] for n in fns}
    for r, order in round_orders(list(fns), rounds + 1):
        for name in order:
            t0 = clock()
            fns[name]()
            dt = clock() - t0
            if r > 0:
                times[name].append(dt)
    return {n: statistics.median(t) for n, t in times.items()}


@torch.no_grad()
def mix_figures(kind: str, n: int, batch: int, seq: int, rounds: int, root: Path) -> dict:
    t0 = time.perf_counter()
    adapters = make_adapters(root, kind, n)
    log(f"{kind} x{n}: adapters made in {time.perf_counter() - t0:.0f} s")
    names = [adapters[i * n // batch][0] for i in range(batch)]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, SPEC.vocab, (batch, seq), generator=g)
    bank = AdapterBank(SPEC.build().eval())
    for name, folder, _pf in adapters:
        bank.add(name, folder)
    # the same adapters in a bank with one more in the middle: the batch's rows no longer take consecutive slots,
    # so every layer gathers each row's stacks (index_select) instead of reading them as a view
    gbank = AdapterBank(SPEC.build().eval())
    for i, (name, folder, _pf) in enumerate(adapters):
        gbank.add(name, folder)
        if i == n // 2 - 1:
            gbank.add("spacer", folder)
    merged = SPEC.build().eval()
    leantune.load(merged, adapters[0][1])
    merged = merged.leantune_method.merge_and_unload().eval()
    peft = build_peft(adapters)
    log(f"{kind} x{n}: bank, merged model and PEFT ready at {time.perf_counter() - t0:.0f} s")
    check = (bank.forward(ids[:4], names[:4]) - peft(input_ids=ids[:4], adapter_names=names[:4]).logits).abs().max()
    if float(check) > 1e-3:
        raise RuntimeError(f"the bank and PEFT disagree on the mixed batch (max |diff| {float(check):.2e})")

    prefill = interleaved({
        "mixed": lambda: bank.forward(ids, names),
        "mixed_gather": lambda: gbank.forward(ids, names),
        "merged": lambda: merged(input_ids=ids),
        "peft": lambda: peft(input_ids=ids, adapter_names=names),
    }, rounds)

    # decode: one greedy step of every row on a KV cache of its prompt (cropped back after each step)
    def decoder(run):
        out = run(ids, True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def step():
            run(nxt, False, cache)
            cache.crop(-1)  # the step's token off again
        return step

    def bank_run(x, first, cache=None):
        with bank.using(names):
            return bank.model(input_ids=x, past_key_values=cache, use_cache=True)

    decode = interleaved({
        "mixed": decoder(bank_run),
        "merged": decoder(lambda x, first, cache=None: merged(input_ids=x, past_key_values=cache, use_cache=True)),
        "peft": decoder(lambda x, first, cache=None: peft(input_ids=x, past_key_values=cache, use_cache=True,
                                                          adapter_names=names)),
    }, rounds)
    tokens = batch * seq
    return {
        "adapters": n, "batch": batch, "seq": seq,
        "prefill_tokens_per_s": {k: tokens / v for k, v in prefill.items()},
        "decode_tokens_per_s": {k: batch / v for k, v in decode.items()},
        "mixed_over_merged": prefill["merged"] / prefill["mixed"],
        "mixed_over_peft": prefill["peft"] / prefill["mixed"],
        "gather_over_merged": prefill["merged"] / prefill["mixed_gather"],
        "gather_over_peft": prefill["peft"] / prefill["mixed_gather"],
        "decode_mixed_over_merged": decode["merged"] / decode["mixed"],
        "decode_mixed_over_peft": decode["peft"] / decode["mixed"],
    }


@torch.no_grad()
def pad_or_group(rounds: int) -> dict:
    """One 512 -> 2048 layer's LoRA term for 32 x 32 tokens, half the rows r=8 and half r=64: padded to 64 in one
    gather + bmm (what the bank does) vs grouped by rank (two gathers + bmm, results put back by row)."""
    b, t, d_in, d_out = 32, 32, 512, 2048
    x = torch.randn(b, t, d_in)
    small = torch.arange(b) % 2 == 0
    at64, bt64 = torch.randn(33, d_in, 64), torch.randn(33, 64, d_out)
    at8, bt8 = at64[:, :, :8].contiguous(), bt64[:, :8].contiguous()
    slots = torch.arange(1, b + 1)
    rows8, rows64 = small.nonzero().flatten(), (~small).nonzero().flatten()

    def padded():
        return torch.bmm(torch.bmm(x, at64.index_select(0, slots)), bt64.index_select(0, slots))

    def grouped():
        out = x.new_empty(b, t, d_out)
        for rows, at, bt in ((rows8, at8, bt8), (rows64, at64, bt64)):
            s = slots[rows]
            out[rows] = torch.bmm(torch.bmm(x[rows], at.index_select(0, s)), bt.index_select(0, s))
        return out

    med = interleaved({"padded": padded, "grouped": grouped}, rounds)
    return {"padded_s": med["padded"], "grouped_s": med["grouped"], "grouped_over_padded": med["padded"] / med["grouped"]}


def server_figures(root: Path, requests: int = 200, new_tokens: int = 8) -> dict:
    """The load test's mix against a live server on loopback (the efficiency model, 8 LoRA adapters)."""
    import http.client

    import uvicorn

    from leantune.serve.engine import Limits
    from leantune.serve.server import create_app

    adapters = make_adapters(root, "lora", 8)
    bank = AdapterBank(SPEC.build().eval())
    for name, folder, _pf in adapters:
        bank.add(name, folder)
    from leantune.models import byte_tokenizer

    app = create_app(bank, byte_tokenizer(), Limits(max_batch=32))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    prompts = ["The quick brown fox", "hello world", "Once upon a time there was", "1 2 3 4"]

    def one(i):
        body = {"model": adapters[i % 8][0], "prompt": prompts[(i // 8) % 4], "max_tokens": new_tokens,
                "stream": i % 3 == 0, "temperature": 0}
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=requests) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    server.should_exit = True
    thread.join(60)
    lat = sorted(t for _s, t in results)
    ok = sum(s == 200 for s, _t in results)
    return {"requests": requests, "answered_200": ok, "new_tokens": new_tokens, "wall_s": wall,
            "requests_per_s": requests / wall, "tokens_per_s": app.state.engine.tokens / wall,
            "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "engine_steps": app.state.engine.steps}


@torch.no_grad()
def switch_figures(widths, runs: int = 5, r: int = 16) -> list[dict]:
    """One width x width nn.Linear: the bank's S²FT switch (k = 2r columns, LoRA r's parameter count) vs LoRA's
    merge + unmerge (subtract one B·A, add the next)."""
    return [_switch_one(w, runs, r) for w in widths]


def _switch_one(w: int, runs: int, r: int) -> dict:
    layer = torch.nn.Linear(w, w, bias=False)
    k = 2 * r
    g = torch.Generator().manual_seed(w)
    terms = [Columns(torch.sort(torch.randperm(w, generator=g)[:k]).values, torch.randn(w, k, generator=g) * 0.01)
             for _ in range(2)]
    loras = [(torch.randn(w, r, generator=g) * 0.01, torch.randn(r, w, generator=g) * 0.01) for _ in range(2)]
    state = {"undo": _merge_term(layer, terms[0]), "i": 0, "j": 0}

    def s2ft_switch():
        state["undo"]()
        state["i"] ^= 1
        state["undo"] = _merge_term(layer, terms[state["i"]])

    def lora_switch():
        b, a = loras[state["j"]]
        layer.weight.sub_(b @ a)
        state["j"] ^= 1
        b, a = loras[state["j"]]
        layer.weight.add_(b @ a)

    med = interleaved({"s2ft": s2ft_switch, "lora": lora_switch}, runs)
    return {"width": w, "s2ft_switch_s": med["s2ft"], "lora_merge_unmerge_s": med["lora"],
            "lora_over_s2ft": med["lora"] / med["s2ft"]}


def mix_table(res: dict) -> list[str]:
    unit = "CPU-s" if res.get("clock") == "cpu" else "s"
    lines = [f"Tokens per {unit} ({res.get('threads')} thread(s), medians of {res.get('rounds')} interleaved rounds).", "",
             "| mix | prefill tok/s mixed | merged | PEFT mixed | mixed / merged | mixed / PEFT | gathered / PEFT "
             "| decode tok/s mixed | merged | PEFT | decode mixed / merged | decode mixed / PEFT |", "|" + "---|" * 12]
    for name in MIXES:
        if name not in res:
            continue
        m = res[name]
        p, d = m["prefill_tokens_per_s"], m["decode_tokens_per_s"]
        lines.append(f"| {name} ({m['adapters']} adapters, {m['batch']}x{m['seq']}) | {p['mixed']:,.0f} | "
                     f"{p['merged']:,.0f} | {p['peft']:,.0f} | {m['mixed_over_merged']:.2f}x | {m['mixed_over_peft']:.2f}x"
                     f" | {m['gather_over_peft']:.2f}x | {d['mixed']:,.0f} | {d['merged']:,.0f} | {d['peft']:,.0f} | "
                     f"{m['decode_mixed_over_merged']:.2f}x | {m['decode_mixed_over_peft']:.2f}x |")
    return lines


def table(res: dict) -> str:
    lines = mix_table(res)
    if "one_thread" in res:
        lines += [""] + mix_table(res["one_thread"])
    if "pad_or_group" in res:
        pg = res["pad_or_group"]
        lines += ["", f"Mixed ranks (one 512->2048 layer, 32x32 tokens, half r=8 half r=64): padded to 64 "
                      f"{pg['padded_s'] * 1e3:.2f} ms, grouped by rank {pg['grouped_s'] * 1e3:.2f} ms "
                      f"(grouped / padded speed {pg['grouped_over_padded']:.2f}x)."]
    if "server" in res:
        s = res["server"]
        lines += ["", f"Server, {s['requests']} concurrent requests across 8 LoRA adapters (a third streaming, "
                      f"up to {s['new_tokens']} new tokens each): {s['answered_200']} answered, {s['requests_per_s']:.1f} "
                      f"requests/s, {s['tokens_per_s']:.0f} tokens/s, p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s "
                      f"({s['engine_steps']} engine steps)."]
    if "switch" in res:
        lines += ["", "| width | S²FT switch (bank) | LoRA merge + unmerge | LoRA / S²FT |", "|---|---|---|---|"]
        for w in res["switch"]:
            lines.append(f"| {w['width']} | {w['s2ft_switch_s'] * 1e3:.3f} ms | {w['lora_merge_unmerge_s'] * 1e3:.2f} ms"
                         f" | {w['lora_over_s2ft']:.0f}x |")
    return "\n".join(lines) + "\n"


def plot(switch: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [w["width"] for w in switch]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.loglog(widths, [w["s2ft_switch_s"] * 1e3 for w in switch], "o-", label="S²FT switch (k=32 columns)")
    ax.loglog(widths, [w["lora_merge_unmerge_s"] * 1e3 for w in switch], "s-", label="LoRA merge + unmerge (r=16)")
    ax.set_xlabel("layer width (width x width)")
    ax.set_ylabel("ms per switch")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the main setting (default: all the machine's cores)")
    ap.add_argument("--skip-one-thread", action="store_true", help="leave out the mixes' one-thread, CPU-time pass")
    ap.add_argument("--mixes", default=",".join(MIXES), help="comma list of " + ", ".join(MIXES))
    ap.add_argument("--widths", default="512,1024,2048,4096,8192")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--mixes-only", action="store_true", help=argparse.SUPPRESS)  # the one-thread pass's process
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="of the main setting: cpu, the process's CPU seconds (robust on a shared machine with "
                         "--threads 1); wall, elapsed (default with more than one thread; cpu with one)")
    args = ap.parse_args(argv)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        ap.error(f"unknown mix(es) {unknown}: choose from {', '.join(MIXES)}")
    torch.set_num_threads(args.threads)
    CLOCK["clock"] = time.process_time if clock == "cpu" else time.perf_counter
    res: dict = {"model": SPEC.describe(), "threads": args.threads, "rounds": args.rounds, "clock": clock}
    with tempfile.TemporaryDirectory() as tmp:
        for name in mixes:
            kind, n, batch, seq = MIXES[name]
            res[name] = mix_figures(kind, n, batch, seq, args.rounds, Path(tmp) / name)
            print(name, json.dumps({k: v for k, v in res[name].items() if "over" in k}), file=sys.stderr, flush=True)
        if args.mixes_only:
            (args.output_dir / "serve.json").write_text(json.dumps(res, indent=2) + "\n")
            return
        if not args.skip_one_thread and (args.threads, clock) != (1, "cpu"):
            # a fresh process: one that ran on more threads first measures a later one-thread pass differently
            # (mixed and merged 7-10 % faster per CPU-second, PEFT not)
            log("the mixes again: one thread, CPU seconds (a fresh process)")
            subprocess.run([sys.executable, __file__, "--output-dir", tmp, "--threads", "1", "--clock", "cpu",
                            "--rounds", str(args.rounds), "--mixes", ",".join(mixes), "--mixes-only"], check=True)
            res["one_thread"] = json.loads((Path(tmp) / "serve.json").read_text())
        res["pad_or_group"] = pad_or_group(args.rounds)
        if not args.skip_server:
            res["server"] = server_figures(Path(tmp) / "server")
            print("server", json.dumps(res["server"]), file=sys.stderr, flush=True)
    res["switch"] = switch_figures([int(w) for w in args.widths.split(",")])
    (args.output_dir / "serve.json").write_text(json.dumps(res, indent=2) + "\n")
    text = table(res)
    (args.output_dir / "serve.md").write_text(text)
    plot(res["switch"], args.output_dir / "switch.png")
    print(text)


if __name__ == "__main__":
    main()
