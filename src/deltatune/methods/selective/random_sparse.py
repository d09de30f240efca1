"""Random-subset sparse fine-tuning (the arbitrary-parameters baseline of Su et al., 2023): train k = density·n
entries of each chosen parameter, drawn uniformly at random from a seed and the parameter's name."""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta


class RandomSparseConfig(SelectionConfig):
    density: float = Field(0.01, gt=0, le=1, description="fraction of each chosen parameter's entries to train")
    seed: int = Field(0, description="the draw's seed (with each parameter's name, so layers differ)")

    def default_parameter_targets(self) -> Any:
        return ["re:.*\\.(weight)"]


def entry_count(numel: int, density: float) -> int:
    """k = ceil(density · n), at least 1: the number of entries a density keeps."""
    return max(1, min(numel, math.ceil(density * numel)))


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one parameter's draw: the same seed and name give the same entries on any machine."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@register("random_sparse", config=RandomSparseConfig, family="selective", formula="ceil(density · d_out d_in)",
          paper="2306.02320", summary="a random subset of entries, ΔW = M ⊙ V")
class RandomSparse(SelectionDelta):
    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        k = entry_count(param.numel(), self.config.density)
        if k == param.numel():
            return None
        gen = seeded_generator(self.config.seed, f"{layer.path}.{name}")
        return torch.randperm(param.numel(), generator=gen)[:k]
