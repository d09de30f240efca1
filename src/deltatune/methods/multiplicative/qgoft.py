"""GOFT and qGOFT: Parameter Efficient Quasi-Orthogonal Fine-Tuning via Givens Rotation (Ma et al., arXiv:2404.04316),
Eqs. (3-5):

    y = W0 (Rᵀ x),   R = P_L ··· P_2 P_1 (· S),   P_r = Π_k G(k·2s, k·2s + s; θ_rk),   s = 2^(r-1)

i.e. W' = W0 Rᵀ (the input side). Each level P_r is a set of non-overlapping 2x2 blocks on coordinate pairs
(k·2s, k·2s + s); L = ceil(log2 d_in) levels, exactly d_in - 1 blocks in all, so every coordinate is reached.
GOFT: block [[cos t, -sin t], [sin t, cos t]], t = pi·tanh(p), p starts at 0 (R = I). P = d_in - 1
(option `scaling`: R = P_L ··· P_1 S with a trained diagonal S, ones at init, +d_in).
qGOFT: each block a free 2x2 matrix (α_i, β_i) (identity init), P = 4(d_in - 1), trained with the soft
orthogonality penalty λ Σ_i <α_i, β_i>² over all blocks and layers (`regularizer`, a sum; default λ = 0.01).
The forward applies the levels to x (gather pairs, 2x2 mix, scatter), O(d log d) per token, never forming R,
when a batch has fewer than d_in tokens; with more (training batches) it rotates W0 once, W0 Rᵀ, which replaces
2 log2(d) small memory-bound passes over the activations by the same ops on d_in rows and one matmul.
Note: the d_in - 1 rotations form a tree rooted at coordinate 0, so output 0 mixes every input, but R is not
dense and d_in - 1 angles do not span SO(d_in) (dimension d_in(d_in-1)/2); Theorem 4.1 of the paper only says
d - 1 rotations can move any given vector to any other, though its text calls this equivalent to any rotation.

[verify] items, checked against the official code (ArthurLeoM/peft-givens, v1 commit 0fe813e, tuners/givens/
layer.py, config.py) and the paper text:
- side: forward is `F.linear(x, rot_weight.T)` then `F.linear(result, W, bias)`: y = W0 (Rᵀ x), as Eq. (4)
  h = (R W)ᵀ x in the paper's (d_in, d_out) layout; merge W <- (R Wᵀ)ᵀ = W Rᵀ.
- arrangement: `cur//2` pairs (idx, idx + step) with idx = arange(cur//2)·2·step at each level, an odd leftover
  carried (`cur = cur + left`), stop at cur == 1; one flat parameter vector sliced by a running offset
  (`flag`); R = P_L ··· P_1 S (`rot_weight = mm(cur_rot, rot_weight)`, level 1 first). Same here.
- GOFT angle `tanh(p)·pi`, p init 0; qGOFT blocks (`givens_soft`, (d_in-1, 2, 2)) init eye.
- scaler: the code trains S by default (`no_scaling=False`) but the paper's GOFT count, 0.08M on
  DeBERTaV3-base (all linear layers: 12·(5·767 + 3071) = 82,872), matches d_in - 1 without it (with S it
  would be 0.17M); qGOFT 0.33M = 4x. So `scaling` is off by default.
- penalty: in the paper (Sec. 4.2, λ Σ <α_i, β_i>²; λ = 0.01 for LLaMA-2, Table 7; 0.001-0.05 on GLUE, Table 6)
  but NOT in the released code, which trains qGOFT without it.
"""

from __future__ import annotations

import itertools
import math

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import DeltaConfig, register
from ._orthogonal import Orthogonal


class GOFTConfig(DeltaConfig):
    scaling: bool = Field(False, description="also train a diagonal scale S (d_in, ones): R = P_L ... P_1 S")


class QGOFTConfig(DeltaConfig):
    lam: float = Field(0.01, ge=0, description="λ of the soft orthogonality penalty λ Σ <α_i, β_i>²")


def givens_levels(d: int) -> list[tuple[Tensor, Tensor]]:
    """The parallel arrangement: per level the coordinate pairs (i, j) it rotates, level 1 first; d - 1 pairs."""
    levels, cur, stride = [], d, 1
    while cur > 1:
        n, left = divmod(cur, 2)
        i = torch.arange(n) * 2 * stride
        levels.append((i, i + stride))
        cur, stride = n + left, stride * 2
    return levels


@register("goft", config=GOFTConfig, family="multiplicative", formula="d_in - 1", paper="arXiv:2404.04316",
          summary="GOFT: W0 rotated on the input side by d_in - 1 Givens rotations in log2(d_in) parallel levels")
class GOFT(Orthogonal):
    weight_form = True  # 9 levels on 384 rows of the identity, not on every token (2.2x -> see README)
    def __init__(self, config, layer: DeltaLayer, initialize: bool = True, shared=None):
        super().__init__(config, layer)
        if self.d_in < 2:
            raise ValueError(f"{self.method} needs d_in >= 2 to rotate; this layer has d_in={self.d_in}")
        levels = givens_levels(self.d_in)
        dev = self.kw["device"]
        # pairs of all levels in one flat order (level 1 first), matching the flat parameter vector
        self.register_buffer("pair_i", torch.cat([i for i, _ in levels]).to(dev), persistent=False)  # (d_in-1,)
        self.register_buffer("pair_j", torch.cat([j for _, j in levels]).to(dev), persistent=False)  # (d_in-1,)
        ends = list(itertools.accumulate(len(i) for i, _ in levels))
        self.slices = [(end - len(i), end) for end, (i, _) in zip(ends, levels)]  # per level, into the flat order
        self._build(config)

    def _build(self, config: GOFTConfig) -> None:
        self.givens_theta = nn.Parameter(torch.zeros(self.d_in - 1, **self.kw))  # t = pi tanh(p)
        self.givens_scale = nn.Parameter(torch.ones(self.d_in, **self.kw)) if config.scaling else None

    def blocks(self) -> Tensor:
        """(d_in - 1, 2, 2): the 2x2 block of each rotation, G = [[P_ii, P_ij], [P_ji, P_jj]]."""
        t = math.pi * torch.tanh(self.givens_theta)
        c, s = torch.cos(t), torch.sin(t)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

    def map_in(self, z: Tensor, transpose: bool = False) -> Tensor:
        """z @ R = z P_L ··· P_1 S on row vectors: the last level first, the scale last.

        transpose=True: z @ Rᵀ = z S P_1ᵀ ··· P_Lᵀ (the scale first, level 1 first, each block transposed).
        """
        G = self.blocks()
        scale = getattr(self, "givens_scale", None)
        if transpose:
            G = G.transpose(1, 2)
            z = z * scale if scale is not None else z
        for a, b in (self.slices if transpose else reversed(self.slices)):
            i, j, g = self.pair_i[a:b], self.pair_j[a:b], G[a:b]
            zi, zj = z[..., i], z[..., j]  # (..., n) each
            # [z_i, z_j] @ G: (z P)_i = z_i P_ii + z_j P_ji, (z P)_j = z_i P_ij + z_j P_jj
            new_i = zi * g[:, 0, 0] + zj * g[:, 1, 0]
            new_j = zi * g[:, 0, 1] + zj * g[:, 1, 1]
            z = z.index_copy(-1, i, new_i).index_copy(-1, j, new_j)
        return z * scale if scale is not None and not transpose else z

    def rotated_weight(self, layer: DeltaLayer) -> Tensor:
        """W0 Rᵀ, by the levels on W0's rows (no d_in x d_in matrix, no dense product)."""
        return self.map_in(layer.matrix().to(self.kw["dtype"]), transpose=True)


@register("qgoft", config=QGOFTConfig, family="multiplicative", formula="4*(d_in - 1)", paper="arXiv:2404.04316",
          summary="qGOFT: GOFT with free 2x2 blocks (norm and angle relaxed) under a soft orthogonality penalty")
class QGOFT(GOFT):
    def _build(self, config: QGOFTConfig) -> None:
        eye = torch.eye(2, **self.kw).expand(self.d_in - 1, 2, 2)
        self.givens_blocks = nn.Parameter(eye.clone())  # (d_in-1, 2, 2), columns α_i, β_i

    def blocks(self) -> Tensor:
        return self.givens_blocks

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        if self.config.lam == 0:
            return None
        G = self.givens_blocks
        inner = G[:, 0, 0] * G[:, 0, 1] + G[:, 1, 0] * G[:, 1, 1]  # <α_i, β_i>, column inner product
        return self.config.lam * inner.square().sum()
