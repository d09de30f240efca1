"""Helpers for the low-rank methods whose layers share adapter-wide state (VB-LoRA, MoS, CapaBoost, SORSA...)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...engine.layer import DeltaLayer


class LayerShared(nn.Module):
    """An adapter's shared tensors plus each target layer's position among the adapter's layers.

    The engine builds the shared module from the resolved target layers in model order, both at
    injection and at load, so a layer's position is a stable key for per-layer random draws
    (seeded masks, shard indices) without saving them.
    """

    def __init__(self, layers: Sequence[DeltaLayer]):
        super().__init__()
        self.__dict__["_position"] = {id(layer): i for i, layer in enumerate(layers)}  # not state

    def position(self, layer: DeltaLayer) -> int:
        return self._position[id(layer)]

    @property
    def layer_count(self) -> int:
        """How many layers the adapter has (for losses that are a mean over its layers)."""
        return len(self._position)


def generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for draw `stream` of adapter seed `seed` (distinct streams for distinct layers)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)
