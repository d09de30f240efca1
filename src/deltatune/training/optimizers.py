"""The optimizers a recipe can name (`optimizer.name`): torch's AdamW and bitsandbytes' 8-bit and paged AdamW.

bitsandbytes' 8-bit AdamW (Dettmers et al., arXiv:2110.02861) stores both moments of every tensor of at
least 4,096 entries in 8 bits with blockwise scales (smaller tensors keep 32-bit moments, as in bitsandbytes'
default `min_8bit_size`), and has CPU kernels. Paged optimizers keep their state in CUDA unified memory that
pages out to the CPU under pressure; on a CPU they would silently run unpaged, so they are refused there.
Their state dicts hold tensors and plain values only, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import AdamW, Optimizer

# recipe name -> (bitsandbytes class, or None for torch's AdamW; needs CUDA)
KINDS: dict[str, tuple[str | None, bool]] = {
    "adamw": (None, False),
    "adamw_8bit": ("AdamW8bit", False),
    "paged_adamw": ("PagedAdamW", True),
    "paged_adamw_8bit": ("PagedAdamW8bit", True),
}


def usable_here(device: torch.device) -> list[str]:
    """The optimizer names that run on `device`."""
    return [name for name, (_, cuda) in KINDS.items() if not cuda or device.type == "cuda"]


def build_optimizer(name: str, params: Iterable[Any], device: torch.device, **options: Any) -> Optimizer:
    """Optimizer `name` over `params` (tensors or param groups) with AdamW's options (lr, betas, weight_decay)."""
    cls_name, cuda = KINDS[name]
    if cuda and device.type != "cuda":
        raise ValueError(f"optimizer.name={name} pages its state between GPU and CPU memory, so it needs a CUDA "
                         f"device, and this run is on {device.type}: use one of {', '.join(usable_here(device))}")
    if cls_name is None:
        return AdamW(params, **options)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"optimizer.name={name} needs bitsandbytes: pip install bitsandbytes, "
                         "or use optimizer.name=adamw") from None
    return getattr(bnb.optim, cls_name)(params, **options)


def moment_tensors(moments: dict) -> Iterable[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, shaped like its parameter) for one parameter's saved optimizer state.

    torch's AdamW keeps `exp_avg`/`exp_avg_sq` beside it; bitsandbytes nests its state in one dict: the
    moments `state1`/`state2` (8-bit codes or fp32 values, each the parameter's shape) and, for 8-bit
    state, the code books `qmap*` and block scales `absmax*`, which have shapes of their own.
    """
    for name, value in moments.items():
        if isinstance(value, dict):
            for inner, t in value.items():
                if isinstance(t, torch.Tensor):
                    yield f"{name}.{inner}", t, inner in ("state1", "state2")
        elif isinstance(value, torch.Tensor):
            yield name, value, value.dim() > 0


@torch.no_grad()
def remap_state(optimizer: Optimizer, stale: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Fit the optimizer state of parameters whose entries a delta moved (Delta.mark_stale): element i of each
    parameter-shaped moment takes old element source[i], or 0 where source[i] is -1 (a regrown entry starts
    fresh, as in SpIEL's code); source None drops the parameter's state, so it starts again at step 0.
    Blockwise 8-bit state (bitsandbytes) cannot move entries between blocks, so it is dropped whole."""
    for param, source in stale:
        state = optimizer.state.get(param)
        if not state:
            continue  # no step taken yet: nothing stale
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        elementwise = len(tensors) == len(state) and all(
            t.dim() == 0 or (t.shape == param.shape and t.is_floating_point()) for t in tensors)
        if source is None or not elementwise:
            del optimizer.state[param]
            continue
        fresh, take = source < 0, source.clamp(min=0)
        for t in tensors:
            if t.dim():  # AdamW's exp_avg / exp_avg_sq; its scalar step count stays
                flat = t.view(-1)
                flat.copy_(flat[take].masked_fill_(fresh, 0))
