"""The training loop, its schedule hooks and checkpoints."""

from .hooks import TrainContext, TrainHook
from .loop import NonFiniteLossError, TrainConfig, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainContext", "TrainHook", "TrainResult", "train"]
