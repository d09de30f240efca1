"""BOFT: Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization (Liu et al., arXiv:2311.06243):

    W' = diag(s) · W0 · Gᵀ,   G = B_m ... B_1,   B_k = P_k · blockdiag(R_k1 .. R_kn) · P_kᵀ,   R = Cayley(Q)

m = n_butterfly_factor butterfly factors, each n = d_in/b Cayley-orthogonal b x b blocks behind the butterfly
permutation P_k (P_1 = I; m = 1 is block-diagonal OFT), so G is a dense orthogonal d_in x d_in matrix; s (d_out)
is BOFT's magnitude scale (init 1). In activation space x is permuted, rotated block by block and permuted back
m times, then the base layer runs; G is never formed on Linear / Conv1D. Init Q = 0: Init ΔW = 0.

[verify] items, checked against the installed peft 0.21.2 (tuners/boft/config.py, layer.py):
- blocks are stored full (`boft_R`, (m, n, b, b)) with Q = (A - Aᵀ)/2 and R = (I - Q)(I + Q)^-1 (exact solve);
  `boft_s` (d_out, 1) on Linear, (1, d_out) on Conv2d, scales the output rows; merge W' = (G Wᵀ)ᵀ · s;
  forward x @ G on row vectors.
- P_k: PEFT's block_butterfly_perm(d, n / 2^k, b / 2, m - 1): within groups of d·2^k/n features, chunks of b/2
  are reordered evens-then-odds; P[i, perm[i]] = 1. Reimplemented in `butterfly_perm` (test: equals PEFT's).
- defaults: boft_block_size=4, boft_block_num=0, boft_n_butterfly_factor=1, as here.
- PEFT forces n_butterfly_factor to 1 when its CUDA extension is missing (e.g. on CPU); deltatune does not.
P = m·d_in·b + d_out as stored (PEFT's layout; the paper's count of free parameters is m·d_in(b-1)/2 + d_out).
Several active unmerged adapters compose as merging them in order does, N_b N_a W0 M_a M_b, which is also
PEFT's forward with several active BOFT adapters (tested).
Deviations: boft_dropout (multiplicative block dropout) is not implemented; conv forward is the merged kernel.
PEFT export covers what PEFT's boft adapts, Linear and Conv2d with a square kernel and groups=1; other layers
(Conv1d/3d, GPT-2 Conv1D) are refused there.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ._orthogonal import Orthogonal, block_apply, block_count, cayley


class BOFTConfig(DeltaConfig):
    block_size: int = Field(4, ge=0, description="size b of each orthogonal block; 0: use block_num")
    block_num: int = Field(0, ge=0, description="number of blocks per factor instead of block_size")
    n_butterfly_factor: int = Field(1, ge=1, description="butterfly factors m (1 = block-diagonal OFT)")


def butterfly_perm(d: int, groups: int, half: int) -> Tensor:
    """Within each of `groups` equal groups, chunks of `half` features go evens first, then odds."""
    g = d // groups
    chunks = torch.arange(g).view(g // half, half)  # (chunks, half)
    order = torch.cat([chunks[0::2], chunks[1::2]]).flatten()
    return (torch.arange(0, d, g)[:, None] + order).flatten()  # (d,)


@register("boft", config=BOFTConfig, family="multiplicative", formula="m*d_in*b + d_out",
          paper="arXiv:2311.06243", summary="BOFT: a butterfly product of block-diagonal Cayley rotations, scaled")
class BOFT(Orthogonal):
    has_out = True
    composes = True

    def __init__(self, config: BOFTConfig, layer: DeltaLayer, initialize: bool = True, shared=None):
        super().__init__(config, layer)
        self.n, self.b = block_count(self.d_in, config.block_size, config.block_num, "BOFT")
        m = config.n_butterfly_factor
        if m > 1 and (self.n % 2 ** (m - 1) or self.b % 2 or self.n % 2):
            raise ValueError(f"BOFT: n_butterfly_factor={m} needs an even block size and a block count divisible "
                             f"by 2^{m - 1}; d_in={self.d_in} gives {self.n} blocks of size {self.b}")
        perms = [butterfly_perm(self.d_in, self.n // 2 ** k, self.b // 2) if m > 1 else torch.arange(self.d_in)
                 for k in range(m)]
        self.register_buffer("perm", torch.stack(perms).to(self.kw["device"]), persistent=False)  # (m, d_in)
        self.register_buffer("inv_perm", self.perm.argsort(1), persistent=False)
        self.boft_R = nn.Parameter(torch.zeros(m, self.n, self.b, self.b, **self.kw))  # (m, n, b, b)
        self.boft_s = nn.Parameter(torch.ones(self.d_out, **self.kw))  # (d_out,)

    def blocks(self) -> Tensor:
        A = self.boft_R.flatten(0, 1)  # (m n, b, b)
        return cayley((A - A.transpose(1, 2)) / 2).view_as(self.boft_R)

    def map_in(self, z: Tensor) -> Tensor:
        # x @ G = x @ B_m @ ... @ B_1, and x @ (P R Pᵀ) = (x[..., P⁻¹] @ R)[..., P]
        R = self.blocks()
        for k in reversed(range(R.shape[0])):
            z = block_apply(z[..., self.inv_perm[k]], R[k])[..., self.perm[k]]
        return z

    def map_out(self, h: Tensor) -> Tensor:
        return h * self.boft_s


def _export(dm, adapter):
    cfg = adapter.config
    tensors = {}
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        base = layer.base_layer
        conv = isinstance(base, nn.Conv2d)
        if not (conv or isinstance(base, nn.Linear)) or conv and (base.groups > 1 or len(set(base.kernel_size)) > 1):
            raise ValueError(f"PEFT's boft cannot hold '{p}' ({type(base).__name__}); it adapts Linear and Conv2d "
                             "with a square kernel and groups=1. Save with DeltaModel.save instead")
        delta = layer.deltas[adapter.name]
        # PEFT keeps boft_s as (d_out, 1) on Linear but (1, d_out) on Conv2d
        tensors[f"{p}.boft_R"] = delta.boft_R
        tensors[f"{p}.boft_s"] = delta.boft_s[None] if conv else delta.boft_s[:, None]
    return {"boft_block_size": cfg.block_size, "boft_block_num": cfg.block_num,
            "boft_n_butterfly_factor": cfg.n_butterfly_factor, "boft_dropout": 0.0, "bias": "none",
            "init_weights": True, "fan_in_fan_out": False}, tensors


def _load(dm, pc, tensors, path):
    if pc.get("bias", "none") != "none":
        raise ValueError(f"PEFT BOFT adapter at '{path}' trains bias={pc['bias']!r}; deltatune imports 'none'")
    per_layer = layer_tensors(tensors, {"boft_R": "R", "boft_s": "s"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    config = make_config("boft", block_size=pc.get("boft_block_size", 4), block_num=pc.get("boft_block_num", 0),
                         n_butterfly_factor=pc.get("boft_n_butterfly_factor", 1), targets=sorted(per_layer))
    state = {}
    for p, parts in per_layer.items():
        state[f"{p}.boft_R"], state[f"{p}.boft_s"] = parts["R"], parts["s"].reshape(-1)
    return config, state


register_peft(PeftCodec("BOFT", ("boft",), _export, _load))
