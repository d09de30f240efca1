"""DyLoRA: one LoRA block trained for a whole range of ranks at once (nested, truncatable).

*DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(Valipour et al., arXiv:2210.07558). Each training step draws b ~ Uniform{r_min..r} and uses the truncated
factors
    y = W0 x + (alpha / b) · B[:, :b] A[:b, :] x,        A (r x d_in) Kaiming, B (d_out x r) zero,
so every prefix of the rank ordering is trained to work alone; after training any b <= r is usable as a
plain rank-b LoRA with scale alpha/b (`eval_rank`, or `set_rank(dm, b)` for all layers of an adapter).

[verify] items, checked against the official `dynamic` module (huawei-noah/KD-NLP DyLoRA `loralib`, as
vendored with its Huawei copyright in derived repositories; the KD-NLP snapshot in the store predates the
DyLoRA folder): `forward` returns inputs[:, :b] for A^T and B, each times sqrt(r / b), on top of the layer's
scaling alpha / r, so the effective scale is alpha / b (truncation A[:b], B[:, :b]: yes). "frozen" mode
(`set_rank(rank, frozen=True)`) detaches rows/columns 0..b-2 so only the b-th row of A and column of B train;
the default there is frozen=False (all of 1..b train), as here. Training scripts draw the rank uniformly
(`random.randint(min_rank, max_rank - 1)` as a 0-based index, i.e. b uniform in r_min..r) once per step for
all layers. Departure: the draw is a function of (seed, step) through `on_step`, so a resumed run replays
it; outside `on_step` (or in eval) the layer runs at `eval_rank` (default r, i.e. plain LoRA).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ...engine.fused import LowRank
from ...engine.layer import DeltaLayer
from ...engine.registry import register
from .lora import LoRA, LoRAConfig


class DyLoRAConfig(LoRAConfig):
    r_min: int = Field(1, ge=1, description="smallest rank drawn during training (the paper's b_min)")
    frozen: bool = Field(False, description="train only the b-th row of A / column of B each step (official 'frozen')")
    seed: int = Field(0, description="seed of the per-step rank draw: b is a function of (seed, step)")
    eval_rank: int | None = Field(None, ge=1, description="rank used outside training steps (None: r)")

    @model_validator(mode="after")
    def _check(self) -> DyLoRAConfig:
        if self.r_min > self.r:
            raise ValueError(f"DyLoRA needs r_min <= r; got r_min={self.r_min}, r={self.r}")
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise ValueError(f"DyLoRA eval_rank={self.eval_rank} is larger than r={self.r}")
        if self.rslora or self.pissa:
            raise ValueError("DyLoRA scales by alpha/b and starts from B = 0: rslora and PiSSA init do not apply")
        return self


def draw_rank(config: DyLoRAConfig, step: int) -> int:
    """The rank b of training step `step`: uniform on r_min..r, the same for every layer and on resume."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return int(torch.randint(config.r_min, config.r + 1, (1,), generator=g))


@register("dylora", config=DyLoRAConfig, family="low-rank", formula="r(d_in + d_out)", paper="arXiv:2210.07558",
          summary="DyLoRA: LoRA trained at a random rank b <= r each step (scale alpha/b); truncatable to any rank")
class DyLoRA(LoRA):
    def __init__(self, config: DyLoRAConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer, initialize)
        self.eval_rank = config.eval_rank or config.r
        self.train_rank: int | None = None  # set by on_step; None: train at eval_rank

    def on_step(self, step: int) -> None:
        self.train_rank = draw_rank(self.config, step)

    @property
    def rank(self) -> int:
        """The rank b the next forward uses."""
        return self.train_rank if self.training and self.train_rank is not None else self.eval_rank

    def factors(self, b: int | None = None) -> tuple[Tensor, Tensor]:
        """(A[:b], B[:, :b]); in frozen training mode the first b-1 ranks carry no gradient."""
        b = self.rank if b is None else b
        A, B = self.lora_A[:b], self.lora_B[:, :b]  # (b, d_in), (d_out, b)
        if self.config.frozen and self.training and torch.is_grad_enabled():
            A = torch.cat([A[:b - 1].detach(), A[b - 1:]])
            B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], dim=1)
        return A, B

    def delta_weight(self, layer: DeltaLayer, b: int | None = None) -> Tensor:
        b = self.rank if b is None else b
        A, B = self.factors(b)
        return (self.config.alpha / b) * (B @ A)  # (d_out, d_in)

    def lora_out(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        b = self.rank
        A, B = self.factors(b)
        return layer.mix(layer.apply_matrix(x, A), B) * (self.config.alpha / b)

    def low_rank(self) -> LowRank | None:
        if self.lora_bias is not None:
            return None
        b = self.rank
        A, B = self.factors(b)
        return LowRank(A, B, self.config.alpha / b, self.dropout_p)

    # The merged rank is remembered, so unmerge subtracts exactly what merge added even if the rank changed.
    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> int:
        b = self.rank
        self._add(layer, b, 1.0)
        return b

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, b: int) -> None:
        self._add(layer, b, -1.0)

    def _add(self, layer: DeltaLayer, b: int, sign: float) -> None:
        w = layer.weight
        w += sign * layer.kind.to_weight(self.delta_weight(layer, b).to(w.dtype), w)
        if self.lora_bias is not None:
            layer.base_layer.bias += sign * self.lora_bias.to(w.dtype)


def set_rank(dm: Any, b: int, adapter: str | None = None) -> None:
    """Use rank b (1..r) outside training steps in every DyLoRA layer of `adapter` (default: all)."""
    for _, layer in dm.layers():
        for name, delta in layer.deltas.items():
            if isinstance(delta, DyLoRA) and adapter in (None, name):
                if not 1 <= b <= delta.config.r:
                    raise ValueError(f"DyLoRA rank b={b} is outside 1..r={delta.config.r} (adapter '{name}')")
                if name in layer.merged:
                    raise RuntimeError(f"adapter '{name}' is merged; unmerge() before changing its rank")
                delta.eval_rank = b
