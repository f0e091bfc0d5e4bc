"""Measuring fine-tuning honestly: memory (counted), FLOPs (counted), time (interleaved medians), and the
head-to-head bench (``leantune bench``) built on them."""

from .effmodel import EfficiencyModel
from .flops import FlopCount
from .memory import SavedTensorMeter, grad_bytes, optimizer_bytes, peak_bytes, tensor_bytes, weight_bytes
from .step import Stepper

__all__ = [
    "EfficiencyModel",
    "FlopCount",
    "SavedTensorMeter",
    "Stepper",
    "grad_bytes",
    "optimizer_bytes",
    "peak_bytes",
    "tensor_bytes",
    "weight_bytes",
]
