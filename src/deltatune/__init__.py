"""deltatune: adapt pretrained PyTorch models through small, declared deltas."""

__version__ = "0.1.0"

from .engine import (  # noqa: E402
    BASE,
    Average,
    BatchSplit,
    DeltaConfig,
    DeltaModel,
    Fuse,
    Parallel,
    Split,
    Stack,
    enable_gradient_checkpointing,
    get_method,
    inject,
    list_methods,
    load,
    load_adapterhub,
    load_adapters,
    load_peft,
    make_config,
    register,
)
from .engine.quantized import dequantize, quantize  # noqa: E402
from .methods import DoRAConfig, FullConfig, LoRAConfig  # noqa: E402
from .methods.selective.fish_mask import fisher_scores  # noqa: E402

__all__ = ["BASE", "Average", "BatchSplit", "Fuse", "Parallel", "Split", "Stack", "DeltaConfig", "DeltaModel", "DoRAConfig", "FullConfig", "LoRAConfig", "__version__",
           "dequantize", "enable_gradient_checkpointing", "fisher_scores", "get_method", "inject", "list_methods", "load", "load_adapterhub",
           "load_adapters", "load_peft", "make_config", "quantize", "register"]
