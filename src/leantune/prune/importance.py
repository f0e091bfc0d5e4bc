"""Importance of the PEFT modules, collected with hooks while training runs.

Module level: ``‖ΔW·x‖ / ‖W·x‖`` per token (padding excluded), averaged over the tokens of a step.
Rank level: first-order Taylor, ``|mean(A⊙∇A) over rank i's row| + |mean(B⊙∇B) over its column|``, with the
step's whole gradient (all micro-batches). Both are averaged over the steps during which ``active`` is set (the
second half of estimation). An adapter unit is any pair of a down projection (r, in) and an up projection
(out, r): LoRA's A and B, or an adapter's bottleneck (whose module ratio is ‖adapter(z)‖ / ‖z‖, z its input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..anatomy import weight_2d


@dataclass
class AdapterUnit:
    layer: nn.Module  # the base layer the adapter sits on
    down: nn.Parameter  # (r, in)
    up: nn.Parameter  # (out, r)
    delta: Callable[[torch.Tensor], torch.Tensor]  # x -> ΔW·x (no dropout)
    output_has_delta: bool = False  # the layer's output (what forward hooks see) already includes ΔW·x
    # whether that term is exactly delta(x) right now; when it is not (dropout on the adapter's input while
    # training), output - delta(x) is not W·x + b, so W·x is computed from the layer's weight instead
    term_is_exact: Callable[[], bool] = lambda: True
    # an adapter module whose output is its term and whose input z is what it adapts (a bottleneck adapter): the
    # ratio is ‖term‖ / ‖z‖, read by a hook on this module instead of the layer
    term_module: nn.Module | None = None


class AdapterImportance:
    def __init__(self, model: nn.Module, units: dict[str, AdapterUnit]):
        self.units = units
        self.active = False
        self.names = list(units)
        self.module_sum = torch.zeros(len(units), dtype=torch.float64)  # Σ over steps of the step's mean ratio
        self.rank_sum = {n: torch.zeros(u.down.shape[0], dtype=torch.float64) for n, u in units.items()}
        self.steps = torch.zeros((), dtype=torch.float64)
        self._token_mask: torch.Tensor | None = None
        self._reset_step()
        self._hooks = [model.register_forward_pre_hook(self._remember_mask, with_kwargs=True)]
        for i, (name, u) in enumerate(units.items()):
            # prepend: before an adapter that adds its term in a hook of its own, the output is still W·x + b; an
            # adapter that adds it in the layer's forward says so (output_has_delta) and it is taken off here
            watched = u.term_module if u.term_module is not None else u.layer
            self._hooks.append(watched.register_forward_hook(self._module_hook(i, u), prepend=True))
            self._hooks.append(u.down.register_hook(self._grad_hook(name, u.down, dim=1, down=True)))
            self._hooks.append(u.up.register_hook(self._grad_hook(name, u.up, dim=0, down=False)))

    def _reset_step(self):
        # per-step sums stay on the model's device (no sync per call) until end_step
        self._ratio_sum: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}
        self._down: dict[str, torch.Tensor] = {}
        self._up: dict[str, torch.Tensor] = {}

    def _remember_mask(self, module, args, kwargs):
        self._token_mask = kwargs.get("attention_mask") if self.active else None

    def _module_hook(self, i: int, u: AdapterUnit):
        def hook(module, args, output):
            if not self.active:
                return None
            with torch.no_grad():
                x = args[0]
                if u.term_module is not None:
                    delta, base = output.float(), x.float()
                else:
                    delta = u.delta(x).float()
                    if u.output_has_delta and not u.term_is_exact():
                        base = F.linear(x.float(), weight_2d(module).float())  # W·x as the layer computed it
                    else:
                        base = output.float()
                        if u.output_has_delta:
                            base = base - delta
                        if getattr(module, "bias", None) is not None:
                            base = base - module.bias.float()
                ratio = delta.norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-12)
                mask = self._token_mask
                if mask is not None and mask.shape == ratio.shape:
                    keep = mask.to(ratio.device).bool()
                    ratio = ratio[keep]
                self._ratio_sum[i] = self._ratio_sum.get(i, 0) + ratio.double().sum()
                self._tokens[i] = self._tokens.get(i, 0) + ratio.numel()
            return None

        return hook

    def _grad_hook(self, name: str, param: nn.Parameter, dim: int, down: bool):
        def hook(grad):
            if self.active:
                # the weight does not change within a step, so Σ over micro-batches of mean(W⊙g) = mean(W⊙Σg)
                contrib = (param.detach().double() * grad.detach().double()).mean(dim=dim)
                acc = self._down if down else self._up
                acc[name] = acc.get(name, 0) + contrib
            return None

        return hook

    def _gather_ranks(self) -> None:
        """Data parallel: every rank saw its own tokens and its own gradient share. Token ratios and counts are
        summed over ranks; the Taylor terms, linear in the gradient, are averaged (the averaged gradient is the
        step's gradient), so every rank folds in what a single process would and plans the same cut."""
        if dist.world_size() == 1:
            return
        n = len(self.names)
        dev = self.module_sum.device
        ratios = torch.stack([torch.as_tensor(self._ratio_sum.get(i, 0.0), dtype=torch.float64).to(dev)
                              for i in range(n)])
        tokens = torch.tensor([float(self._tokens.get(i, 0)) for i in range(n)], dtype=torch.float64)
        ratios, tokens = dist.sum_over_ranks(ratios), dist.sum_over_ranks(tokens)
        self._ratio_sum = {i: ratios[i] for i in range(n)}
        self._tokens = {i: int(tokens[i]) for i in range(n)}
        for acc, part in ((self._down, "down"), (self._up, "up")):
            for name in self.names:
                r = getattr(self.units[name], part).shape[0 if part == "down" else 1]
                local = acc.get(name)
                local = torch.zeros(r, dtype=torch.float64) if local is None else local.double().cpu()
                acc[name] = dist.mean_over_ranks(local)

    def end_step(self) -> None:
        """Fold the finished step into the running sums (only if it was an active step)."""
        if self.active:
            self._gather_ranks()
        if self.active and all(self._tokens.get(i, 0) > 0 for i in range(len(self.names))):
            for i in range(len(self.names)):
                self.module_sum[i] += float(self._ratio_sum[i]) / self._tokens[i]
            zero = torch.zeros(())
            for n in self.names:
                down = self._down.get(n, zero).cpu().abs()
                up = self._up.get(n, zero).cpu().abs()
                self.rank_sum[n] += down + up
            self.steps += 1
        self._reset_step()

    def module_scores(self) -> dict[str, float]:
        n = max(1.0, float(self.steps))
        return {name: float(self.module_sum[i]) / n for i, name in enumerate(self.names)}

    def rank_scores(self) -> dict[str, torch.Tensor]:
        n = max(1.0, float(self.steps))
        return {name: self.rank_sum[name] / n for name in self.names}

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The running sums as tensors (for checkpoints in the middle of estimation)."""
        out = {f"{prefix}.module_sum": self.module_sum, f"{prefix}.steps": self.steps}
        out.update({f"{prefix}.rank_sum.{n}": t for n, t in self.rank_sum.items()})
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.active = False
