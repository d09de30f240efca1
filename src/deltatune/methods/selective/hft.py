"""HFT, half fine-tuning (Hui et al., 2024): in each round half of the parameter matrices train, half stay frozen.

The units are whole parameter tensors (the paper freezes half of each layer's matrices "at the category level",
redrawn per training stage). Here each transformer block (a module path's first numbered component, such as
`encoder.layer.3`; everything outside numbered blocks is one group) trains a seeded random half of its target
tensors, redrawn every `round_steps` steps: ⌊n/2⌋ or ⌈n/2⌉ of an odd n, alternating by round, so exactly half
when n is even. The draw is a function of (seed, round, names), so a resumed run trains the same halves.

Each target tensor is a dense selection (index None, the whole update ΔW). A resting tensor's update is used
detached, so it gets no gradient: the optimizer (AdamW skips a parameter without one) neither moves it nor
decays it, and its moments stay as they were. When it trains again in a later round its optimizer state is
stale (from an older round), so the delta marks it (Delta.mark_stale) and the trainer resets it: each round's
half starts Adam afresh, as a new training stage would. All updates are saved and merged; they are ΔW, so
merge == unmerged is exact and a save holds every tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta, _key, chosen_names


class HFTConfig(SelectionConfig):
    round_steps: int = Field(100, ge=1, description="steps per round: the trained half is redrawn at each round")
    seed: int = Field(0, description="the halves' draw")

    def default_parameter_targets(self) -> Any:
        return ["re:.*\\.weight"]


def block_of(path: str) -> str:
    """The transformer block a module belongs to: its path up to the first numbered component ('' if none)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


class HalfPlan(nn.Module):
    """Which target tensors train in each round, for one adapter (no tensors: nothing is saved)."""

    def __init__(self, units: Sequence[str], seed: int):
        super().__init__()
        self.seed = seed
        self.groups: dict[str, list[str]] = {}
        for unit in sorted(units):
            self.groups.setdefault(block_of(unit.rsplit(".", 1)[0]), []).append(unit)
        self._cache: dict[int, frozenset[str]] = {}

    def trained(self, rnd: int) -> frozenset[str]:
        """The units ('path.name') that train in round `rnd`."""
        if rnd not in self._cache:
            chosen = []
            for g, (group, units) in enumerate(sorted(self.groups.items())):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd * 7919 + zlib.crc32(group.encode()))
                count = len(units) // 2 + (len(units) % 2 if (rnd + g) % 2 == 0 else 0)
                chosen += [units[i] for i in torch.randperm(len(units), generator=gen)[:count].tolist()]
            self._cache = {rnd: frozenset(chosen)}  # rounds only move forward; one is enough
        return self._cache[rnd]


@register("hft", config=HFTConfig, family="selective", formula="the target tensors (half train per round)",
          paper="2404.18466", summary="half of each block's matrices train, redrawn every round")
class HFT(SelectionDelta):
    @classmethod
    def build_shared(cls, config: HFTConfig, layers: Sequence[DeltaLayer]) -> nn.Module:
        return HalfPlan([f"{layer.path}.{n}" for layer in layers for n in chosen_names(config, layer)], config.seed)

    def __init__(self, config: HFTConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, initialize, shared=shared)
        self.unit_prefix = layer.path
        self.round = 0

    def trains(self, name: str, rnd: int | None = None) -> bool:
        """Whether parameter `name` trains in round `rnd` (default: the current one)."""
        return f"{self.unit_prefix}.{name}" in self.shared.trained(self.round if rnd is None else rnd)

    def on_step(self, step: int) -> None:
        self.round = step // self.config.round_steps
        if step % self.config.round_steps == 0 and self.round > 0:  # a round begins (a resume mid-round resets nothing)
            for n in self.names:
                if self.trains(n) and not self.trains(n, self.round - 1):
                    self.mark_stale(self.values[_key(n)])  # its moments are from an older round

    def value(self, name: str) -> Tensor:
        v = self.values[_key(name)]
        return v if self.trains(name) else v.detach()

    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        return None

