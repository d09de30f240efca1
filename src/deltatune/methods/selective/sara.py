"""SaRA (Hu et al., 2024): train the "ineffective" entries, those of smallest |W0|, with a nuclear-norm penalty
λ‖ΔW‖_* that keeps the sparse update low-rank, and re-select them as training goes.

Rule implemented here, and where it departs from the official code (sjtuplayer/SaRA, optim/adamw.py):
- selection: the k = ceil(density · n) entries of smallest |W0| per parameter (a fraction, so the count is fixed;
  the code takes |W| < threshold, a count that varies by layer); the paper's bottom 10-20%: density 0.1 default.
- penalty: λ Σ_layers ‖ΔW‖_* on every adapted weight's update, each step (`regularizer`); the code penalises the
  masked weight (W ⊙ M, base entries included) of one layer drawn at random per step. λ = 0 (off) by default, as
  the code's `lambda_rank`.
- re-selection (`reselect_every` = R > 0, `on_step`): at steps R, 2R, ... the k entries of smallest current
  |W0 + ΔW| become the selection; entries that stay keep their update, new ones start at 0. The count is fixed
  (set_selection), so an entry that leaves loses its update (the code keeps it in the weight, as full-model
  training can): the model changes at a re-selection. The code re-selects once (`progressive_iter`). The
  optimizer's moments of moved entries are not reset. At small densities trained entries soon outgrow the
  selection's |W0| range, so a re-selection replaces most of them: it is off (0) by default.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta
from .random_sparse import entry_count


class SaraConfig(SelectionConfig):
    density: float = Field(0.1, gt=0, le=1, description="fraction of each parameter's entries to train: those of "
                                                        "smallest |W0| (the paper: the bottom 10-20%)")
    nuclear_lambda: float = Field(0.0, ge=0, description="λ of the penalty λ‖ΔW‖_* on each adapted weight's "
                                                         "update (0: off)")
    reselect_every: int = Field(0, ge=0, description="re-select the smallest |W0 + ΔW| every this many steps "
                                                     "(0: never)")

    def default_parameter_targets(self) -> Any:
        return ["re:.*\\.(weight)"]


@register("sara", config=SaraConfig, family="selective", formula="ceil(density · d_out d_in)", paper="2409.06633",
          summary="the smallest-|W0| entries, a nuclear-norm penalty on ΔW, periodic re-selection")
class Sara(SelectionDelta):
    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        return self._smallest(param.detach())

    def _smallest(self, weight: Tensor) -> Tensor | None:
        k = entry_count(weight.numel(), self.config.density)
        if k == weight.numel():
            return None
        # a stable sort: ties (equal |W|) go to the earlier entry, the same on every machine
        return torch.sort(weight.abs().reshape(-1).float(), stable=True).indices[:k]

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        if self.config.nuclear_lambda == 0 or layer.kind is None or layer.kind.weight not in self.names:
            return None
        return self.config.nuclear_lambda * torch.linalg.matrix_norm(self.delta_weight(layer), "nuc")

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        every = self.config.reselect_every
        if every == 0 or step == 0 or step % every:
            return
        layer = self.__dict__["_layer"]
        for n in self.names:
            old = self.index(n)
            if old is None:
                continue  # every entry is trained already
            current = self._base_param(layer, n).float() + self.dense(layer, n).to(torch.float32)
            new = self._smallest(current)
            # entries that stay keep their update; new ones start at zero
            dense = self.dense(layer, n).reshape(-1)
            self.set_selection(n, new, dense[new])
