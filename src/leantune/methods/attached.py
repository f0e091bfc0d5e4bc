"""The attached-module base: methods whose fine-tune lives in child modules of the base's layers.

LoRA, S²FT, the bottleneck adapters, Compacter, KronA and (IA)³ all do the same three things: find layers by
role or placement point (``anatomy``), give each a child module that holds the trainable tensors, and install a
forward on that layer that computes with the child (``methods/fused.py: override_forward``; the layer's class and
name stay). :class:`AttachedMethod` does the bookkeeping once — attach, detach one layer, unload all, remove,
the trainable parameters and the state by module name — so a method of this kind is one file that says where its
module sits and what it computes.

Children are reached by ``getattr(layer, method.child_name)``. Parameters shared by several children (Compacter's
slow weights) are submodules of each child; they are yielded, counted and saved once, under the first child's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import nn

from ..anatomy import Anatomy, anatomy
from . import fused
from .base import Method


class AttachedMethod(Method):
    """Subclasses set ``child_name`` and call :meth:`attach` from ``_apply``."""

    child_name: ClassVar[str] = ""

    def _start(self) -> None:
        self.layers: dict[str, nn.Module] = {}  # qualified layer name -> the base layer that carries a child
        self._handles: dict[str, list] = {}  # layer name -> what to undo when it is detached

    def required_points(self) -> tuple[str, ...]:
        """The anatomy placement points this method's modules sit at (none for methods that target roles)."""
        return ()

    def apply(self, model: nn.Module, anat: Anatomy | None = None) -> AttachedMethod:
        """Refuse a family without one of :meth:`required_points` (or with a layout they cannot read) before
        the model is touched, then apply."""
        anat = anat or anatomy(model)
        self.require_points(anat, self.required_points())
        return super().apply(model, anat)

    def require_points(self, anat, points) -> None:
        """Raise PlacementError (saying what to do) unless every point is defined and readable in this model."""
        for point in points:
            anat.placements(point)

    # -- attach / detach ----------------------------------------------------------------------------------
    def attach(self, name: str, layer: nn.Module, child: nn.Module, forward: Callable | None = None) -> nn.Module:
        """Give ``layer`` (qualified name ``name``) the child module and, when given, the forward
        ``forward(layer, base_forward, fusable, x, *args, **kwargs)`` (see ``fused.override_forward``)."""
        if not hasattr(self, "layers"):
            self._start()
        if name in self.layers:
            raise RuntimeError(f"{self.name}: {name} already carries this method's module")
        layer.add_module(self.child_name, child)
        self.layers[name] = layer
        self._handles[name] = [fused.override_forward(layer, forward)] if forward is not None else []
        return child

    def add_handle(self, name: str, handle) -> None:
        """Something more to undo when ``name`` is detached (a hook on a neighbouring layer: ``handle.remove()``)."""
        self._handles[name].append(handle)

    def detach(self, name: str) -> None:
        """Take one layer's child and forward off (the layer's weights stay as they are)."""
        layer = self.layers.pop(name)
        for h in self._handles.pop(name):
            h.remove()
        delattr(layer, self.child_name)

    def child(self, name: str) -> nn.Module:
        return getattr(self.layers[name], self.child_name)

    def children(self) -> Iterator[tuple[str, nn.Module, nn.Module]]:
        """(layer name, layer, child) for every attached layer."""
        for name, layer in self.layers.items():
            yield name, layer, getattr(layer, self.child_name)

    def unload(self) -> nn.Module:
        """Take every child and forward off, keeping the weights as they are (merged by ``merge_and_unload``)."""
        self._model()  # raises unless applied
        for name in list(self.layers):
            self.detach(name)
        return self._release()

    def remove(self) -> nn.Module:
        """Take the method off (unmerging first if merged): the base back, bitwise where ``restores_base``."""
        if self.merged:
            self.unmerge()
        return self.unload()

    # -- Light-PEFT's pruning interface, the parts every attached method shares ----------------------------------
    # A prunable method (capabilities.prunable) adds: ``prune_defaults`` (the options Light-PEFT wraps it with),
    # ``prune_units()`` ({name: prune.importance.AdapterUnit}), ``prune_widths()`` ({name: rank or bottleneck width}),
    # ``keep_widths(name, idx)``, ``follow_slice(layer, side, idx)`` and, where mergeable, ``merged_weights()``.
    prune_defaults: ClassVar[dict] = {}

    def drop_modules(self, names) -> None:
        """Take these layers' modules off (Light-PEFT's module pruning)."""
        for name in names:
            self.detach(name)

    def adapter_prefixes(self) -> list[str]:
        """State-dict prefixes of the method's own modules (left out of a merged export)."""
        return [f"{n}.{self.child_name}." for n in self.layers]

    # -- what trains, the state -------------------------------------------------------------------------------
    def _named_child_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen = set()
        for name, _layer, child in self.children():
            for pname, p in child.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{name}.{self.child_name}.{pname}", p

    def trainable_parameters(self):
        yield from self._named_child_parameters()

    def state(self) -> dict[str, torch.Tensor]:
        """Every child's parameters by ``<layer name>.<child name>.<parameter>`` (shared ones once)."""
        return {n: p.data for n, p in self._named_child_parameters()}


# -- the precision policy for a term computed beside a frozen layer (precision.py) -------------------------------


def term_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The input of a method's term beside a frozen layer. Outside autocast: cast to the term's (float32) parameters'
    dtype, the term computed in it, and the caller casts the result back to the layer output's dtype. Under
    autocast: the input as it comes, so autocast runs the term's products in its dtype (as LoRA's and S²FT's terms
    do, and PEFT's and AdapterHub's) and backward keeps the input itself rather than a float32 copy of it
    (elementwise products with the float32 parameters still promote to float32, exactly)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)

