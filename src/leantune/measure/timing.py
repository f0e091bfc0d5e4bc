"""Step time and inference latency, measured fairly: several models in one process, their steps interleaved.

A shared machine drifts (other jobs, thermal limits, frequency scaling). Timing one method, then the next, would
charge the drift to whichever ran at a bad moment; alternating them inside one process spreads it evenly. Two
things keep the alternation itself from biasing the figures. Each turn runs a method twice and times only the
second run: the first absorbs what the previous method left behind (on the CPU, memory the allocator handed back
to the system, whose pages fault again when touched), so the timed run sees the method's own steady state. And
the order of each round comes from a Williams design: every method takes every position, and follows every other
method, equally often over a full cycle. Figures are medians over the timed rounds.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def williams_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which each index takes each position, and directly follows each other index,
    equally often (a Williams design: n orders for even n, 2n for odd n)."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    orders = [[(x + r) % n for x in first] for r in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def round_orders(names: list[str], rounds: int):
    """(round, order of names) for ``rounds`` rounds, cycling through the Williams orders."""
    orders = williams_orders(len(names))
    for r in range(rounds):
        yield r, [names[i] for i in orders[r % len(orders)]]


def interleaved_step_times(steppers: dict, batch: dict, warmup_rounds: int, rounds: int, on_step=None,
                           device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per training step of each stepper (see :class:`~leantune.measure.step.Stepper`): per turn one
    untimed lead-in step, then one timed step; warm-up rounds are not timed. ``on_step(round, name, seconds,
    loss)`` is called after every turn (warm-up included, for progress)."""
    device = torch.device(device)
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, order in round_orders(names, warmup_rounds + rounds):
        for name in order:
            steppers[name].step(batch)  # lead-in: the allocator state this method's own steps leave
            _sync(device)
            t0 = time.perf_counter()
            loss = steppers[name].step(batch)
            _sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup_rounds:
                times[name].append(dt)
            if on_step is not None:
                on_step(r, name, dt, loss)
    return times


@torch.no_grad()
def generate_seconds_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy generation with the KV cache, batch of ``prompt``; exactly ``new_tokens`` tokens (EOS suppressed)."""
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    _sync(device)
    return (time.perf_counter() - t0) / new_tokens


def interleaved_latency(models: dict, prompt: torch.Tensor, new_tokens: int, warmup_rounds: int,
                        rounds: int) -> dict[str, list[float]]:
    """Seconds per generated token of each model, interleaved like the step times (lead-in run included)."""
    was = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    times: dict[str, list[float]] = {n: [] for n in models}
    try:
        for r, order in round_orders(list(models), warmup_rounds + rounds):
            for name in order:
                generate_seconds_per_token(models[name], prompt, new_tokens)  # lead-in
                dt = generate_seconds_per_token(models[name], prompt, new_tokens)
                if r >= warmup_rounds:
                    times[name].append(dt)
    finally:
        for n, m in models.items():
            m.train(was[n])
    return times


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
