"""Shared machinery of the orthogonal-family deltas (OFT, BOFT, ETHER): W' = N · W0 · M.

A subclass gives the input-side map `map_in(z) = z @ Mᵀ` (z: (..., d_in) row vectors, so y = W0 (M x)) and/or
the output-side map `map_out(h) = h @ Nᵀ`, in activation space. This base turns them into:
- forward on Linear / GPT-2 Conv1D: rotate x, run the base layer, then map its linear part (never forms W0 M);
- forward on Conv: the flattened input dimension mixes kernel positions, so no activation form exists; the
  rotated kernel N W0 M (the layer's own size) is used instead;
- merge W0 <- N W0 M, and an unmerge that solves with M and N (exact to float64 rounding; M, N need not be
  orthogonal: Cayley-Neumann, ETHER+, BOFT's scale).
Also the Cayley transform and block helpers OFT and BOFT share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...engine.kinds import CONV, EMBEDDING, LINEAR
from ...engine.layer import Delta, DeltaLayer
from ..lowrank.lora import adapter_dtype


def skew(vec: Tensor, s: int) -> Tensor:
    """(n, s(s-1)/2) strict upper-triangle entries (torch.triu_indices order, as PEFT) -> (n, s, s) Q = U - Uᵀ."""
    rows, cols = torch.triu_indices(s, s, 1, device=vec.device)
    Q = vec.new_zeros(vec.shape[0], s, s)
    Q[:, rows, cols] = vec
    return Q - Q.transpose(1, 2)


def cayley(Q: Tensor, neumann_terms: int = 0) -> Tensor:
    """Batched Cayley transform of skew Q (n, s, s), in PEFT's conventions (peft 0.21 oft/boft layer.py):
    exact: R = (I - Q)(I + Q)^-1; neumann_terms=k>0: R = I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1), PEFT's
    truncated series, which approximates (I + Q)(I - Q)^-1 = the exact branch's transpose (PEFT's two modes
    differ in the sign of Q; we follow PEFT so its files load unchanged)."""
    n, s, _ = Q.shape
    eye = torch.eye(s, device=Q.device, dtype=Q.dtype).expand(n, s, s)
    if neumann_terms <= 0:
        return torch.linalg.solve(eye + Q, eye - Q, left=False)  # X (I + Q) = I - Q
    R, power = eye.clone(), eye
    for k in range(1, neumann_terms):
        power = power @ Q
        R = R + (2.0 if k < neumann_terms - 1 else 1.0) * power
    return R


def block_apply(z: Tensor, B: Tensor) -> Tensor:
    """Row vectors z (..., n*s) times blockdiag(B_1..B_n) (B: (n, s, s)), block by block."""
    n, s, _ = B.shape
    zb = z.reshape(*z.shape[:-1], n, s)  # (..., n, s)
    return torch.einsum("...rk,rkc->...rc", zb, B).reshape(z.shape)


def block_count(d: int, block_size: int, blocks: int, method: str, what: str = "d_in") -> tuple[int, int]:
    """(number of blocks, block size) from exactly one of the two options; a clear error if d does not split."""
    if (block_size > 0) == (blocks > 0):
        raise ValueError(f"{method}: set exactly one of block_size ({block_size}) and r/blocks ({blocks}); "
                         "the other is d / it")
    n = blocks if blocks > 0 else d // block_size if d % block_size == 0 else 0
    if n == 0 or d % n != 0:
        raise ValueError(f"{method}: {what}={d} does not split into blocks of size {block_size or d / blocks:g}; "
                         f"pick a divisor of {d}")
    return n, d // n


class Orthogonal(Delta):
    """W' = N W0 M with M from `map_in`, N from `map_out` (subclasses set has_in / has_out)."""

    additive = False
    has_in = True
    has_out = False
    # True: on a stock linear layer with at least d_in tokens, rotate the weight once (W0 M) instead of every
    # token, for maps made of many small memory-bound ops (GOFT's log2(d) gather-rotate-scatter levels)
    weight_form = False

    def __init__(self, config, layer: DeltaLayer, initialize: bool = True, shared=None):
        super().__init__(config, layer)
        if layer.kind is EMBEDDING:
            raise ValueError(f"{self.method} does not adapt nn.Embedding layers (their input side is token ids); "
                             "exclude them")
        self.d_out, self.d_in = layer.matrix().shape
        self.kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        # Conv layers take the weight form and need the base output; Linear-like input rotations run the base.
        self.uses_base_output = layer.kind is CONV or not self.has_in

    def map_in(self, z: Tensor) -> Tensor:  # z @ Mᵀ
        raise NotImplementedError

    def map_out(self, h: Tensor) -> Tensor:  # h @ Nᵀ
        raise NotImplementedError

    def matrices(self) -> tuple[Tensor | None, Tensor | None]:
        """(M (d_in x d_in), N (d_out x d_out)), materialised from the maps (merge / conv only)."""
        M = self.map_in(torch.eye(self.d_in, **self.kw)).t() if self.has_in else None
        N = self.map_out(torch.eye(self.d_out, **self.kw)).t() if self.has_out else None
        return M, N

    def rotated_weight(self, layer: DeltaLayer) -> Tensor:
        W = layer.matrix().to(self.kw["dtype"])
        M, N = self.matrices()
        W = W @ M if M is not None else W
        return N @ W if N is not None else W

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.rotated_weight(layer) - layer.matrix().to(self.kw["dtype"])

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor | None) -> Tensor:
        if (self.weight_form and not self.has_out and layer.kind is LINEAR and layer.stock
                and x.numel() >= self.d_in * self.d_in):  # at least d_in tokens
            return F.linear(x, self.rotated_weight(layer).to(x.dtype), layer.base_layer.bias)
        if layer.kind is CONV:
            return out + layer.apply_matrix(x, self.delta_weight(layer).to(x.dtype)).to(out.dtype)
        h = self.map_in(x.to(self.kw["dtype"])).to(x.dtype) if self.has_in else x
        y = layer.base_layer(h) if self.has_in else out
        if not self.has_out:
            return y
        bias = getattr(layer.base_layer, "bias", None)
        if layer.stock:
            lin = y if bias is None else y - bias  # W0 h, reused from the base output
        else:
            lin = layer.apply_matrix(h, layer.matrix().to(h.dtype))
        lin = lin.to(self.kw["dtype"])
        return y + (self.map_out(lin) - lin).to(y.dtype)  # only the change is rounded to y's dtype: exact at init

    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> None:
        w = layer.weight
        w.copy_(layer.kind.to_weight(self.rotated_weight(layer).to(w.dtype), w))

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, undo: None) -> None:
        w = layer.weight
        W = layer.matrix().double()
        M, N = self.matrices()
        if M is not None:
            W = torch.linalg.solve(M.double(), W, left=False)  # W M^-1
        if N is not None:
            W = torch.linalg.solve(N.double(), W)  # N^-1 W
        w.copy_(layer.kind.to_weight(W.to(w.dtype), w))
