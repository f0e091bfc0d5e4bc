"""The precision policy, in one place.

The frozen base stays in the dtype it was loaded in (that is the memory saving). Everything the optimizer updates
is float32:

* tensors a method creates (LoRA's A and B, S²FT's blocks, Light-PEFT's masks, ...) are made in float32
  (:func:`trainable_dtype`; float64 beside a float64 base), whatever the base's dtype; outside autocast their term
  is computed from the input cast to the tensor's dtype and cast back to the layer's output dtype; under autocast
  the input goes in as it is and autocast runs the term's products in its dtype (LoRA's and S²FT's fused terms,
  ``attached.term_input`` for the others), so backward keeps the activation, not a float32 copy of it;
* base tensors that a method trains in place (full fine-tuning, LISA, BitFit, LN tuning) keep their low-precision
  storage, and :class:`MasterWeights` gives each a float32 *master copy*: the optimizer updates the master, whose
  value is written back, rounded, into the model after every step. The adapter folder stores the masters, so
  nothing is rounded until the weights are merged (rounded once) or a LISA block leaves the active set (its
  master is freed, and its value is what the model holds).

A master costs 4 bytes per trained base entry (LISA: for the active blocks only), on top of the 2-byte weight; the
alternative, upcasting the trained tensors in place, breaks every layer whose input arrives in the base's dtype
outside autocast.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

TRAIN_DTYPE = torch.float32  # what every tensor the optimizer updates is stored in
LOW_PRECISION = (torch.bfloat16, torch.float16)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def base_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``--base-dtype``: ``auto`` (or None) keeps the checkpoint's dtype; ``fp32``/``bf16``/``fp16`` cast to it."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key == "auto":
        return None
    if key not in DTYPES:
        raise ValueError(f"base dtype {name!r} is not one of {', '.join(BASE_DTYPES)}")
    return DTYPES[key]


def trainable_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype of a tensor a method creates beside ``like`` (a base weight): float32, or float64 on a float64
    base (a test's reference model), never the base's bf16/fp16 (or a quantized storage type)."""
    return like.dtype if like.dtype in (torch.float32, torch.float64) else TRAIN_DTYPE


def is_low_precision(t: torch.Tensor) -> bool:
    return t.dtype in LOW_PRECISION


class MasterWeights:
    """float32 master copies of the low-precision base parameters a method trains in place.

    Off until a training loop enables it (``enable``): a model only loaded for inference keeps no copies. While
    on, :meth:`optimizer_params` hands the optimizer the masters instead of the low-precision parameters,
    :meth:`grads_to_masters` moves each step's gradients over (after the last micro-batch), and
    :meth:`write_back` copies the updated masters into the model (rounded)."""

    def __init__(self) -> None:
        self.enabled = False
        self._masters: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(param) -> (param, master)

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        """Free every master (the model keeps the rounded values)."""
        self.enabled = False
        self._masters.clear()

    def __len__(self) -> int:
        return len(self._masters)

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for _, m in self._masters.values())

    def _master(self, p: torch.Tensor, value: torch.Tensor | None = None) -> nn.Parameter:
        entry = self._masters.get(id(p))
        if entry is None:
            source = p if value is None else value
            master = nn.Parameter(source.detach().to(dtype=TRAIN_DTYPE, device=p.device, copy=True))
            self._masters[id(p)] = (p, master)
            return master
        master = entry[1]
        if value is not None:
            with torch.no_grad():
                master.copy_(value.to(master.dtype))
        return master

    def optimizer_params(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The tensors the optimizer should update for these trainable parameters: a master for each
        low-precision one (the same master across rebuilds, so its optimizer state carries over), the parameter
        itself otherwise. Masters of parameters that no longer train are freed."""
        if not self.enabled:
            return list(named)
        out, keep = [], set()
        for name, p in named:
            if is_low_precision(p):
                keep.add(id(p))
                out.append((name, self._master(p)))
            else:
                out.append((name, p))
        for key in [k for k in self._masters if k not in keep]:
            del self._masters[key]
        return out

    def rebind(self, mapping: dict[int, nn.Parameter]) -> None:
        """Parameters were replaced by new objects (``id(old) -> new``): their masters follow them."""
        moved = {}
        for key, (p, master) in self._masters.items():
            new = mapping.get(key, p)
            moved[id(new)] = (new, master)
        self._masters = moved

    def value(self, p: torch.Tensor) -> torch.Tensor:
        """What the parameter really holds: its master when it has one (what an adapter file stores)."""
        entry = self._masters.get(id(p))
        return entry[1].detach() if entry is not None else p.detach()

    @torch.no_grad()
    def assign(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Set a parameter to a saved value: the model gets it rounded to its dtype, and the master (kept when
        training is on, so a resumed run continues from the exact value) gets it whole."""
        p.copy_(value.to(p.dtype))
        if self.enabled and is_low_precision(p):
            self._master(p, value)

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """After backward: each master takes its parameter's gradient in float32; the low-precision one is freed."""
        for p, master in self._masters.values():
            master.grad = None if p.grad is None else p.grad.to(master.dtype)
            p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """After the optimizer step: the model's parameters take their masters' values, rounded."""
        for p, master in self._masters.values():
            p.copy_(master)
