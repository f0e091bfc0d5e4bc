"""Step time and inference latency, measured fairly: several models in one process, their steps interleaved.

A shared machine drifts (other jobs, thermal limits, frequency scaling). Timing one method, then the next, would
charge the drift to whichever ran at a bad moment; alternating them step by step inside one process spreads it
evenly, and a rotating order keeps any one method from always following a heavy one. Figures are medians over
rounds after warm-up rounds.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotations(names: list[str], rounds: int):
    """Round r visits the names starting at r mod n: each name takes each position equally often."""
    n = len(names)
    for r in range(rounds):
        yield r, [names[(r + i) % n] for i in range(n)]


def interleaved_step_times(steppers: dict, batch: dict, warmup_rounds: int, rounds: int, on_step=None,
                           device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per training step of each stepper (see :class:`~leantune.measure.step.Stepper`), timed rounds
    only. ``on_step(round, name, seconds, loss)`` is called after every step (warm-up included, for progress)."""
    device = torch.device(device)
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, order in rotations(names, warmup_rounds + rounds):
        for name in order:
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
    """Seconds per generated token of each model, interleaved like the step times."""
    was = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    times: dict[str, list[float]] = {n: [] for n in models}
    try:
        for r, order in rotations(list(models), warmup_rounds + rounds):
            for name in order:
                dt = generate_seconds_per_token(models[name], prompt, new_tokens)
                if r >= warmup_rounds:
                    times[name].append(dt)
    finally:
        for n, m in models.items():
            m.train(was[n])
    return times


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
