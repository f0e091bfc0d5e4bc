"""The adapter bank on a 4-bit base against the same bank on the full-precision base.

    python benchmarks/serve_quantized.py [--adapters 8] [--batch 16] [--tokens 64] [--rounds 5] [--threads 1]

On the bench's efficiency model (``measure/effmodel.py``: random-init LLaMA-style, hidden 512, 8 layers; built in
fp32 and built NF4 layer by layer), ``--adapters`` LoRA adapters (r=16, all linear layers, random non-zero factors)
in a bank on each base. Prefill tokens/s of one no-grad forward of a batch of ``--batch`` rows x ``--tokens``:

  mixed     one adapter a row (cycling), the bank's gathered terms
  one       every row on the first adapter: on fp32 the switch (merged into the weights), on NF4 the same terms as
            ``mixed`` (a quantized base is never merged into)

Timings are the process's CPU seconds (one thread by default), medians of interleaved rounds after one warm-up;
``one`` is timed after the adapter is switched in (fp32: the merge is not counted).
Also the weight bytes of each base (quantized layers at their real size). Ratios within one run; absolute figures
depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def build_bank(quantize, n_adapters: int, root: str):
    import leantune
    from leantune.measure.effmodel import EfficiencyModel
    from leantune.serve.bank import AdapterBank

    spec = EfficiencyModel()
    names = []
    for i in range(n_adapters):
        model = spec.build(quantize=quantize)
        m = leantune.apply(model, "lora", r=16, alpha=32, targets="all-linear")
        g = torch.Generator().manual_seed(i)
        m.load_state({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in m.state().items()})
        leantune.save(model, f"{root}/{quantize}-{i}")
        names.append(f"a{i}")
    model = spec.build(quantize=quantize).eval()
    bank = AdapterBank(model)
    for i, n in enumerate(names):
        bank.add(n, f"{root}/{quantize}-{i}")
    return bank, names, spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leantune.quant import tensor_bytes

    with tempfile.TemporaryDirectory() as root:
        banks = {q: build_bank(q, args.adapters, root) for q in (None, "nf4")}
        vocab = banks[None][2].vocab
        x = torch.randint(3, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
        cases = []
        for q, (bank, names, _) in banks.items():
            mixed = [names[i % len(names)] for i in range(args.batch)]
            cases += [(q, "mixed", bank, mixed), (q, "one", bank, [names[0]] * args.batch)]
        times = {(q, kind): [] for q, kind, _, _ in cases}
        for r in range(args.rounds + 1):
            for q, kind, bank, rows in (cases if r % 2 else cases[::-1]):
                if kind == "one":  # the switch (fp32) done before the clock: the steady state of a one-adapter run
                    bank.forward(x[:1], rows[:1])
                t0 = time.process_time()
                bank.forward(x, rows)
                if r:  # round 0: warm-up
                    times[(q, kind)].append(time.process_time() - t0)
        print(f"{args.adapters} LoRA adapters (r=16, all linear), batch {args.batch} x {args.tokens}, "
              f"{args.threads} thread(s), medians of {args.rounds} rounds (CPU s)")
        print("| base | weights | mixed tok/s | one-adapter tok/s (how) |")
        print("|---|---|---|---|")
        tokens = args.batch * args.tokens
        for q, (bank, _, _) in banks.items():
            mixed = tokens / statistics.median(times[(q, "mixed")])
            one = tokens / statistics.median(times[(q, "one")])
            how = "terms, never merged" if q else "switch: merged"
            print(f"| {q or 'fp32'} | {tensor_bytes(bank.model)['total'] / 2**20:.1f} MiB | {mixed:.0f} | "
                  f"{one:.0f} ({how}) |")


if __name__ == "__main__":
    main()
