"""FLOPs of a training step, counted with ``torch.utils.flop_counter.FlopCounterMode``.

The counter knows matrix products and attention kernels (a multiply-add counts 2); elementwise work (norms,
activations, the optimizer update) is not counted. PyTorch 2.x has no formula for the CPU flash-attention kernel
that ``scaled_dot_product_attention`` picks on the CPU, so it is registered here with the same formula as the GPU
flash kernel: without it, attention would silently count zero on the CPU and differently on a GPU. The in-place
``addmm_`` (LoRA's forward adds its product into the base output with it) has no formula either and gets
``addmm``'s: the same products, counted the same wherever they are written.
"""

from __future__ import annotations

import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

_aten = torch.ops.aten


def _register_cpu_attention() -> None:
    pairs = [
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
    ]
    for cpu_name, gpu_name in pairs:
        if hasattr(_aten, cpu_name) and hasattr(_aten, gpu_name):
            cpu_op, gpu_op = getattr(_aten, cpu_name), getattr(_aten, gpu_name)
            if cpu_op not in flop_registry and gpu_op in flop_registry:
                flop_registry[cpu_op] = flop_registry[gpu_op]


_register_cpu_attention()


def _register_inplace_addmm() -> None:
    if _aten.addmm_ not in flop_registry and _aten.addmm in flop_registry:
        flop_registry[_aten.addmm_] = flop_registry[_aten.addmm]


_register_inplace_addmm()


def _register_bitsandbytes() -> None:
    """A 4-bit base's forward product is bitsandbytes' own op (``gemm_4bit``), which FlopCounterMode does not
    know: 2·tokens·out·in, as for the matmul it stands for (its backward is an aten mm, counted already)."""
    if "bitsandbytes" not in sys.modules:
        return
    packet = getattr(torch.ops.bitsandbytes, "gemm_4bit", None)
    if packet is None or packet in flop_registry:
        return

    @register_flop_formula(packet)
    def _gemm_4bit(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
        out_f, in_f = shape_b
        return 2 * math.prod(a_shape[:-1]) * out_f * in_f


class FlopCount:
    """``with FlopCount() as fc: ...`` then ``fc.total`` and ``fc.by_op`` (op name -> FLOPs)."""

    def __init__(self):
        _register_bitsandbytes()
        self._mode = FlopCounterMode(display=False)

    def __enter__(self) -> FlopCount:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return int(self._mode.get_total_flops())

    @property
    def by_op(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._mode.get_flop_counts().get("Global", {}).items()}
