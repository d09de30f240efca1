"""Diff pruning (Guo et al., 2021): θ = θ0 + z ⊙ w with z a hard-concrete relaxed mask (Louizos et al., 2018) and
an expected-L0 penalty, then a magnitude projection to the target sparsity, after which the adapter is a fixed
sparse selection that saves only the kept entries.

Training form: a selection of every entry of each targeted parameter (`values` = w) plus `log_alpha` (log α, one
per entry): the update is z ⊙ w with, in training, z = clamp(sigmoid((log u - log(1 - u) + log α) / β)(r - l) + l,
0, 1), u ~ U(0, 1) drawn per entry and forward, and in eval the deterministic z = clamp(sigmoid(log α)(r - l) + l,
0, 1). The defaults are the official code's (github.com/dguo98/DiffPruning, run_glue_diffpruning.py): stretch
(l, r) = (-1.5, 1.5), temperature β = 1, log α starting at 5, λ = 1.25e-7 and the gates at their own learning rate
0.1 (Louizos et al.'s own values are β = 2/3, (l, r) = (-0.1, 1.1)). Not done: that code's extra gate per
parameter tensor (its `per_params_alpha`). It is a SelectionDelta rather than a dense weight delta
because the engine's selection machinery (parameter-level targets, biases and norms, exact merge, sparse saves)
then serves both stages: only `value()` differs (gated) before the projection.

`regularizer` = λ Σ sigmoid(log α - β log(-l / r)), the expected number of non-zero gates.
`project(dm, adapter, density)` keeps the global top k = ceil(density · n) of |z ⊙ w| (eval gates) over the
adapter's parameters: the deltas become fixed selections of those entries with their values z ⊙ w, log α is
dropped, the model's output is that of the projected update. Train further with a new optimizer (the paper
fine-tunes the projected entries). `deltatune train` projects after its last step (`project_after_training`),
so its evaluation and saved adapter are the projected ones. A saved projected adapter holds k values and k indices per parameter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta, _key, global_top_k


class DiffPruningConfig(SelectionConfig):
    density: float = Field(0.005, gt=0, le=1, description="fraction of all targeted entries that `project` keeps "
                                                          "(the paper: 0.5%)")
    l0_lambda: float = Field(1.25e-7, ge=0, description="λ of the expected-L0 penalty on the gates (per entry)")
    log_alpha_init: float = Field(5.0, description="initial log α of every gate (5: z starts near 1)")
    stretch: tuple[float, float] = Field((-1.5, 1.5), description="(l, r): the interval the concrete sample is "
                                         "stretched to before clamping to [0, 1]; l < 0 < 1 < r")
    temperature: float = Field(1.0, gt=0, description="β of the concrete distribution")
    alpha_lr: float | None = Field(0.1, gt=0, description="the gates' (log α) learning rate; null = the run's")

    project_after_training: bool = Field(True, description="`deltatune train` projects to `density` after the last "
                                         "step (evaluated and saved projected)")

    @model_validator(mode="after")
    def _valid_stretch(self) -> DiffPruningConfig:
        low, high = self.stretch
        if not (low < 0 and high > 1):
            raise ValueError(f"diff_pruning stretch={self.stretch} must have l < 0 and r > 1 (gates must be able to "
                             "reach exactly 0 and 1): e.g. (-1.5, 1.5), the official code's")
        return self

    def default_parameter_targets(self) -> Any:
        return ["re:.*\\.weight"]

    def finish_training(self, dm: Any, name: str) -> None:
        """The trainer's hook after the last step: the magnitude projection (no fine-tuning after it)."""
        if self.project_after_training:
            project(dm, name)


def deterministic_gate(log_alpha: Tensor, stretch: tuple[float, float]) -> Tensor:
    low, high = stretch
    return (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0, 1)


@register("diff_pruning", config=DiffPruningConfig, family="selective",
          formula="2 d_out d_in while training (w, log α), ceil(density · n) over all targets after project()",
          paper="2012.07463", summary="θ0 + z ⊙ w, hard-concrete gates with an L0 penalty, then top-k projection")
class DiffPruning(SelectionDelta):
    def __init__(self, config: DiffPruningConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, initialize, shared)
        self.log_alpha = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full_like(self.values[_key(n)], config.log_alpha_init)) for n in self.names})

    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        return None  # every entry, until project()

    def delta_count(self) -> int:
        return super().delta_count() + sum(a.numel() for a in self.log_alpha.values())

    @property
    def projected(self) -> bool:
        return len(self.log_alpha) == 0

    def gate(self, name: str) -> Tensor:
        log_alpha = self.log_alpha[_key(name)]
        low, high = self.config.stretch
        if not self.training:
            return deterministic_gate(log_alpha, self.config.stretch)
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.config.temperature)
        return (s * (high - low) + low).clamp(0, 1)

    def value(self, name: str) -> Tensor:
        v = self.values[_key(name)]
        return v if self.projected else self.gate(name) * v

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        if self.projected or self.config.l0_lambda == 0:
            return None
        low, high = self.config.stretch
        shift = self.config.temperature * math.log(-low / high)
        return self.config.l0_lambda * sum(torch.sigmoid(a - shift).sum() for a in self.log_alpha.values())

    @torch.no_grad()
    def magnitudes(self) -> dict[str, Tensor]:
        """|z ⊙ w| per parameter with the eval gates: what the projection ranks."""
        return {n: (self._eval_gate(n) * self.values[_key(n)]).abs() for n in self.names}

    def _eval_gate(self, name: str) -> Tensor:
        return deterministic_gate(self.log_alpha[_key(name)], self.config.stretch)

    def lr_groups(self, lr: float) -> list[tuple[list[nn.Parameter], float]]:
        """The gates at `alpha_lr` (the official code: a second AdamW at 0.1), the values at the run's rate."""
        if self.projected or self.config.alpha_lr is None:
            return []
        return [(list(self.log_alpha.values()), self.config.alpha_lr)]

    @torch.no_grad()
    def project(self, keep: dict[str, Tensor]) -> None:
        """Become a fixed selection of entries `keep[name]` (flat indices) with values z ⊙ w (eval gates)."""
        if self.projected:
            raise ValueError("this diff-pruning delta is projected already")
        layer = self.__dict__["_layer"]
        for n in self.names:
            k = _key(n)
            idx = torch.unique(keep[n].to(torch.long).to(self.values[k].device))
            kept = (self._eval_gate(n) * self.values[k]).reshape(-1)[idx]
            self.values[k] = nn.Parameter(kept.clone(), requires_grad=self.values[k].requires_grad)
            self.register_buffer(f"index_{k}", idx)
        self.log_alpha = nn.ParameterDict()
        self._set_path(layer)

    def fit_state(self, state: dict[str, Tensor]) -> None:
        super().fit_state(state)
        if not any(k.startswith("log_alpha.") for k in state):  # a projected adapter: indices and values only
            self.log_alpha = nn.ParameterDict()
        else:
            for n in list(self.log_alpha):
                if n not in {_key(m) for m in self.names}:
                    del self.log_alpha[n]


def project(dm: Any, adapter: str = "default", density: float | None = None) -> int:
    """Magnitude-project adapter `adapter`'s diff-pruning update to `density` (its config's by default): the
    global top ceil(density · n) entries of |z ⊙ w| over all its parameters. Returns the kept count."""
    deltas = [(path, layer.deltas[adapter]) for path, layer in dm.layers()
              if adapter in layer.deltas and isinstance(layer.deltas[adapter], DiffPruning)]
    if not deltas:
        raise ValueError(f"adapter '{adapter}' has no diff_pruning deltas to project")
    if any(d.projected for _, d in deltas):
        raise ValueError(f"adapter '{adapter}' is projected already: it is a fixed sparse selection now")
    density = deltas[0][1].config.density if density is None else density
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    scores = {f"{path}.{n}": m for path, d in deltas for n, m in d.magnitudes().items()}
    k = max(1, math.ceil(density * sum(s.numel() for s in scores.values())))
    keep = global_top_k(scores, k)
    for path, d in deltas:
        d.project({n: keep[f"{path}.{n}"] for n in d.names})
    return k
