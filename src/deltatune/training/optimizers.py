"""The optimizers a recipe can name (`optimizer.name`): torch's AdamW, bitsandbytes' 8-bit and paged AdamW, and
the memory-lean ones: GaLore (training/galore.py), MeZO (training/mezo.py), LoRA-FA and transformers' Adafactor.

bitsandbytes' 8-bit AdamW (Dettmers et al., arXiv:2110.02861) stores both moments of every tensor of at
least 4,096 entries in 8 bits with blockwise scales (smaller tensors keep 32-bit moments, as in bitsandbytes'
default `min_8bit_size`), and has CPU kernels. Paged optimizers keep their state in CUDA unified memory that
pages out to the CPU under pressure; on a CPU they would silently run unpaged, so they are refused there.
Their state dicts hold tensors and plain values only, so checkpoints load with `torch.load(weights_only=True)`.

LoRA-FA (Zhang et al., arXiv:2308.03303) keeps every LoRA A matrix frozen at its random init and trains B (with
AdamW): no gradient or moments for A, and the fused LoRA path (engine/fused.py) then keeps only the thin
h = x A^T for B's gradient instead of the layer input x. That input is freed only where nothing else holds it
(a frozen base layer's own backward does not need it; a norm or activation before it may keep it anyway).
Adafactor (Shazeer & Stern, arXiv:1804.04235) is transformers' implementation, run at the recipe's learning
rate and schedule (relative_step off): factored second moments, m + n numbers per m x n matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import AdamW, Optimizer

from .galore import PROJECTED, GaLoreAdamW
from .mezo import MeZO

# recipe name -> (bitsandbytes class, or None for one built here; needs CUDA)
KINDS: dict[str, tuple[str | None, bool]] = {
    "adamw": (None, False),
    "galore": (None, False),
    "mezo": (None, False),
    "lora_fa": (None, False),
    "adafactor": (None, False),
    "adamw_8bit": ("AdamW8bit", False),
    "paged_adamw": ("PagedAdamW", True),
    "paged_adamw_8bit": ("PagedAdamW8bit", True),
}


def usable_here(device: torch.device) -> list[str]:
    """The optimizer names that run on `device`."""
    return [name for name, (_, cuda) in KINDS.items() if not cuda or device.type == "cuda"]


LORA_A = "lora_A"  # the engine's name for LoRA's A (r x d_in), which LoRA-FA freezes


def freeze_lora_a(model: nn.Module) -> int:
    """LoRA-FA: stop training every `lora_A` of `model` (it keeps its random init); returns how many it froze."""
    frozen = [p for name, p in model.named_parameters() if p.requires_grad and LORA_A in name.split(".")]
    if not frozen:
        raise ValueError(f"optimizer.name=lora_fa freezes LoRA's A matrices and trains B, and this model has no "
                         f"trainable {LORA_A!r} parameters: use a LoRA-family method (lora, dora, ...), or "
                         "optimizer.name=adamw")
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def build_optimizer(name: str, params: Iterable[Any], device: torch.device, extra: dict | None = None,
                    **options: Any) -> Optimizer:
    """Optimizer `name` over `params` (tensors or param groups) with AdamW's options (lr, betas, weight_decay);
    `extra` holds the options of galore / mezo / adafactor (their recipe sections)."""
    cls_name, cuda = KINDS[name]
    extra = extra or {}
    if cuda and device.type != "cuda":
        raise ValueError(f"optimizer.name={name} pages its state between GPU and CPU memory, so it needs a CUDA "
                         f"device, and this run is on {device.type}: use one of "
                         f"{', '.join(n for n in usable_here(device) if 'adamw' in n)}")  # its unpaged kin
    if name == "galore":
        return GaLoreAdamW(params, **options, **extra)
    if name == "mezo":
        return MeZO(params, lr=options["lr"], weight_decay=options.get("weight_decay", 0.0), **extra)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # the recipe's lr and schedule drive it: relative_step (Adafactor's own schedule) off
        return Adafactor(params, lr=options["lr"], weight_decay=options.get("weight_decay", 0.0),
                         relative_step=False, warmup_init=False, **{"scale_parameter": False, **extra})
    if cls_name is None:  # adamw, and lora_fa once its A matrices are frozen
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
    state, the code books `qmap*` and block scales `absmax*`, which have shapes of their own. GaLore's
    projection and projected moments, and Adafactor's factored row/column moments, are smaller than it.
    """
    for name, value in moments.items():
        if isinstance(value, dict):
            for inner, t in value.items():
                if isinstance(t, torch.Tensor):
                    yield f"{name}.{inner}", t, inner in ("state1", "state2")
        elif isinstance(value, torch.Tensor):
            yield name, value, value.dim() > 0 and name not in PROJECTED and not name.endswith(("_row", "_col"))


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
