"""SpIEL (Ansell et al., 2024): sparse fine-tuning whose chosen entries move, by drop and regrowth.

Each chosen parameter keeps k = ceil(density · n) entries (index + values, ΔW = scatter(index, values)). Every
`update_every` steps, as in the official code's "rigl" selection (AlanAnsell/peft):

- drop the m = int(fraction · k) entries with the smallest |Δ| (the deltas that moved least from W0);
- regrow m entries outside the remaining ones, with the largest |Σ g| of the dense gradient summed over the
  `accumulate` steps just before the update (an entry dropped and regrown at once keeps its value);
- new entries start at Δ = 0 and with fresh optimizer moments; kept entries keep theirs (Delta.mark_stale says
  where each one moved, since the index stays sorted); the count k never changes.

`fraction` decays linearly to 0 over `decay_steps` when given (the code's initial_reselection_rate · (1 - t/T)).
Two differences from that code: the first entries are a seeded random draw (it re-chooses all of them by
gradient after the first window), and regrown entries start with zero moments (it seeds them with the window's
mean gradient and squared gradient, which its own AdamW variant ages per entry).

The dense gradient is exact and costs only in those steps: the update is run dense there with a zero tensor
added whose gradient is the whole parameter's (a hook sums it), so ordinary steps stay sparse. The summed
gradient is not checkpointed: a run resumed inside an accumulation window regrows from fewer steps.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta, _key
from .random_sparse import entry_count, seeded_generator


class SpIELConfig(SelectionConfig):
    density: float = Field(0.01, gt=0, le=1, description="fraction of each chosen parameter's entries to train")
    update_every: int = Field(20, ge=1, description="steps between drop-and-regrow updates")
    accumulate: int = Field(5, ge=1, description="steps before each update whose dense gradients are summed")
    fraction: float = Field(0.2, ge=0, le=1, description="share of the entries dropped and regrown per update")
    decay_steps: int | None = Field(None, ge=1, description="fraction decays linearly to 0 by this step; None: "
                                    "constant")
    seed: int = Field(0, description="the initial entries' draw (with each parameter's name)")

    def default_parameter_targets(self) -> Any:
        return ["re:.*\\.(weight)"]

    @model_validator(mode="after")
    def _window_fits(self) -> SpIELConfig:
        if self.accumulate > self.update_every:
            raise ValueError(f"spiel accumulate={self.accumulate} exceeds update_every={self.update_every}: the "
                             "gradients are summed over steps between two updates; use accumulate <= update_every")
        return self


@register("spiel", config=SpIELConfig, family="selective", formula="ceil(density · d_out d_in)",
          paper="2401.16405", summary="sparse entries that move: drop smallest |Δ|, regrow largest |Σ grad|")
class SpIEL(SelectionDelta):
    def __init__(self, config: SpIELConfig, layer: DeltaLayer, initialize: bool = True, shared: Any = None):
        super().__init__(config, layer, initialize, shared=shared)
        self.__dict__["_grad_sums"] = {}  # parameter name -> summed dense gradient, only inside a window
        self.capturing = False

    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        k = entry_count(param.numel(), self.config.density)
        gen = seeded_generator(self.config.seed, f"{layer.path}.{name}")
        return torch.randperm(param.numel(), generator=gen)[:k]  # always an index, even at density 1: it moves

    # --- the schedule ------------------------------------------------------------------------
    def fraction_at(self, step: int) -> float:
        c = self.config
        return c.fraction if c.decay_steps is None else c.fraction * max(0.0, 1.0 - step / c.decay_steps)

    def on_step(self, step: int) -> None:
        every = self.config.update_every
        if step > 0 and step % every == 0 and self._sums:
            self.regrow(step)
        self.capturing = step % every >= every - self.config.accumulate
        if not self.capturing:
            self._sums.clear()

    @property
    def _sums(self) -> dict[str, Tensor]:
        return self.__dict__["_grad_sums"]

    # --- dense gradients in the window -------------------------------------------------------
    def dense(self, layer: DeltaLayer, name: str) -> Tensor:
        d = super().dense(layer, name)
        if self.capturing and torch.is_grad_enabled() and self.value(name).requires_grad:
            probe = torch.zeros_like(d, requires_grad=True)  # d + 0: its gradient is the parameter's
            probe.register_hook(partial(self._add_gradient, name))
            d = d + probe
        return d

    def _add_gradient(self, name: str, grad: Tensor) -> None:
        flat = grad.detach().reshape(-1).float()
        if name in self._sums:
            self._sums[name] += flat
        else:
            self._sums[name] = flat.clone()

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        if self.capturing and torch.is_grad_enabled():
            return Delta.change(self, layer, x)  # dense ΔW (with the probe), not the sparse gather
        return super().change(layer, x)

    # --- drop and regrow ---------------------------------------------------------------------
    @torch.no_grad()
    def regrow(self, step: int) -> None:
        for name in self.names:
            if name in self._sums:
                self.move(name, self._sums[name], self.fraction_at(step))
        self._sums.clear()

    @torch.no_grad()
    def move(self, name: str, scores: Tensor, fraction: float) -> None:
        """Drop the int(fraction · k) entries of smallest |Δ| and regrow as many by largest |scores| among the
        entries not kept (ties: the lower position first); mark the optimizer state that moved."""
        idx, v = self.index(name), self.value(name)
        k = idx.numel()
        m = int(fraction * k)  # the candidates outside the kept k - m are at least m
        if m == 0:
            return
        order = torch.sort(v.detach().abs(), stable=True).indices  # smallest |Δ| first
        dropped = order[:m]
        kept = torch.ones(k, dtype=torch.bool, device=idx.device)
        kept[dropped] = False
        taken = torch.zeros(scores.numel(), dtype=torch.bool, device=idx.device)
        taken[idx[kept]] = True
        candidates = torch.nonzero(~taken).squeeze(1)
        best = torch.sort(scores.abs()[candidates], descending=True, stable=True).indices[:m]
        grown = candidates[best]
        # a dropped entry regrown at once keeps its value and moments
        was = torch.full((scores.numel(),), -1, dtype=torch.long, device=idx.device)
        was[idx] = torch.arange(k, device=idx.device)
        revived = was[grown] >= 0
        kept[was[grown[revived]]] = True
        new = grown[~revived]
        index = torch.cat([idx[kept], new])
        source = torch.cat([torch.nonzero(kept).squeeze(1), torch.full_like(new, -1)])
        values = torch.cat([v.detach()[kept], torch.zeros(new.numel(), dtype=v.dtype, device=v.device)])
        order = torch.argsort(index)
        self.set_selection(name, index[order], values[order])
        self.mark_stale(self.values[_key(name)], source[order])

