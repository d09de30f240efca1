"""Training: data loading, tasks, the single-device loop, checkpoints and LoRA+ optimizer groups."""

from .loop import Trainer, TrainResult
from .loraplus import loraplus_param_groups

__all__ = ["TrainResult", "Trainer", "loraplus_param_groups"]
