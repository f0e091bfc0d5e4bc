"""The training loop and checkpoints (the schedule-hook protocol is `leantune.hooks`, on the ground floor)."""

from ..hooks import TrainContext, TrainHook
from .loop import NonFiniteLossError, TrainConfig, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainContext", "TrainHook", "TrainResult", "train"]
