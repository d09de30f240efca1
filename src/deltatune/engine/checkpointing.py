"""Gradient checkpointing of an adapted model: each block's activations are recomputed in backward.

Hugging Face models get their own `activation_checkpointing_enable` (`gradient_checkpointing_enable` before
transformers 5), other models have each repeated block (a child of an nn.ModuleList) run under
`torch.utils.checkpoint`; both non-reentrant, so frozen inputs need no `requires_grad` and RNG states
(dropout, MonteCLoRA's noise) are replayed. A recompute runs in backward, after `dm(...)` has returned and
reset what it set on the layers for that call (mixed-batch routing, a token mask, `disabled()`), so
`context_fn` gives each recompute the layer state of its forward back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layer import DeltaLayer

CALL_STATE = ("enabled", "route", "token_mask")  # what DeltaModel sets on its layers for one call only
_MARK = "_deltatune_checkpointed"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (children of its ModuleLists: BERT's layers, Llama's decoder layers),
    outermost first, never inside an adapter."""
    inside_deltas = {id(m) for layer in model.modules() if isinstance(layer, DeltaLayer)
                     for m in layer.deltas.modules()}
    found: list[nn.Module] = []
    claimed: set[int] = set()
    for module in model.modules():
        if id(module) in claimed or id(module) in inside_deltas or not isinstance(module, nn.ModuleList):
            continue
        for child in module:
            if next(child.parameters(), None) is not None:
                found.append(child)
                claimed.update(id(m) for m in child.modules())
    return found


def replay_call_state(model: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """A checkpoint `context_fn`: nothing around the forward; around its recompute, every DeltaLayer of
    `model` set back to the per-call state it had in that forward."""
    def context_fn() -> tuple[Any, Any]:
        saved = [(layer, [getattr(layer, a) for a in CALL_STATE])
                 for layer in model.modules() if isinstance(layer, DeltaLayer)]
        return contextlib.nullcontext(), restored_call_state(saved)

    return context_fn


@contextlib.contextmanager
def restored_call_state(saved: list[tuple[DeltaLayer, list[Any]]]) -> Iterator[None]:
    """Each layer of `saved` set to its saved per-call state for the block, then back to what it had."""
    now = [[getattr(layer, a) for a in CALL_STATE] for layer, _ in saved]
    for layer, values in saved:
        for a, v in zip(CALL_STATE, values):
            setattr(layer, a, v)
    try:
        yield
    finally:
        for (layer, _), values in zip(saved, now):
            for a, v in zip(CALL_STATE, values):
                setattr(layer, a, v)


def enable_gradient_checkpointing(dm: nn.Module) -> None:
    """Checkpoint every block of `dm`'s model in training mode (a DeltaModel, or any module holding DeltaLayers)."""
    model = getattr(dm, "model", dm)
    options = {"use_reentrant": False, "context_fn": replay_call_state(model)}
    hf_enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if hf_enable is not None and getattr(model, "supports_gradient_checkpointing", False):
        hf_enable(options)  # positional: the keyword's name changed in transformers 5
        return
    found = blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to checkpoint (children of an "
                         "nn.ModuleList) and is not a Hugging Face model that supports gradient checkpointing: "
                         "turn train.gradient_checkpointing off, or wrap its blocks in torch.utils.checkpoint")
    for block in found:
        if not getattr(block, _MARK, False):
            block.forward = functools.partial(_checkpointed, block, block.forward, options)
            setattr(block, _MARK, True)


def _checkpointed(block: nn.Module, forward: Callable[..., Any], options: dict, *args: Any, **kwargs: Any) -> Any:
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, **options, **kwargs)
    return forward(*args, **kwargs)
