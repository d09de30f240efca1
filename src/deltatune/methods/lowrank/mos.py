"""MoS: LoRA factors assembled from shards of global pools.

*MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards* (Wang et al., ICLR
2025, arXiv:2410.00938). Each row of A (r x d_in) and of Bᵀ (r x d_out) is the concatenation of l shards
(vector sharding) taken from a pool shared by all L layers of that shape:

    A_j = [P^A_{a(j,1)}, …, P^A_{a(j,l)}],   (Bᵀ)_j = [P^B_{b(j,1)}, …, P^B_{b(j,l)}],   y = W0 x + (alpha/r) B A x

Checked against the official code, Forence1999/MoS modules/Tied_LoRA.py (`share_lora_tiedly`,
`LoraLayer_reset_lora_parameters`, `transform_chunks`):
- pools: per projection, (pool_r · L · l) shards of length d_in/l for A and d_out/l for B, so the pools
  hold exactly LoRA's parameters at the equivalent rank pool_r ("valid_param_lora_r");
- shard privatisation: the last private_r · L · l shards are private, layer k owning the l·private_r
  consecutive shards after (pool_r − private_r)·L·l + k·private_r·l; they form A's (and Bᵀ's) last
  private_r rows;
- subset selection: the other (r − private_r)·l shards are a random subset (randperm, no repeats) of the
  shared part, fixed at injection (no learned router in the released code);
- pair dissociation: A and B draw their subsets independently (`lora_pair_mask`, `lora_pair_mask_B`);
- init: A's pool Kaiming-uniform with fan_in = d_in (the full vector, not the shard), B's pool zero, so
  the output at init equals the base; scale alpha / r; the constant `lora_A_vec · lora_A_anti_vec` = 1
  of the code is a no-op and is left out.
Departure: the code keys pools by projection name (q_proj, o_proj…); the engine gives build_shared the
layers, not their names, so here one pool serves all target layers of one (d_out, d_in) shape.
The indices are drawn once from `seed` and saved as buffers (mos_index_A/B); merge is exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import DeltaConfig, register
from ._factored import Factored
from ._sharing import LayerShared, generator
from .lora import adapter_dtype


class MoSConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="rank of each layer's A and B (rows assembled from shards)")
    pool_r: int = Field(2, ge=1, description="equivalent LoRA rank of the pools: P = pool_r (d_in + d_out) per layer")
    private_r: int = Field(1, ge=0, description="rows per layer built from private shards (shard privatisation)")
    shards: int = Field(2, ge=1, description="shards per row vector l (vector sharding)")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    seed: int = Field(0, ge=0, description="seed of the per-layer shard selection")

    @model_validator(mode="after")
    def _ranks(self) -> MoSConfig:
        if not self.private_r <= min(self.pool_r, self.r):
            raise ValueError(f"private_r={self.private_r} must be <= pool_r={self.pool_r} and r={self.r}")
        if self.private_r == self.pool_r and self.r != self.pool_r:
            raise ValueError(f"all pool shards are private (private_r == pool_r = {self.pool_r}), so r must be "
                             f"{self.pool_r}; lower private_r to share shards")
        return self


class MoSPools(LayerShared):
    """Shard pools per layer shape, plus every layer's fixed shard indices (drawn once from the seed)."""

    def __init__(self, config: MoSConfig, layers: Sequence[DeltaLayer]):
        super().__init__(layers)
        self.mos_A, self.mos_B = nn.ParameterDict(), nn.ParameterDict()
        groups: dict[tuple[int, int], list[DeltaLayer]] = defaultdict(list)
        for layer in layers:
            groups[tuple(layer.matrix().shape)].append(layer)
        r, p, n = config.r, config.private_r, config.shards
        gen = generator(config.seed)
        self.__dict__["indices"] = {}
        for (d_out, d_in), members in groups.items():
            if d_in % n or d_out % n:
                raise ValueError(f"MoS shards={n} must divide both sides of a {d_out} x {d_in} layer")
            L, key = len(members), f"{d_out}x{d_in}"
            n_shared = (config.pool_r - p) * L * n  # shared shards come first, then L blocks of p·n private ones
            if (r - p) * n > n_shared:
                raise ValueError(f"MoS needs (r - private_r)·shards = {(r - p) * n} distinct shared shards per layer "
                                 f"but the {L} layer(s) of shape {key} pool only {n_shared}; lower r or raise pool_r")
            kw = {"dtype": adapter_dtype(members[0]), "device": members[0].weight.device}
            bound = 1 / d_in ** 0.5  # Kaiming-uniform (a=√5) with fan_in = d_in, the whole vector
            self.mos_A[key] = nn.Parameter(torch.empty(config.pool_r * L * n, d_in // n, **kw).uniform_(-bound, bound))
            self.mos_B[key] = nn.Parameter(torch.zeros(config.pool_r * L * n, d_out // n, **kw))
            for k, layer in enumerate(members):
                private = n_shared + torch.arange(k * p * n, (k + 1) * p * n)
                pick = [torch.cat([torch.randperm(n_shared, generator=gen)[:(r - p) * n], private]) for _ in "AB"]
                self.indices[id(layer)] = (key, *pick)  # A and B drawn apart: pair dissociation


@register("mos", config=MoSConfig, family="low-rank", formula="pool_r(d_in + d_out) (global pools)",
          paper="arXiv:2410.00938",
          summary="MoS: A and B rows concatenated from fixed random shards of global pools, some shards private")
class MoS(Factored):
    def __init__(self, config: MoSConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: MoSPools | None = None):
        super().__init__(config, layer, shared=shared)
        self.pool, idx_A, idx_B = shared.indices[id(layer)]
        self.register_buffer("mos_index_A", idx_A.to(layer.weight.device))  # (r·l,) rows of the A pool
        self.register_buffer("mos_index_B", idx_B.to(layer.weight.device))  # (r·l,) rows of the B pool
        self.scale = config.alpha / config.r

    @classmethod
    def build_shared(cls, config: MoSConfig, layers: Sequence[DeltaLayer]) -> MoSPools:
        return MoSPools(config, layers)

    def factors(self) -> tuple[Tensor, Tensor]:
        r = self.config.r
        A = self.shared.mos_A[self.pool][self.mos_index_A].reshape(r, -1)  # (r·l, d_in/l) -> (r, d_in)
        B = self.shared.mos_B[self.pool][self.mos_index_B].reshape(r, -1).t()  # (r·l, d_out/l) -> (d_out, r)
        return A, B
