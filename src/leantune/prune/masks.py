"""Foundation masks: one trainable scalar per attention head and one per FFN channel, init 1.0.

A head mask scales the head's output before the output projection: a forward pre-hook on ``o`` (an encoder-decoder's
cross-attention: on ``cross_o``, masks of their own) multiplies the head's block of ``head_dim`` input columns (equivalent to scaling its attention probabilities, and it leaves
fused attention kernels alone). An FFN mask scales the intermediate activation: a pre-hook on ``down``. The mask
lives as a child module ``light_peft_mask`` of the layer it scales, so it moves with the model to any device.

Besides the mask values themselves (the paper's ranking), the masks can collect a first-order Taylor score,
``|m ⊙ ∂L/∂m|`` with the step's whole task-loss gradient (all micro-batches, the L1 term taken out), averaged over
the steps during which ``active`` is set: the head-importance score of Michel et al. (2019), for every channel.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import dist
from ..anatomy import Anatomy, in_out_features

MASK_ATTR = "light_peft_mask"


class InputMask(nn.Module):
    """One scalar per block of ``block`` consecutive input features (fp32, cast to the input's dtype)."""

    def __init__(self, n: int, block: int, device):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n, dtype=torch.float32, device=device))
        self.block = block

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x.dtype)
        if self.block == 1:
            return x * m
        return (x.unflatten(-1, (-1, self.block)) * m[:, None]).flatten(-2)


def _pre_hook(module: nn.Module, args):
    return (getattr(module, MASK_ATTR).scale(args[0]), *args[1:])


class FoundationMasks:
    """Head masks on every block's ``o`` (and ``cross_o`` where there is one) and FFN masks on every block's ``down``;
    ``detach()`` drops them all."""

    def __init__(self, anat: Anatomy, heads: bool = True, ffn: bool = True, taylor: bool = False):
        self.head_masks: list[InputMask] = []
        self.cross_head_masks: list[InputMask | None] = []  # one per block, None where it has no cross-attention
        self.ffn_masks: list[InputMask] = []
        self._owners: list[nn.Module] = []
        self._hooks = []
        self.named: dict[str, nn.Parameter] = {}  # "<layer name>.head_mask" / ".ffn_mask" -> mask
        for block in anat.blocks:
            if heads:
                o = block.linear("o")
                self.head_masks.append(self._attach(o, anat.head_dim))
                self.named[f"{anat.name_of(o)}.head_mask"] = self.head_masks[-1].mask
                cross_o = block.linears.get("cross_o")
                self.cross_head_masks.append(self._attach(cross_o, anat.head_dim) if cross_o is not None else None)
                if cross_o is not None:
                    self.named[f"{anat.name_of(cross_o)}.cross_head_mask"] = self.cross_head_masks[-1].mask
            if ffn:
                down = block.linear("down")
                self.ffn_masks.append(self._attach(down, 1))
                self.named[f"{anat.name_of(down)}.ffn_mask"] = self.ffn_masks[-1].mask
        # first-order Taylor scores, collected only when asked for (foundation_score="taylor")
        self.active = False
        self.taylor_sum: dict[str, torch.Tensor] = {}
        self.taylor_steps = torch.zeros((), dtype=torch.float64)
        self._grad: dict[str, torch.Tensor] = {}
        if taylor:
            for name, mask in self.named.items():
                self.taylor_sum[name] = torch.zeros(mask.numel(), dtype=torch.float64)
                self._hooks.append(mask.register_hook(self._grad_hook(name)))

    def _attach(self, layer: nn.Module, block: int) -> InputMask:
        in_f, _ = in_out_features(layer)
        if in_f % block:
            raise ValueError(f"{type(layer).__name__} has {in_f} inputs, not a multiple of head_dim {block}")
        mask = InputMask(in_f // block, block, layer.weight.device)
        layer.add_module(MASK_ATTR, mask)
        self._owners.append(layer)
        self._hooks.append(layer.register_forward_pre_hook(_pre_hook))
        return mask

    def _grad_hook(self, name: str):
        def hook(grad):
            if self.active:  # summed over the step's micro-batches (the mask does not change within a step)
                self._grad[name] = self._grad.get(name, 0) + grad.detach().double()
            return None

        return hook

    def end_step(self, l1: float = 0.0) -> None:
        """Fold the finished step's ``|m ⊙ g|`` into the Taylor sums (an active step only); ``l1`` is the penalty's
        λ, whose gradient ``λ·sign(m)`` is taken out so the score reads the task loss alone."""
        if self.active and self.taylor_sum and dist.world_size() > 1:  # the step's gradient: the ranks' mean
            self._grad = {n: dist.mean_over_ranks(torch.as_tensor(self._grad.get(n, torch.zeros(m.numel())))
                                                  .double().to(m.device))
                          for n, m in self.named.items()}
        if self.active and self.taylor_sum and len(self._grad) == len(self.taylor_sum):
            for name, g in self._grad.items():
                m = self.named[name].detach().double()
                self.taylor_sum[name] += (m * (g - l1 * torch.sign(m))).abs().cpu()
            self.taylor_steps += 1
        self._grad = {}

    def taylor_scores(self, kind: str) -> list[torch.Tensor]:
        """Mean ``|m ⊙ ∂L/∂m|`` per head (``kind="head_mask"``; ``"cross_head_mask"``: cross-attention heads) or FFN
        channel (``"ffn_mask"``), one tensor per layer that has such masks."""
        n = max(1.0, float(self.taylor_steps))
        return [(t / n).float() for name, t in self.taylor_sum.items() if name.rsplit(".", 1)[1] == kind]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The Taylor sums as tensors (for checkpoints in the middle of estimation); empty when not collected."""
        if not self.taylor_sum:
            return {}
        out = {f"{prefix}.taylor_sum.{n}": t for n, t in self.taylor_sum.items()}
        out[f"{prefix}.taylor_steps"] = self.taylor_steps
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [m.mask for m in self.head_masks + [c for c in self.cross_head_masks if c is not None] + self.ffn_masks]

    def l1(self) -> torch.Tensor:
        """Σ|m| over all masks."""
        return sum(m.abs().sum() for m in self.parameters())

    def head_scores(self) -> list[torch.Tensor]:
        return [m.mask.detach().float().cpu() for m in self.head_masks]

    def cross_head_scores(self) -> list[torch.Tensor]:
        """The cross-attention head masks' values, one tensor per block that has cross-attention."""
        return [m.mask.detach().float().cpu() for m in self.cross_head_masks if m is not None]

    def ffn_scores(self) -> list[torch.Tensor]:
        return [m.mask.detach().float().cpu() for m in self.ffn_masks]

    def detach(self) -> None:
        """Drop the masks (not folded into the weights)."""
        for h in self._hooks:
            h.remove()
        for layer in self._owners:
            delattr(layer, MASK_ATTR)
        self._hooks, self._owners, self.head_masks, self.ffn_masks, self.named = [], [], [], [], {}
        self.cross_head_masks = []
        self.taylor_sum, self._grad, self.active = {}, {}, False
