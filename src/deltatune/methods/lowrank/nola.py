"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani et al., arXiv:2310.02556), Eq. (3):

    y = W0 x + s · B A x,   A = Σ_{i≤k} α_i A_i,   B = Σ_{j≤l} β_j B_j,   s = alpha / r,

A_i (r x d_in) and B_j (d_out x r) frozen random bases regenerated from a seed; only α (k) and β (l)
train, so P = k + l whatever the rank and width. Checked against the official code (UCDvision/NOLA,
gpt/src/model_nola.py, `GenerateParams`, `NOLALinear`, `LoRA`; llama/peft/tuners/lora.py is the same):
- bases are uniform(-1, 1) scaled by 1/sqrt(number of bases) (`W * (1.0/math.sqrt(num_basis))`);
- every NOLALinear draws its own seed (`torch.randint(int(1e10), (1,))`), so bases differ per layer and
  between A and B: not shared across layers. Here layer n of an adapter draws from a CPU generator seeded
  by (seed, n) (`_sharing.generator`), so the adapter stores one seed and is device-independent;
- BOTH α and β start at zero (`reset_lora_parameters`). Training still starts because the official A is
  `NOLALinear`'s own frozen weight plus the mixture: A = A0 + Σ α_i A_i, with A0 re-initialised
  Kaiming-uniform(a=sqrt(5)) like LoRA's A and frozen, while B's frozen weight is zero. So ΔW = 0 at
  init and dL/dβ ≠ 0. A0 is kept (drawn from the same seed, a frozen offset, not a trained parameter);
- scale alpha / rank (`LoRA.scale`); the GPT-2 E2E scripts use rank 8, alpha 8, 512 bases each for A and B.
The bases are non-persistent buffers: memory (k r d_in + l d_out r) floats per layer, not the official
regenerate-in-backward autograd Function; forward mixes the two small factors and applies them to x.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import DeltaConfig, register
from ._factored import Factored
from ._sharing import LayerShared, generator
from .lora import adapter_dtype, check_rank


class NOLAConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="rank of the mixed factors A (r x d_in), B (d_out x r)")
    k: int = Field(512, ge=1, description="number of random bases (and trained coefficients) for A")
    l: int = Field(512, ge=1, description="number of random bases (and trained coefficients) for B")  # noqa: E741
    alpha: float = Field(8.0, gt=0, description="scale numerator: s = alpha / r")
    seed: int = Field(0, ge=0, description="seed of the random bases (layer n uses the stream (seed, n))")


@register("nola", config=NOLAConfig, family="low-rank", formula="k + l", paper="arXiv:2310.02556",
          summary="NOLA: LoRA factors as trained mixtures of frozen random bases regenerated from a seed")
class NOLA(Factored):
    def __init__(self, config: NOLAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: LayerShared | None = None):
        super().__init__(config, layer, shared=shared)
        d_out, d_in = check_rank(config.r, layer, self.method, warn_for=config)
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = config.alpha / config.r
        g = generator(config.seed, shared.position(layer))
        r, n_a, n_b = config.r, config.k, config.l
        bases_A = torch.empty(n_a, r, d_in).uniform_(-1, 1, generator=g) / math.sqrt(n_a)  # (k, r, d_in)
        bases_B = torch.empty(n_b, d_out, r).uniform_(-1, 1, generator=g) / math.sqrt(n_b)  # (l, d_out, r)
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) of an (r, d_in) matrix
        A0 = torch.empty(r, d_in).uniform_(-bound, bound, generator=g)
        self.register_buffer("nola_bases_A", bases_A.flatten(1).to(**kw), persistent=False)  # (k, r*d_in)
        self.register_buffer("nola_bases_B", bases_B.flatten(1).to(**kw), persistent=False)  # (l, d_out*r)
        self.register_buffer("nola_A0", A0.to(**kw), persistent=False)  # (r, d_in)
        self.nola_alpha = nn.Parameter(torch.zeros(n_a, **kw))
        self.nola_beta = nn.Parameter(torch.zeros(n_b, **kw))
        self.shape = (d_out, d_in)

    @classmethod
    def build_shared(cls, config: NOLAConfig, layers: list[DeltaLayer]) -> LayerShared:
        return LayerShared(layers)  # only each layer's position (its seed stream); no tensors

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A (r, d_in), B (d_out, r)): the mixtures of the bases, never a d_out x d_in matrix."""
        (d_out, d_in), r = self.shape, self.config.r
        A = self.nola_A0 + (self.nola_alpha @ self.nola_bases_A).view(r, d_in)
        B = (self.nola_beta @ self.nola_bases_B).view(d_out, r)
        return A, B
