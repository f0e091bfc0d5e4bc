"""One autograd function for a frozen linear layer and the trainable term a method adds to its output.

LoRA adds ``scale·(x Aᵀ) Bᵀ`` to a layer's output, S²FT adds ``x[..., idx] Dᵀ`` (or writes ``x Dᵀ`` into output
rows ``idx``). Computed as a layer plus a separate term, autograd keeps two branches that meet at ``x``: backward
computes ``x``'s gradient through ``W``, again through the term, and adds the two full-width results (for S²FT
the term's gradient is a full-width zero tensor with k columns filled in, before that sum). The functions here
compute the layer and the term together: the term goes into the layer's output in place, and its input gradient
goes into the base's input gradient in place (``addmm_`` / ``index_add_``), so no full-width temporary is made in
either direction. Only what the term's weight gradient needs is saved beside what the layer saves anyway.

:func:`override_forward` installs a method's forward on one layer (the module's class and name stay; removing the
handle restores the forward it had). The method's forward calls :func:`lora_linear` / :func:`slice_linear` when
:func:`can_fuse` says the fused path computes exactly what the layer would, and otherwise the layer's own forward
plus the term (a trainable base weight, dropout on the term's input, DoRA, mixed dtypes outside autocast, a
forward some other library installed first). Under autocast the fused functions run in the autocast dtype, as
the layer's own ``F.linear`` would: inputs and weights are cast to it, and the term's parameters get their
gradients back in their own dtype.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable

import torch
from torch import nn

from ..anatomy import is_conv1d

_FN = "_leantune_forward"  # on a module while a leantune forward is installed: the method's forward function
_PREVIOUS = "_leantune_previous_forward"  # an instance-level forward that was there before (another library's)


class ForwardHandle:
    """Undo :func:`override_forward` (same interface as a hook's handle)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        mod = self.module
        if _FN in mod.__dict__:
            previous = mod.__dict__.pop(_PREVIOUS, None)
            if previous is not None:
                mod.forward = previous
            else:
                del mod.forward
            del mod.__dict__[_FN]


def _dispatch(self: nn.Module, x, *args, **kwargs):
    """The installed forward, bound to the module: a copy of the module (``copy.deepcopy``) gets a forward bound to
    the copy, so it computes with the copy's own weights."""
    previous = self.__dict__.get(_PREVIOUS)
    base_forward = previous if previous is not None else type(self).forward.__get__(self)
    fusable = previous is None and not args and not kwargs and (type(self) is nn.Linear or is_conv1d(self))
    return self.__dict__[_FN](self, base_forward, fusable, x, *args, **kwargs)


def override_forward(module: nn.Module, forward: Callable) -> ForwardHandle:
    """Make ``module(x)`` call ``forward(module, base_forward, fusable, x, *args, **kwargs)``: ``base_forward`` is
    the forward the module had (its class's, or one another library installed), ``fusable`` whether the fused
    functions may stand in for it (a plain ``nn.Linear`` or ``Conv1D`` with its class's forward, one input).
    ``forward`` should be a module-level function, so that copies and pickles of the model refer to it."""
    if _FN in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already carries a leantune method's forward")
    previous = module.__dict__.get("forward")
    module.__dict__[_FN] = forward
    if previous is not None:
        module.__dict__[_PREVIOUS] = previous
    module.forward = types.MethodType(_dispatch, module)
    return ForwardHandle(module)


def can_fuse(module: nn.Module, x: torch.Tensor, *params: torch.Tensor) -> bool:
    """The fused functions compute exactly the layer plus the term: a plain frozen ``nn.Linear`` or GPT-2
    ``Conv1D``, one device, and one dtype for the input, the weights and the term's parameters (under autocast,
    floating-point ones: autocast casts them all to its dtype)."""
    w, b = module.weight, module.bias
    if w.requires_grad or (b is not None and b.requires_grad):
        return False
    tensors = (w, *params)
    if any(t.device != x.device for t in tensors):
        return False
    if _autocast_dtype(x) is not None:
        return all(t.is_floating_point() for t in (x, *tensors))
    return all(t.dtype == x.dtype for t in tensors)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _in_compute_dtype(x: torch.Tensor, *tensors):
    """Under autocast: everything cast to autocast's dtype (what F.linear does), and autocast off for the call."""
    dt = _autocast_dtype(x)
    if dt is None:
        return contextlib.nullcontext(), (x, *tensors)
    cast = tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in (x, *tensors))
    return torch.autocast(x.device.type, enabled=False), cast


def _base_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the weight as an (in, out) matrix, bias): ``x @ wt + bias`` is the layer."""
    w = module.weight
    return (w if is_conv1d(module) else w.t()), module.bias


def _base(x2: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, x2, wt) if bias is not None else x2 @ wt


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wt, bias, a_w, b_w, scale):
        x2 = x.reshape(-1, x.shape[-1])
        a = x2 @ a_w.t()  # (tokens, r)
        y = _base(x2, wt, bias)
        y.addmm_(a, b_w.t(), alpha=scale)
        ctx.save_for_backward(x2, a, wt, a_w, b_w)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, a, wt, a_w, b_w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = ga = gb = None
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if need_x or need_a:
            gh = (g2 @ b_w).mul_(ctx.scale)  # (tokens, r): the gradient at x Aᵀ
            if need_x:
                gx = (g2 @ wt.t()).addmm_(gh, a_w).view(ctx.x_shape)
            if need_a:
                ga = gh.t() @ x2
        if need_b:
            gb = (g2.t() @ a).mul_(ctx.scale)
        return gx, None, None, ga, gb, None


def lora_linear(module: nn.Module, x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor, scale: float):
    """``module(x) + scale·(x Aᵀ) Bᵀ``, fused (check :func:`can_fuse` first)."""
    wt, bias = _base_parts(module)
    ctx, (x, wt, bias, a_w, b_w) = _in_compute_dtype(x, wt, bias, a_w, b_w)
    with ctx:
        return _LoraLinear.apply(x, wt, bias, a_w, b_w, scale)


class _SliceLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wt, bias, delta, idx, side):
        x2 = x.reshape(-1, x.shape[-1])
        y = _base(x2, wt, bias)
        if side == "in":
            xs = x2.index_select(1, idx)  # a copy of the k columns: all D's gradient needs
            y.addmm_(xs, delta.t())
            ctx.save_for_backward(xs, wt, delta)
        else:
            y.index_add_(1, idx, x2 @ delta.t())
            ctx.save_for_backward(x2, wt, delta)
        ctx.idx, ctx.side, ctx.x_shape = idx, side, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        saved, wt, delta = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        idx = ctx.idx
        gx = gd = None
        if ctx.side == "in":  # y += x[:, idx] Dᵀ
            if ctx.needs_input_grad[0]:
                gx = (g2 @ wt.t()).index_add_(1, idx, g2 @ delta).view(ctx.x_shape)
            if ctx.needs_input_grad[3]:
                gd = g2.t() @ saved
        else:  # y[:, idx] += x Dᵀ
            gs = g2.index_select(1, idx)
            if ctx.needs_input_grad[0]:
                gx = (g2 @ wt.t()).addmm_(gs, delta).view(ctx.x_shape)
            if ctx.needs_input_grad[3]:
                gd = gs.t() @ saved
        return gx, None, None, gd, None, None


def slice_linear(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor, side: str):
    """``module(x)`` plus S²FT's block: ``x[..., idx] Dᵀ`` (side "in") or ``x Dᵀ`` into rows ``idx`` ("out")."""
    wt, bias = _base_parts(module)
    ctx, (x, wt, bias, delta) = _in_compute_dtype(x, wt, bias, delta)
    with ctx:
        return _SliceLinear.apply(x, wt, bias, delta, idx, side)
