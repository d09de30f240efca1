"""PaCA, partial connection adaptation (Woo et al., ICLR 2025): train r randomly chosen input columns of W0.

ΔW is nonzero only in the columns W[:, idx] (P = r · d_out), a selection delta whose entries are whole columns.
Its point is activation memory. The delta's output is x[..., idx] Vᵀ (V the d_out x r trained block), so its
weight gradient is g_outᵀ · x[..., idx] and backward keeps only the r selected input features of each token:
on a stock linear the base matmul with a frozen W0 saves nothing for its weight, and the input gradient needs
only W0 and V. LoRA, by contrast, keeps the whole input x (for ∂A) beside its thin h. Merge is the selection's
exact merge of those columns.

The official code (WooSunghyeon/paca) draws idx = randperm(d_in)[:r] per layer and trains the columns scaled
by α/r; under Adam that scale is a learning-rate factor, so it is left to the learning rate here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ...engine.kinds import LINEAR_KINDS
from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ...engine.selection import SelectionConfig, SelectionDelta
from .random_sparse import seeded_generator

FAST_KINDS = ("linear", "linear_4bit", "linear_int8")  # out = x W0ᵀ + b: the delta's term is x[..., idx] Vᵀ


class PaCAConfig(SelectionConfig):
    r: int = Field(8, ge=1, description="input columns trained per layer (P = r · d_out)")
    seed: int = Field(0, description="the columns' draw (with each layer's name, so layers differ)")


@register("paca", config=PaCAConfig, family="selective", formula="r · d_out",
          paper="openreview:iYkhxre0In (ICLR 2025)", summary="r random input columns of W0, backward keeps only x[..., idx]")
class PaCA(SelectionDelta):
    def keeps(self, layer: DeltaLayer, name: str) -> bool:
        return layer.kind is not None and name == layer.kind.weight  # the bias of a targeted module stays

    def select(self, layer: DeltaLayer, name: str, param: Tensor) -> Tensor | None:
        if layer.kind not in LINEAR_KINDS:
            raise ValueError(f"paca trains input columns of a linear layer's weight; '{layer.path}' is "
                             f"{type(layer.base_layer).__name__}: target Linear (or GPT-2 Conv1D) layers only")
        shape = self._shape(layer, name)
        positions = layer.kind.to_matrix(torch.arange(shape.numel()).reshape(shape))  # (d_out, d_in) flat indices
        d_out, d_in = positions.shape
        if self.config.r > d_in:
            raise ValueError(f"paca r={self.config.r} exceeds the {d_in} input features of '{layer.path}'; "
                             f"use r <= {d_in}")
        cols = torch.randperm(d_in, generator=seeded_generator(self.config.seed, f"{layer.path}.{name}"))
        return positions[:, cols[: self.config.r]]

    def columns(self, layer: DeltaLayer) -> tuple[Tensor, Tensor]:
        """(cols, V): the r trained input columns, ascending, and their d_out x r update (a view of the values)."""
        idx, v = self.index(layer.kind.weight), self.value(layer.kind.weight)
        d_in = layer.in_features
        # the sorted flat index of a (d_out, r) block of a row-major (d_out, d_in) matrix is row by row
        block = idx.view(layer.out_features, -1)
        return block[0] % d_in, v.view(layer.out_features, -1)

    def _fast(self, layer: DeltaLayer) -> bool:
        return (self.additive and layer.kind.name in FAST_KINDS and layer.stock
                and self.index(layer.kind.weight) is not None)

    def _partial(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        cols, v = self.columns(layer)
        # select before any cast: a half-precision base copies only r features per token to fp32; F.linear then
        # saves that (N, r) slice for ∂V (and V, a parameter, for ∂x), never x
        return F.linear(x.index_select(-1, cols).to(v.dtype), v)

    def forward(self, layer: DeltaLayer, x: Any, out: Any, *args: Any, **kwargs: Any) -> Any:
        if self._fast(layer):
            return out + self._partial(layer, x).to(out.dtype)
        return super().forward(layer, x, out, *args, **kwargs)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        if self._fast(layer):
            return self._partial(layer, x)
        return super().change(layer, x)
