"""Shared machinery of the orthogonal-family deltas (OFT, BOFT, ETHER): W' = N · W0 · M.

A subclass gives the input-side map `map_in(z) = z @ Mᵀ` (z: (..., d_in) row vectors, so y = W0 (M x)) and/or
the output-side map `map_out(h) = h @ Nᵀ`, in activation space. This base turns them into:
- forward on Linear / GPT-2 Conv1D: rotate x, run the base layer, then map its linear part (never forms W0 M);
- forward on Conv: the flattened input dimension mixes kernel positions, so no activation form exists; the
  rotated kernel N W0 M (the layer's own size) is used instead;
- on Embedding (only where a subclass sets adapts_embedding): the output side alone, N = the subclass's map;
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


# --- stacking: several unmerged multiplicative deltas on one layer (Delta.composes) -----------------------------
# The engine chains the active deltas, out = d(layer, x, out), in merge order. Merging d_1 .. d_k in turn gives
# W_k = N_k W_(k-1) M_k: the layer so far with d_k's maps around it. So an output-side map transforms the
# chain's `out`, and an input-side map must run the layer so far (d_1 .. d_(k-1)) on its own input M_k x,
# which is what `earlier` does. Output maps therefore apply in chain order and input maps in reverse.

def preceding(layer: DeltaLayer, delta: Delta) -> list[Delta]:
    """The unmerged deltas that this forward of `layer` chains before `delta` (none in a mixed-adapter batch,
    where each row group sees its own adapter alone)."""
    if layer.route is not None:
        return []
    pending = [layer.deltas[n] for n in layer.active if n not in layer.merged]
    i = next((i for i, d in enumerate(pending) if d is delta), 0)
    return pending[:i]


def earlier(layer: DeltaLayer, delta: Delta, x: Tensor) -> Tensor:
    """The layer so far (the base layer with the deltas before `delta` applied) on input x.

    A delta that ignores `out` (uses_base_output False: an input-side map) re-runs the ones before it, so
    the chain starts at the last such delta: each input-side delta in a stack costs one base-layer run."""
    chain = preceding(layer, delta)
    start = max((i for i, d in enumerate(chain) if not d.uses_base_output), default=0)
    out = layer.base_layer(x) if not chain or chain[start].uses_base_output else None
    for d in chain[start:]:
        out = d(layer, x, out)
    return out


def folded(layer: DeltaLayer, delta: Delta) -> Tensor:
    """The (d_out x d_in) weight of the layer so far: W0 with the deltas before `delta` merged in turn."""
    W = layer.matrix()
    for d in preceding(layer, delta):
        if d.composes:
            W = d.fold(layer, W)
        elif d.additive:
            try:
                W = W + d.delta_weight(layer).to(W.dtype)
            except TypeError:
                raise ValueError(f"cannot stack {delta.method} after {d.method} on '{type(layer.base_layer).__name__}'"
                                 f": {d.method} has no weight form; merge it first or activate {delta.method} first"
                                 ) from None
    return W


class Orthogonal(Delta):
    """W' = N W0 M with M from `map_in`, N from `map_out` (subclasses set has_in / has_out)."""

    additive = False
    has_in = True
    has_out = False
    # True: on a stock linear layer with at least d_in tokens, rotate the weight once (W0 M) instead of every
    # token, for maps made of many small memory-bound ops (GOFT's log2(d) gather-rotate-scatter levels)
    weight_form = False
    # True: on nn.Embedding (whose input side is token ids) apply the rotation to the output features (map_out)
    adapts_embedding = False

    def __init__(self, config, layer: DeltaLayer, initialize: bool = True, shared=None):
        super().__init__(config, layer)
        if layer.kind is EMBEDDING:
            if not self.adapts_embedding:
                raise ValueError(f"{self.method} does not adapt nn.Embedding layers (their input side is token ids); "
                                 "exclude them")
            self.has_in, self.has_out = False, True
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

    def fold(self, layer: DeltaLayer, W: Tensor) -> Tensor:
        """N W M: the matrix W (d_out x d_in) with this delta merged in."""
        M, N = self.matrices()
        W = W.to(self.kw["dtype"])
        W = W @ M if M is not None else W
        return N @ W if N is not None else W

    def rotated_weight(self, layer: DeltaLayer) -> Tensor:
        return self.fold(layer, layer.matrix())

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.rotated_weight(layer) - layer.matrix().to(self.kw["dtype"])

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor | None) -> Tensor:
        stacked = bool(preceding(layer, self))
        if (self.weight_form and not stacked and not self.has_out and layer.kind is LINEAR and layer.stock
                and x.numel() >= self.d_in * self.d_in):  # at least d_in tokens
            return F.linear(x, self.rotated_weight(layer).to(x.dtype), layer.base_layer.bias)
        if layer.kind is CONV:  # out = conv(x, W) + b for the layer so far, W = W0 unless stacked
            W = folded(layer, self) if stacked else layer.matrix()
            dW = self.fold(layer, W) - W.to(self.kw["dtype"])
            return out + layer.apply_matrix(x, dW.to(x.dtype)).to(out.dtype)
        h = self.map_in(x.to(self.kw["dtype"])).to(x.dtype) if self.has_in else x
        y = earlier(layer, self, h) if self.has_in else out
        if not self.has_out:
            return y
        bias = getattr(layer.base_layer, "bias", None)
        if layer.kind is EMBEDDING:
            lin = y  # no bias
        elif stacked:  # the layer so far is affine in its input: its value at 0 is its (possibly changed) bias
            lin = y - earlier(layer, self, torch.zeros_like(h))
        elif layer.stock:
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
