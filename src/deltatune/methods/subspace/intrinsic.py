"""Intrinsic-dimension training (Li et al., arXiv:1804.08838) and SAID (Aghajanyan et al., arXiv:2012.13255):

    intrinsic:  θ = θ0 + M θ_d,                      θ_d ∈ R^d trained, M (D x d) fixed and random,
    said:       θ_i = θ0_i + λ_i (M θ_d)_i,          plus one trained scalar λ_i per targeted layer i,

over the D entries of the targeted weights, θ_d = 0 at init (so the model starts as the base). θ_d is one
adapter-wide tensor (`build_shared`); layer i's ΔW_i is the reshape of its block M_i θ_d, M_i (D_i x d).
Each layer draws its own block from a CPU generator seeded by (seed, its position among the adapter's layers),
so M is never saved: a checkpoint holds θ_d, the λ_i and the seed.

Checked against the authors' code (Aghajanyan's `intrinsic` module as vendored in r-three/t-few
`src/models/intrinsic.py`, whose commented-out `DD = np.prod(v0.size())` lines are the original; t-few's own
rank-1 variant is not followed): it projects each parameter tensor separately, with its own Fastfood variables
sized to that tensor (`fastfood_vars(DD)`), all from the one intrinsic vector; so M is block-structured per
tensor, not one transform over the concatenated D (no chunking).
We do the same per targeted layer: it is what the paper trains, needs no cross-layer state in a forward, and
costs O(D_i log D_i) per layer. Fastfood block (Le et al. 2013), as that code builds it:

    M_i = s · [H G Π H B]_{1:D_i, 1:d},   L = 2^ceil(log2 max(D_i, d)),   θ_d zero-padded to L,

B = diag(±1), Π a random permutation ((Π v)_k = v_{π(k)}), G = diag(N(0, 1)), H the L x L Walsh-Hadamard matrix
(entries ±1, computed by a fast transform), and S = s·I with s = 1 / (||G|| sqrt(D_i)): the code's divisor
sqrt(L ||G||²) · sqrt(D_i / L), which makes every column of M_i about unit length. (Fastfood's diagonal S of
chi-distributed row scales is not in that code either.) Dense: M_i ~ N(0, 1) with each column scaled to unit
length (Li et al.; the vendored code leaves its dense R unnormalised, a TODO there), D_i·d floats per layer.
SAID's λ_i start at 1, as in that code. Count: intrinsic P = d; said P = d + number of targeted layers (the
authors' code instead shrinks θ_d so that the λ fit inside d).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank._sharing import LayerShared, generator
from ..lowrank.lora import adapter_dtype

DENSE_LIMIT = 2**27  # entries of one layer's dense block (512 MiB in fp32): past it, Fastfood is the way


class IntrinsicConfig(DeltaConfig):
    d: int = Field(1000, ge=1, description="subspace dimension: the length of the trained vector θ_d")
    projection: Literal["fastfood", "dense"] = Field(
        "fastfood", description="M: 'fastfood' (S H G Π H B, O(D) memory, O(D log D) time) or 'dense' Gaussian "
        "with unit columns (D·d memory: small models only)")
    seed: int = Field(0, ge=0, description="seed of M (layer n draws its block from the stream (seed, n))")


class SAIDConfig(IntrinsicConfig):
    pass


def hadamard(m: int, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """The m x m Walsh-Hadamard matrix in Sylvester order (entries ±1), m a power of two."""
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < m:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


_HADAMARD: dict[tuple[int, torch.dtype, Any], Tensor] = {}
BLOCK_BITS = 6  # H_L = H_64 ⊗ H_64 ⊗ ...: a few batched 64 x 64 matmuls, not log2(L) tiny butterfly passes


def fwht(x: Tensor) -> Tensor:
    """The unnormalised Walsh-Hadamard transform H x along the last dim (a power of two L), in O(L log L).

    H_L is the Kronecker product of small Hadamard matrices over groups of index bits, so each group is one
    batched matmul with H_m (m <= 64): ceil(log2 L / 6) ops of 64 L multiply-adds each. Fewer, larger ops than
    the log2 L butterfly passes matter on a shared CPU, where every small op pays a thread wake-up."""
    n, lead = x.shape[-1], x.shape[:-1]
    bits = n.bit_length() - 1
    if n != 1 << bits:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    y, post = x.reshape(-1, n), 1
    while post < n:
        m = min(1 << BLOCK_BITS, n // post)
        k = (m, x.dtype, x.device)
        if k not in _HADAMARD:
            _HADAMARD[k] = hadamard(m, x.dtype, x.device)
        H = _HADAMARD[k]  # symmetric: the lowest bits are one GEMM from the right, the others batched from the left
        y = y.reshape(-1, m) @ H if post == 1 else torch.matmul(H, y.reshape(-1, m, post))
        post *= m
    return y.reshape(*lead, n)


class Subspace(LayerShared):
    """The adapter's θ_d (d, zeros) and each target layer's position (its seed stream)."""

    def __init__(self, config: IntrinsicConfig, layers: list[DeltaLayer]):
        super().__init__(layers)
        kw = {"dtype": adapter_dtype(layers[0]), "device": layers[0].weight.device}
        self.theta_d = nn.Parameter(torch.zeros(config.d, **kw))


@register("intrinsic", config=IntrinsicConfig, family="subspace", formula="d (one θ_d for all layers)",
          paper="arXiv:1804.08838", summary="intrinsic dimension: θ = θ0 + M θ_d, M fixed random (Fastfood or dense)")
class Intrinsic(Delta):
    def __init__(self, config: IntrinsicConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: Subspace | None = None):
        super().__init__(config, layer, shared=shared)
        self.shape = tuple(layer.matrix().shape)
        D, d = math.prod(self.shape), config.d
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        g = generator(config.seed, shared.position(layer))
        if config.projection == "dense":
            if D * d > DENSE_LIMIT:
                raise ValueError(f"{self.method}: a dense projection for '{layer.path}' holds D·d = {D}·{d} = "
                                 f"{D * d:,} floats; use projection='fastfood' (O(D) memory) or a smaller d")
            M = torch.randn(D, d, generator=g)
            self.register_buffer("M", (M / M.norm(dim=0)).to(**kw), persistent=False)  # unit columns
        else:
            L = 1 << (max(D, d) - 1).bit_length()  # the next power of two >= max(D, d)
            B = torch.randint(0, 2, (L,), generator=g) * 2 - 1
            perm = torch.randperm(L, generator=g)
            G = torch.randn(L, generator=g)
            self.register_buffer("ff_B", B.to(**kw), persistent=False)
            self.register_buffer("ff_perm", perm.to(kw["device"]), persistent=False)
            self.register_buffer("ff_G", G.to(**kw), persistent=False)
            self.ff_scale = 1.0 / (G.norm().item() * math.sqrt(D))

    @classmethod
    def build_shared(cls, config: IntrinsicConfig, layers: list[DeltaLayer]) -> Subspace:
        return Subspace(config, list(layers))

    def projected(self) -> Tensor:
        """M_i θ_d, this layer's D_i entries of the update, flat."""
        theta = self.shared.theta_d
        if self.config.projection == "dense":
            return self.M @ theta
        D, L = math.prod(self.shape), self.ff_B.numel()
        x = nn.functional.pad(theta, (0, L - theta.numel())) * self.ff_B  # B θ_d
        x = fwht(x)[self.ff_perm] * self.ff_G  # G Π H B θ_d
        return fwht(x)[:D] * self.ff_scale  # S H (...), first D_i rows

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.projected().view(self.shape)


@register("said", config=SAIDConfig, family="subspace", formula="d + 1 per layer (θ_d shared, one λ per layer)",
          paper="arXiv:2012.13255", summary="SAID: θ_i = θ0_i + λ_i (M θ_d)_i, a trained scale per layer")
class SAID(Intrinsic):
    def __init__(self, config: SAIDConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: Subspace | None = None):
        super().__init__(config, layer, initialize, shared)
        self.said_lambda = nn.Parameter(torch.ones(1, dtype=adapter_dtype(layer), device=layer.weight.device))

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.said_lambda * super().delta_weight(layer)
