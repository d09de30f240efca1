"""Methods by family; importing this package registers them all."""

from .lowrank.dora import DoRA, DoRAConfig
from .lowrank.lora import LoRA, LoRAConfig
from .selective.full import Full, FullConfig

__all__ = ["DoRA", "DoRAConfig", "Full", "FullConfig", "LoRA", "LoRAConfig"]
