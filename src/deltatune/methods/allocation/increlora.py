"""IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning (Zhang et al.,
arXiv:2308.12043).

    ΔW = s · P Λ Q over the module's active triplets (AdaLoRA's SVD form), every module starting at rank r;
    module score  S = Ī · Ū  of  I = Σ|ΔW ⊙ ∂L/∂ΔW| / sqrt(d_out d_in),  Ī ← β1 Ī + (1-β1) I,  Ū ← β2 Ū + (1-β2)|I - Ī|
    every delta_t steps after tinit: the top_h modules by S get add_r more triplets, until L · target_r are used.

Checked against FeiyuZhang98/IncreLoRA (loralib/increlora.py, NLU/README.md): the module score is the
matrix-level sensitivity of ΔW (the gradient reaching the matrix W = B (A ⊙ E), taken there by a backward
hook; here by a hook on ΔW, which the forward forms while ranks can still grow), smoothed as AdaLoRA's; the
orthogonality penalty is AdaLoRA's (reg_orth_coef 0.1 in their scripts); new triplets get E = 0 and fresh
A, B ~ N(0, 0.02); add_r defaults to target_r / 2 (their table 2->1, 4->2, 6->3, 8->4).
Departures, each to keep the function continuous and the run resumable:
- capacity is preallocated: every module holds max_r triplets and a mask of the active ones, so parameter
  shapes never change, the optimizer needs no new groups, and a checkpoint resumes exactly. Inactive triplets
  carry no gradient (Λ is masked in the forward and the penalty covers active ones only), so they stay at
  their init until chosen; the count is max_r(d_in + d_out + 1) allocated, L · target_r triplets used.
- the scale is fixed, s = alpha / target_r: the official s = alpha / (current rank) rescales every existing
  triplet of a module when it grows, so adding a zero triplet would change the output.
- the official code's "advance learning" (reserve triplets at E = 1e-5 training early) is not done: new
  triplets start exactly at zero, so the output is unchanged when ranks grow.
- the budget is exact: the last round gives fewer triplets so the total never exceeds L · target_r, and a module
  never exceeds max_r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.fused import LowRank
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank._sharing import LayerShared
from ..lowrank.lora import adapter_dtype, check_rank
from .adalora import orthogonality, orthogonality_loss


class IncreLoRAConfig(DeltaConfig):
    r: int = Field(2, ge=1, description="rank every module starts with (official lora_r)")
    target_r: int = Field(8, ge=1, description="average rank per module once the budget is used")
    max_r: int | None = Field(None, ge=1, description="triplets preallocated per module (null = 2 x target_r)")
    add_r: int | None = Field(None, ge=1, description="triplets a chosen module gains per round (null = target_r/2)")
    top_h: int = Field(4, ge=1, description="modules chosen per round")
    alpha: float = Field(16.0, gt=0, description="scale s = alpha / target_r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    tinit: int = Field(0, ge=0, description="steps before the first increase (official init_warmup)")
    delta_t: int = Field(10, ge=1, description="steps between two increases (official incre_interval)")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of the module sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of its uncertainty")
    orth_reg_weight: float = Field(0.1, ge=0, description="weight of the orthogonality penalty (official 0.1)")

    @model_validator(mode="after")
    def _check(self) -> IncreLoRAConfig:
        if not self.r <= self.target_r <= self.capacity:
            raise ValueError(f"IncreLoRA grows ranks: need r <= target_r <= max_r, got r={self.r}, "
                             f"target_r={self.target_r}, max_r={self.capacity}")
        return self

    @property
    def capacity(self) -> int:
        return self.max_r if self.max_r is not None else 2 * self.target_r

    @property
    def step_r(self) -> int:
        return self.add_r if self.add_r is not None else max(1, self.target_r // 2)


class GrowthState(LayerShared):
    """Adapter-wide: the layer count (the penalty's mean) and whether the budget is used up."""

    def __init__(self, layers: Sequence[DeltaLayer]):
        super().__init__(layers)
        self.register_buffer("finished", torch.zeros((), dtype=torch.bool))


@register("increlora", config=IncreLoRAConfig, family="allocation", formula="max_r(d_in + d_out + 1)",
          paper="arXiv:2308.12043",
          summary="IncreLoRA: SVD-form low rank that starts small and adds triplets to the most sensitive modules")
class IncreLoRA(Delta):
    def __init__(self, config: IncreLoRAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, shared=shared)
        r = config.capacity
        d_out, d_in = check_rank(r, layer, self.method, warn_for=config)
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.lora_A = nn.Parameter(torch.zeros(r, d_in, **kw))  # Q (max_r, d_in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))  # Λ (max_r, 1)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **kw))  # P (d_out, max_r)
        active = torch.zeros(r, dtype=torch.bool, device=kw["device"])
        active[:config.r] = True
        self.register_buffer("active", active)
        self.register_buffer("ipt", torch.zeros((), **kw))  # smoothed module sensitivity Ī
        self.register_buffer("unc", torch.zeros((), **kw))  # its uncertainty Ū
        self._wg: Tensor | None = None  # Σ over this step's backward passes of ΔW ⊙ ∂L/∂ΔW (not state: reset each step)
        if initialize:
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    @classmethod
    def build_shared(cls, config: IncreLoRAConfig, layers: Sequence[DeltaLayer]) -> nn.Module:
        return GrowthState(layers)

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.target_r

    @property
    def rank(self) -> int:
        return int(self.active.sum())

    def factors(self) -> tuple[Tensor, Tensor]:
        """(Λ Q, P) with inactive triplets' Λ masked to 0 (no output, no gradient)."""
        return self.lora_A * (self.lora_E * self.active.view(-1, 1)), self.lora_B

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        A, B = self.factors()
        return self.scale * (B @ A)

    @property
    def scoring(self) -> bool:
        """Training while ranks can still grow: the forward forms ΔW, so its gradient can be read."""
        return self.training and torch.is_grad_enabled() and not (self.shared is not None and self.shared.finished)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        if not self.scoring:
            A, B = self.factors()
            return layer.mix(layer.apply_matrix(x, A), B) * self.scale
        W = self.delta_weight(layer)
        if W.requires_grad:
            W.register_hook(self._record(W.detach()))
        return layer.apply_matrix(x, W)

    def _record(self, W: Tensor):
        def hook(grad: Tensor) -> None:
            wg = W * grad
            self._wg = wg if self._wg is None else self._wg + wg
        return hook

    def low_rank(self) -> LowRank | None:
        if self.scoring:
            return None  # the ΔW form, for the score
        A, B = self.factors()
        return LowRank(A, B, self.scale, self.dropout_p)

    def orthogonality(self) -> Tensor:
        return orthogonality(self.lora_A[self.active], self.lora_B[:, self.active])  # the triplets in use

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        return orthogonality_loss(self)

    @torch.no_grad()
    def update_score(self) -> None:
        """Fold this step's sensitivity into Ī, Ū (official RankAllocator.update_ipt)."""
        b1, b2 = self.config.beta1, self.config.beta2
        ipt = self._wg.abs().sum() / math.sqrt(self._wg.numel()) if self._wg is not None else torch.zeros(())
        ipt = ipt.to(self.ipt)
        self.ipt.mul_(b1).add_((1 - b1) * ipt)
        self.unc.mul_(b2).add_((1 - b2) * (ipt - self.ipt).abs())
        self._wg = None

    @property
    def score(self) -> float:
        return float(self.ipt * self.unc)

    @torch.no_grad()
    def grow(self, n: int) -> int:
        """Activate the next n inactive triplets (Λ = 0: the output is unchanged); returns how many."""
        free = (~self.active).nonzero().view(-1)[:n]
        self.lora_E[free] = 0.0
        self.active[free] = True
        return free.numel()

    @classmethod
    @torch.no_grad()
    def after_update(cls, deltas: Sequence[Delta], shared: nn.Module | None, step: int,
                     total_steps: int | None) -> None:
        if shared is not None and shared.finished:
            return
        c = deltas[0].config
        for d in deltas:
            d.update_score()
        if step > c.tinit and step % c.delta_t == 0:
            increase(deltas, shared)


def increase(deltas: Sequence[IncreLoRA], shared: nn.Module | None) -> list[int]:
    """One round: the top_h modules by score (that have room) gain add_r triplets each, within the budget.
    Returns the positions of the modules that grew."""
    c = deltas[0].config
    left = c.target_r * len(deltas) - sum(d.rank for d in deltas)
    room = [i for i, d in enumerate(deltas) if d.rank < c.capacity]
    chosen = sorted(room, key=lambda i: -deltas[i].score)[:c.top_h]  # stable: ties go to the earlier module
    grown = []
    for i in chosen:
        if left <= 0:
            break
        added = deltas[i].grow(min(c.step_r, left))
        left -= added
        grown.append(i)
    if shared is not None and (left <= 0 or not room):
        shared.finished.fill_(True)
    return grown


def ranks(dm: Any, adapter: str | None = None) -> dict[str, int]:
    """Layer path -> active triplets, for the IncreLoRA layers of `adapter` (default: all)."""
    return {path: layer.deltas[name].rank for path, layer in dm.layers() for name in layer.deltas
            if isinstance(layer.deltas[name], IncreLoRA) and adapter in (None, name)}
