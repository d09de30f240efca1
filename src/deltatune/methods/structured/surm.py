"""SURM: circulant and Toeplitz weight deltas, applied with the FFT.

Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning (Sehanobish et al.,
arXiv:2406.17740), the LoRA-style use (structured ΔW added to W0):
    y = W0 x + alpha · S x,  S a p x q grid of n x n blocks, d_out = p·n, d_in = q·n, n = block_size
    circulant block:  S_ij = c_{(i-j) mod n}           (n parameters; S x = irfft(rfft(c)·rfft(x)))
    Toeplitz block:   S_ij = t_{i-j}, i-j in (-n, n)   (2n-1 parameters; the FFT of its 2n circulant embedding)
    P = p·q·n (circulant) / p·q·(2n-1) (Toeplitz); a square layer with the default block = d: P = d / 2d-1.
Every vector starts at zero, so ΔW = 0 at step 0 (the gradient w.r.t. the vector is not zero: ΔW is linear in it).

[verify] checks, against the authors' code (repository README "Structured Matrices for Parameter Efficient
Fine-tuning (PEFT)", files lora/circulant_lora.py, lora/toeplitz_lora.py, utils/utils.py; read, not copied):
- Where the matrix goes: LoRA-style, y = W0 x + alpha·S x with alpha a fixed scalar (circ_alpha/toep_alpha,
  default 1, optionally trainable from 0), applied with FFT matvecs; adapter/ variants put SURMs in adapter
  projections instead (not implemented here).
- Rectangular layers: not handled there (`assert in_features == out_features`; BERT's q/v are square). Tiling
  square blocks (block-circulant / block-Toeplitz) is this library's choice, not the paper's; block_size
  defaults to gcd(d_out, d_in), which is the paper's single d x d matrix on square layers.
- Init: their circulant default is S = C(c_B ⊙ c_A), c_A ~ N(0, 1), c_B = 0 (P = 2d), and their comment says
  this differs from the paper; their `use_prod=False, init_zero=True` option is the single zero vector used
  here (P = d). Their Toeplitz LoRA is T(b)·T(a) with T symmetric (first row = first column), a ~ N(0, 0.02),
  b = 0 (P = 2d); here a single general Toeplitz block, zero at start (P = 2n-1), as in the catalogue.
Forward: Linear / GPT-2 Conv1D take the FFT path and never form S; conv and embedding layers materialise S.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import LINEAR_KINDS
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ..lowrank.lora import adapter_dtype


class SURMConfig(DeltaConfig):
    alpha: float = Field(1.0, gt=0, description="fixed scale of ΔW (the paper's circ_alpha / toep_alpha, default 1)")
    block_size: int | None = Field(None, ge=1, description="n: side of each square block; must divide d_out and "
                                   "d_in (None: gcd(d_out, d_in), one d x d block on a square layer)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")


class SURM(Delta):
    """Shared math: p x q blocks, each a structured n x n matrix given by one vector (surm_v[i, j])."""

    fft_factor = 1  # FFT length = fft_factor · n

    def __init__(self, config: SURMConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        d_out, d_in = layer.matrix().shape
        n = config.block_size or math.gcd(d_out, d_in)
        if d_out % n or d_in % n:
            raise ValueError(f"{self.method} block_size={n} must divide both sides of the layer ({d_out} x {d_in}, "
                             f"{type(layer.base_layer).__name__}); use a divisor of gcd = {math.gcd(d_out, d_in)}")
        self.n, self.p, self.q = n, d_out // n, d_in // n
        self.surm_v = nn.Parameter(torch.zeros(self.p, self.q, self.vector_len(n), dtype=adapter_dtype(layer),
                                               device=layer.weight.device))  # zero: ΔW = 0 at step 0

    @staticmethod
    def vector_len(n: int) -> int:
        raise NotImplementedError

    def index(self) -> Tensor:
        """(n, n) indices into a block's vector: block[i, j] = v[index[i, j]]."""
        raise NotImplementedError

    def first_column(self) -> Tensor:
        """(p, q, fft_factor·n) first column of each block's circulant (embedding)."""
        raise NotImplementedError

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        blocks = self.surm_v[..., self.index()]  # (p, q, n, n)
        return self.config.alpha * blocks.permute(0, 2, 1, 3).reshape(self.p * self.n, self.q * self.n)

    def change(self, layer: DeltaLayer, h: Tensor) -> Tensor:
        if not (layer.kind in LINEAR_KINDS and layer.stock):
            return super().change(layer, h)  # conv / embedding / custom forward: materialises ΔW
        L = self.fft_factor * self.n
        X = torch.fft.rfft(h.reshape(*h.shape[:-1], self.q, self.n), n=L)  # (..., q, L/2+1)
        F = torch.fft.rfft(self.first_column(), n=L)  # (p, q, L/2+1)
        Y = torch.einsum("pqf,...qf->...pf", F, X)  # sum over input blocks, per frequency
        y = torch.fft.irfft(Y, n=L)[..., : self.n].reshape(*h.shape[:-1], self.p * self.n)  # (..., d_out)
        return self.config.alpha * y


class CirculantConfig(SURMConfig):
    """Options of `circulant` (one config class per registered method)."""


class ToeplitzConfig(SURMConfig):
    """Options of `toeplitz`."""


@register("circulant", config=CirculantConfig, family="structured", formula="d_out*d_in/n (n = block_size; square: d)",
          paper="arXiv:2406.17740", summary="SURM circulant: ΔW = alpha · block-circulant matrix, FFT forward")
class Circulant(SURM):
    @staticmethod
    def vector_len(n: int) -> int:
        return n

    def index(self) -> Tensor:
        i = torch.arange(self.n, device=self.surm_v.device)
        return (i[:, None] - i[None, :]) % self.n  # C_ij = c_{(i-j) mod n}

    def first_column(self) -> Tensor:
        return self.surm_v


@register("toeplitz", config=ToeplitzConfig, family="structured",
          formula="(d_out/n)*(d_in/n)*(2n-1) (n = block_size; square: 2d-1)",
          paper="arXiv:2406.17740", summary="SURM Toeplitz: ΔW = alpha · block-Toeplitz matrix, FFT forward")
class Toeplitz(SURM):
    fft_factor = 2

    @staticmethod
    def vector_len(n: int) -> int:
        return 2 * n - 1  # v[k + n - 1] = t_k, k = i - j in -(n-1) .. n-1

    def index(self) -> Tensor:
        i = torch.arange(self.n, device=self.surm_v.device)
        return i[:, None] - i[None, :] + self.n - 1

    def first_column(self) -> Tensor:
        # the 2n circulant holding T in its top-left corner: [t_0 .. t_{n-1}, 0, t_{-(n-1)} .. t_{-1}]
        v, n = self.surm_v, self.n
        return torch.cat([v[..., n - 1:], v.new_zeros(*v.shape[:-1], 1), v[..., : n - 1]], dim=-1)


def surm_count(method: str, d_out: int, d_in: int, n: int | None = None) -> int:
    """The P formula above, for tests and tables."""
    n = n or math.gcd(d_out, d_in)
    per_block = n if method == "circulant" else 2 * n - 1
    return (d_out // n) * (d_in // n) * per_block
