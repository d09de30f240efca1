"""Methods by family; importing this package registers them all."""

from .lowrank.dora import DoRA, DoRAConfig
from .lowrank.lora import LoRA, LoRAConfig
from .lowrank.masked_lora import MaskedLoRA, MaskedLoRAConfig  # noqa: F401
from .selective.full import Full, FullConfig

__all__ = ["DoRA", "DoRAConfig", "Full", "FullConfig", "LoRA", "LoRAConfig"]
