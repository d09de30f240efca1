"""OFT: Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu et al., arXiv:2306.07280), Eq. (2-3):

    W' = W0 · Gᵀ,   G = blockdiag(R_1 .. R_n),   R_i = Cayley(Q_i),   Q_i = -Q_iᵀ (s x s, n·s = d_in)

i.e. y = W0 (Gᵀ x): the input is rotated block by block (x_b -> x_b R_i as row vectors), then the base layer
runs; W0 Gᵀ is never formed on Linear / GPT-2 Conv1D. Q_i is stored as its s(s-1)/2 strict upper-triangle
entries (`oft_R`, (n, s(s-1)/2), zeros: R = I, Init ΔW = 0). P = n·s(s-1)/2 = d_in(s-1)/2 (block_share: s(s-1)/2).
COFT (constrained OFT, paper Sec. 3.2): before each use Q_i is projected onto ||Q_i||_F <= eps/sqrt(n), or
onto ||Q||_F <= eps with block_share (one stored block: PEFT's _project_batch divides by the stored count).

[verify] items, checked against the installed peft 0.21.2 (tuners/oft/config.py, layer.py):
- side: PEFT merges W' = (G Wᵀ)ᵀ = W Gᵀ and its forward is x @ G on row vectors: the input side, as here.
- Cayley: exact R = (I - Q)(I + Q)^-1 (`torch.linalg.solve(I + Q, I - Q, left=False)`); the default
  `use_cayley_neumann=True, num_cayley_neumann_terms=5` is a truncated series of (I + Q)(I - Q)^-1 (the
  transpose). Our default is the exact transform (exactly orthogonal, as the paper); `neumann_terms=5` gives
  PEFT's default bit for bit. Defaults oft_block_size=32, r=0, eps=6e-5, coft/block_share off, as PEFT.
On nn.Embedding (a (dim x num) map from one-hot ids, engine/kinds.py) the rotation acts on the output features,
as PEFT's OFT Embedding: y = E[x] @ G (row vectors), merge E <- E G, the blocks splitting embedding_dim; PEFT's
key there is `oft_embedding_R.weight`.
Several active unmerged adapters (`set_active([a, b])`, also with BOFT, IA3 or LoRA on the layer) compose as
merging them in that order does: W0 M_a M_b, so b's rotation meets x first (see _orthogonal.py). PEFT merges
the same way, but its unmerged forward rotates x by a first (W0 M_b M_a): PEFT's active [a, b] unmerged is
deltatune's [b, a] (tested).
Deviations: a block size that does not divide d_in is an error (PEFT silently picks a nearby divisor);
PEFT's multiplicative module_dropout is not implemented; on Conv layers PEFT rotates unfolded patches and
folds them back (not equal to its own merged conv), here the forward is the merged kernel W0 Gᵀ exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import CONV1D, EMBEDDING
from ...engine.layer import DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ._orthogonal import Orthogonal, block_apply, block_count, cayley, skew


class OFTConfig(DeltaConfig):
    block_size: int = Field(32, ge=0, description="size s of each orthogonal block (s · r = d_in); 0: use r")
    r: int = Field(0, ge=0, description="number of blocks r instead of block_size (set block_size=0)")
    coft: bool = Field(False, description="constrained OFT: keep ||Q_i||_F <= eps / sqrt(r) "
                       "(eps with block_share: one stored block)")
    eps: float = Field(6e-5, gt=0, description="COFT radius")
    block_share: bool = Field(False, description="one block shared by all r blocks")
    neumann_terms: int = Field(0, ge=0, description="0: exact Cayley; k > 0: PEFT's k-term Cayley-Neumann series")


@register("oft", config=OFTConfig, family="multiplicative", formula="d_in*(b-1)/2",
          paper="arXiv:2306.07280", summary="OFT: W0 rotated on the input side by block-diagonal Cayley blocks")
class OFT(Orthogonal):
    adapts_embedding = True
    composes = True

    def __init__(self, config: OFTConfig, layer: DeltaLayer, initialize: bool = True, shared=None):
        super().__init__(config, layer)
        d, what = (self.d_out, "embedding_dim") if layer.kind is EMBEDDING else (self.d_in, "d_in")
        self.n, self.s = block_count(d, config.block_size, config.r, "OFT", what)
        rows = 1 if config.block_share else self.n
        self.oft_R = nn.Parameter(torch.zeros(rows, self.s * (self.s - 1) // 2, **self.kw))  # (n, s(s-1)/2)

    @torch.no_grad()
    def _project(self) -> None:
        """COFT: scale Q_i back onto the Frobenius ball of radius eps/sqrt(stored blocks) (PEFT's _project_batch):
        eps/sqrt(n), or eps when the n blocks share one."""
        Q = skew(self.oft_R, self.s)
        eps = self.config.eps / self.oft_R.shape[0] ** 0.5
        norm = torch.linalg.matrix_norm(Q).clamp_min(1e-30)[:, None]
        self.oft_R.copy_(torch.where(norm <= eps, self.oft_R, self.oft_R * (eps / norm)))

    def blocks(self) -> Tensor:
        """The rotation blocks R_i, (n, s, s)."""
        if self.config.coft:
            self._project()
        R = cayley(skew(self.oft_R, self.s), self.config.neumann_terms)
        return R.expand(self.n, -1, -1) if self.config.block_share else R

    def map_in(self, z: Tensor) -> Tensor:
        return block_apply(z, self.blocks())

    map_out = map_in  # used on nn.Embedding only: the same block rotation of the output features


def _export(dm, adapter):
    cfg = adapter.config
    layers = [dm.model.get_submodule(p) for p in adapter.paths]
    key = lambda layer: "oft_embedding_R.weight" if layer.kind is EMBEDDING else "oft_R.weight"  # noqa: E731
    tensors = {f"{p}.{key(layer)}": layer.deltas[adapter.name].oft_R for p, layer in zip(adapter.paths, layers)}
    return {"r": cfg.r, "oft_block_size": cfg.block_size, "coft": cfg.coft, "eps": cfg.eps,
            "block_share": cfg.block_share, "module_dropout": 0.0, "bias": "none", "init_weights": True,
            "use_cayley_neumann": cfg.neumann_terms > 0, "num_cayley_neumann_terms": cfg.neumann_terms or 5,
            "fan_in_fan_out": any(layer.kind is CONV1D for layer in layers),
            # PEFT reads a Cayley-Neumann adapter without peft_version as pre-0.18 (an older series) and warns
            **({"peft_version": "0.21.2"} if cfg.neumann_terms else {})}, tensors


def _load(dm, pc, tensors, path):
    if pc.get("bias", "none") != "none":
        raise ValueError(f"PEFT OFT adapter at '{path}' trains bias={pc['bias']!r}; deltatune imports 'none'")
    per_layer = layer_tensors(tensors, {"oft_R.weight": "R", "oft_embedding_R.weight": "R"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    neumann = pc.get("num_cayley_neumann_terms", 5) if pc.get("use_cayley_neumann", True) else 0
    config = make_config("oft", block_size=pc.get("oft_block_size", 0), r=pc.get("r", 0), coft=pc.get("coft", False),
                         eps=pc.get("eps", 6e-5), block_share=pc.get("block_share", False),
                         neumann_terms=neumann, targets=sorted(per_layer))
    return config, {f"{p}.oft_R": parts["R"] for p, parts in per_layer.items()}


register_peft(PeftCodec("OFT", ("oft",), _export, _load))
