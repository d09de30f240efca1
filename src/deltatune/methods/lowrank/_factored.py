"""The shared half of every method whose update is a product of two thin factors built from something else.

ΔW = scale · B A with A (r, d_in) and B (d_out, r) produced by `factors()` (from random bases, shards, a
vector bank, frozen outer matrices...). Forward applies them to x, never forming the d_out x d_in matrix.
"""

from __future__ import annotations

from torch import Tensor

from ...engine.fused import LowRank
from ...engine.layer import Delta, DeltaLayer


class Factored(Delta):
    scale: float = 1.0

    def factors(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        A, B = self.factors()
        return self.scale * (B @ A)  # (d_out, d_in)

    def low_rank(self) -> LowRank | None:
        if type(self).change is not Factored.change or type(self).forward is not Delta.forward:
            return None
        A, B = self.factors()
        return LowRank(A, B, self.scale, self.dropout_p)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        A, B = self.factors()
        return layer.mix(layer.apply_matrix(x, A), B) * self.scale
