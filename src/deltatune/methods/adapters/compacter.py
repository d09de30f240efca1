"""Compacter and Compacter++: bottleneck adapters whose down and up maps are PHM layers.

*Compacter: Efficient Low-Rank Hypercomplex Adapter Layers* (Mahabadi et al., arXiv:2106.04647), Eq. (3)-(5):

    y = x H + b,    H = Σ_{i<n} A_i ⊗ B_i  (d_in x d_out),    B_i = W_left_i W_right_i  (rank k = phm_rank)

A (n x n x n, the "phm rule", n = phm_dim) is held once per adapter and shared by every PHM layer of it, down
and up, in every block (DeltaModel.shared, saved as '__shared__.phm_rule'); W_left_i ((d_in/n) x k),
W_right_i (k x (d_out/n)) and b are per layer. `compacter` has Houlsby's placement (after attention and after
the FFN), `compacter++` Pfeiffer's (after the FFN only); both use reduction_factor 32 and GELU.

Checked against adapter-hub/adapters 1.3 (methods/modeling.py PHMLayer, init_shared_parameters, init_W;
methods/utils.py kronecker_product; configuration/adapter_config.py: CompacterConfig = DoubleSeqBnConfig +
phm_layer, CompacterPlusPlusConfig = SeqBnConfig + phm_layer, BnConfig's phm defaults phm_dim 4, phm_rank 1,
factorized_phm_W, shared_phm_rule, learn_phm, phm_bias, phm_c_init 'normal', phm_init_range 1e-4): given the
same tensors the forward is theirs (tests/test_compacter.py). Departures:
- init: AdapterHub's ('adapterhub') draws each slice W_left_i, W_right_i glorot, the rule N(0, phm_init_range)
  (or U(-1, 1)) and zero biases, so the adapter starts near, not at, the identity. deltatune's default
  'identity' draws the same and zeroes the up layer's W_right (H_up = 0, as LoRA's B = 0): f = 0 exactly at
  step 0, while the rule, W_left and the down layer stay random, so W_right gets a gradient at once (a zero
  rule would instead stall every W until the rule moved, and a zero W_left would stall W_right).
- AdapterHub's init_W tests `if config["hypercomplex_nonlinearity"]:` before the string cases, so every value
  draws glorot-normal; `hypercomplex_nonlinearity` here defaults to 'glorot-normal' (what AdapterHub draws),
  and 'glorot-uniform' / 'normal' do what they say.
- only a shared, unfactorised rule and per-layer W (AdapterHub's defaults): no shared_W_phm or
  factorized_phm_rule. learn_phm=False keeps the rule as a saved buffer, so it cannot train.
P per layer = k (d + m) + m + k (m + d) + d (down and up: factorised W and biases), m = d // reduction_factor;
global: n^3 per adapter (the rule).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ..lowrank.lora import adapter_dtype
from .bottleneck import Bottleneck, HoulsbyConfig, PfeifferConfig, device_of


class CompacterConfig(HoulsbyConfig):
    """Houlsby's placement with PHM projections; the PHM options keep AdapterHub's names and defaults."""

    reduction_factor: float = 32
    non_linearity: str = "gelu"
    phm_dim: int = Field(4, ge=1, description="n: H is a sum of n Kronecker products; n divides d and m")
    phm_rank: int = Field(1, ge=1, description="k: the rank of each W_i = W_left_i W_right_i (factorized_phm_W)")
    factorized_phm_W: bool = Field(True, description="W_i as W_left_i W_right_i of rank phm_rank (False: full W_i)")
    phm_bias: bool = Field(True, description="a bias on each PHM layer")
    learn_phm: bool = Field(True, description="train the shared rule A (False: a fixed, saved buffer)")
    phm_c_init: Literal["normal", "uniform"] = Field(
        "normal", description="the rule's init: N(0, phm_init_range) or U(-1, 1)")
    phm_init_range: float = Field(1e-4, gt=0, description="std of the rule (and of W when 'normal')")
    hypercomplex_nonlinearity: Literal["glorot-normal", "glorot-uniform", "normal"] = Field(
        "glorot-normal", description="the draw of each W slice: glorot (Xavier) normal or uniform, or "
        "N(0, phm_init_range)")
    init: Literal["identity", "adapterhub"] = Field(  # type: ignore[assignment]
        "identity", description="'identity': AdapterHub's draws with the up layer's W_right (or W) zero, so the "
        "adapter starts at the identity; 'adapterhub': its draws as they are (near the identity)")


class CompacterPlusPlusConfig(CompacterConfig):
    """Pfeiffer's placement (AdapterHub's SeqBnConfig): one adapter after the FFN, reading N(h + r)."""

    original_ln_before: bool = PfeifferConfig.model_fields["original_ln_before"].default
    default_targets: ClassVar[dict[str, list[str]]] = PfeifferConfig.default_targets


class PHMRule(nn.Module):
    """The rule A (n, n, n) one adapter's PHM layers share."""

    def __init__(self, config: CompacterConfig, layer: DeltaLayer):
        super().__init__()
        n = config.phm_dim
        A = torch.empty(n, n, n, dtype=adapter_dtype(layer), device=device_of(layer))
        if config.phm_c_init == "normal":
            A.normal_(0.0, config.phm_init_range)
        else:
            A.uniform_(-1.0, 1.0)
        if config.learn_phm:
            self.phm_rule = nn.Parameter(A)
        else:
            self.register_buffer("phm_rule", A)


class PHMLinear(nn.Module):
    """x -> x H + b with H = Σ_i kron(A_i, W_i) (d_in x d_out), A the adapter's shared rule."""

    def __init__(self, d_in: int, d_out: int, config: CompacterConfig, rule: PHMRule, **kw):
        super().__init__()
        n, k = config.phm_dim, config.phm_rank
        self.__dict__["rule"] = rule  # a plain attribute: the rule is kept, counted and saved once, in DeltaModel
        if config.factorized_phm_W:
            self.W_left = nn.Parameter(torch.empty(n, d_in // n, k, **kw))
            self.W_right = nn.Parameter(torch.empty(n, k, d_out // n, **kw))
        else:
            self.W = nn.Parameter(torch.empty(n, d_in // n, d_out // n, **kw))
        self.b = nn.Parameter(torch.zeros(d_out, **kw)) if config.phm_bias else None

    def factors(self) -> list[Tensor]:
        return [self.W_left, self.W_right] if hasattr(self, "W_left") else [self.W]

    def slices(self) -> Tensor:
        """W_i for every i: (n, d_in/n, d_out/n)."""
        return self.W_left @ self.W_right if hasattr(self, "W_left") else self.W

    def matrix(self) -> Tensor:
        """H = Σ_i kron(A_i, W_i): H[a p + s, c q + t] = Σ_i A[i, a, c] W[i, s, t]."""
        A, W = self.rule.phm_rule, self.slices()
        n, p, q = W.shape
        return torch.einsum("iac,ist->asct", A.to(W.dtype), W).reshape(n * p, n * q)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.matrix()
        return y if self.b is None else y + self.b

    @torch.no_grad()
    def reset(self, config: CompacterConfig) -> None:
        draw = {"glorot-normal": nn.init.xavier_normal_, "glorot-uniform": nn.init.xavier_uniform_,
                "normal": lambda t: t.normal_(0.0, config.phm_init_range)}[config.hypercomplex_nonlinearity]
        for i in range(config.phm_dim):  # slice by slice, left then right, as AdapterHub's init_W
            for t in self.factors():
                draw(t[i])
        if self.b is not None:
            self.b.zero_()


FORMULA = ("2 k (d + m) + d + m per layer, m = d // reduction_factor, k = phm_rank; "
           "global n^3 (the shared rule), n = phm_dim")


@register("compacter", config=CompacterConfig, family="adapters", formula=FORMULA, paper="arXiv:2106.04647",
          summary="Compacter: Houlsby adapters whose projections are sums of Kronecker products with a shared rule")
class Compacter(Bottleneck):
    @classmethod
    def build_shared(cls, config: CompacterConfig, layers: list[DeltaLayer]) -> PHMRule:
        return PHMRule(config, layers[0])

    def projection(self, d_in: int, d_out: int, **kw) -> PHMLinear:
        if self.bits is not None:
            raise ValueError(f"{self.method}: bits= quantises plain bottleneck projections; Compacter's PHM layers "
                             "are not quantised: drop bits, or use houlsby/pfeiffer with bits")
        n = self.config.phm_dim
        if d_in % n or d_out % n:
            fits = max(k for k in range(1, n + 1) if math.gcd(d_in, d_out) % k == 0)
            raise ValueError(f"{self.method}: phm_dim={n} must divide both widths of its PHM layer, {d_in} -> "
                             f"{d_out} (the hidden size and m = hidden // reduction_factor): use phm_dim={fits}, "
                             f"or set bottleneck= (or reduction_factor=) so that m is a multiple of {n}")
        return PHMLinear(d_in, d_out, self.config, self.shared, **kw)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        self.down.reset(self.config)
        self.up.reset(self.config)
        if init == "identity":
            self.up.factors()[-1].zero_()  # W_right (or W) of the up layer: H_up = 0, so f = b_up = 0


@register("compacter++", config=CompacterPlusPlusConfig, family="adapters", formula=FORMULA,
          paper="arXiv:2106.04647", summary="Compacter++: one PHM adapter after the FFN (Pfeiffer placement)")
class CompacterPlusPlus(Compacter):
    pass
