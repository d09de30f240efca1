"""ETHER / ETHER+: Efficient Finetuning of Large-Scale Models with Hyperplane Reflections
(Bini et al., arXiv:2405.20271):

    ETHER:  H  = blockdiag(I - 2 û_i û_iᵀ),                 û = u / ||u||   (a Householder reflection per block)
    ETHER+: H⁺ = blockdiag(I - û_i û_iᵀ + v̂_i v̂_iᵀ)
    side="input": W' = W0 H (y = W0 (H x));  "output": W' = H W0;  "both" (ETHER+ only): W' = H⁺_out W0 H⁺_in

n blocks (n_blocks) split the rotated dimension d into n parts of d/n, each with its own u (and v).
P: ETHER d, ETHER+ 2d (d = d_in or d_out by side), "both" 2(d_in + d_out). H x is applied as x - 2 û (ûᵀx) per
block, never forming H. ETHER is never the identity: ||H - I||_F = 2 per block (2 sqrt(n) in all), H orthogonal
and symmetric; ETHER+ starts at v = -u, so H⁺ = I (Init ΔW = 0).

[verify] items, checked against mwbini/ether, ether-instruct/lit_gpt/ether.py (ETHERLinear):
- side: the default (flip_side=False) multiplies the (out, in) weight on the right, W0 H: the input side;
  flip_side=True puts H on the output side. ETHER+ is one-sided ('etherplus') or two-sided ('etherplusHH',
  H2 over out_features on the left, H over in_features on the right); default here: one-sided input, as the
  code's default. Init: u kaiming-uniform (a=sqrt(5)) on (n, d/n); ETHER+ v = -u.
- block-diagonal: for n > 1 on the input side the official code reshapes the (out, in) weight to
  (n, out, in/n), which groups row chunks rather than column blocks (not blockdiag(H_i) unless n = 1); we
  implement the paper's block-diagonal H (the output-side reshape in the code is a true block split).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import kaiming_uniform_
from ...engine.layer import DeltaLayer
from ...engine.registry import DeltaConfig, register
from ._orthogonal import Orthogonal, block_count


class ETHERConfig(DeltaConfig):
    n_blocks: int = Field(1, ge=1, description="number n of diagonal blocks of H (d must divide by n)")
    side: Literal["input", "output"] = Field("input", description="'input': W0 H, 'output': H W0")


class ETHERPlusConfig(DeltaConfig):
    n_blocks: int = Field(1, ge=1, description="number n of diagonal blocks of H+ (d must divide by n)")
    side: Literal["input", "output", "both"] = Field("input", description="'input': W0 H+, 'output': H+ W0, "
                                                     "'both': H+_out W0 H+_in")


def _unit(u: Tensor) -> Tensor:
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def reflect(z: Tensor, u: Tensor, v: Tensor | None) -> Tensor:
    """Row vectors z (..., n*k) times blockdiag(I - 2ûûᵀ) (v None) or blockdiag(I - ûûᵀ + v̂v̂ᵀ); u, v (n, k)."""
    zb = z.reshape(*z.shape[:-1], *u.shape)  # (..., n, k)
    u = _unit(u)
    if v is None:
        zb = zb - 2 * (zb * u).sum(-1, keepdim=True) * u
    else:
        v = _unit(v)
        zb = zb - (zb * u).sum(-1, keepdim=True) * u + (zb * v).sum(-1, keepdim=True) * v
    return zb.reshape(z.shape)


@register("ether", config=ETHERConfig, family="multiplicative", formula="d_in",
          paper="arXiv:2405.20271", summary="ETHER: a block-diagonal Householder reflection of W0 (P = d)")
class ETHER(Orthogonal):
    plus = False

    def __init__(self, config: ETHERConfig, layer: DeltaLayer, initialize: bool = True, shared=None):
        self.has_in, self.has_out = config.side in ("input", "both"), config.side in ("output", "both")
        super().__init__(config, layer)
        for where, d in (("in", self.d_in), ("out", self.d_out)):
            if getattr(self, f"has_{where}"):
                n, k = block_count(d, 0, config.n_blocks, self.method, f"d_{where}")
                u = torch.empty(n, k, **self.kw)  # (n, d/n)
                if initialize:
                    kaiming_uniform_(u)
                self.register_parameter(f"ether_u_{where}", nn.Parameter(u))
                if self.plus:  # v = -u: H+ = I at init
                    self.register_parameter(f"ether_v_{where}", nn.Parameter(-u.clone()))

    def _map(self, z: Tensor, where: str) -> Tensor:
        return reflect(z, getattr(self, f"ether_u_{where}"), getattr(self, f"ether_v_{where}", None))

    def map_in(self, z: Tensor) -> Tensor:
        return self._map(z, "in")  # H is symmetric: z @ Hᵀ = z @ H

    def map_out(self, h: Tensor) -> Tensor:
        return self._map(h, "out")


@register("ether_plus", config=ETHERPlusConfig, family="multiplicative", formula="2*d_in",
          paper="arXiv:2405.20271", summary="ETHER+: I - ûûᵀ + v̂v̂ᵀ per block, identity at init (P = 2d)")
class ETHERPlus(ETHER):
    plus = True

