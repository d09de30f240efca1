"""MonteCLoRA: Robust and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank Adaptation
(Sengupta et al., arXiv:2411.04358).

LoRA (y = W0 x + s B A x) whose A gets learned Monte Carlo noise while training. Per layer, with N = num_samples,
c = sample_scaler and two extra trainable vectors sigma (std_prior, r) and phi (expert_weights_prior, N):
    v   = max(exp(2 sigma) * diag(S), 1e-3),  S ~ Wishart(df=r, I_r)      (diagonal covariance over A's r rows)
    a   = exp(phi),  w = softmax(log a - mean(log a) + sqrt(d) * z),  z ~ N(0, I_N),
          d = (1 - 2/N) / a + sum(1/a) / N^2 + 1e-6                     (Laplace approximation of Dirichlet(a))
    A_n = A + c * diag(sqrt(v)) Z_n,  Z_n ~ N(0, I)  (n = 1..N, each r x d_in)
    training:  y = W0 x + s B (sum_n w_n A_n) x = W0 x + s B (A + c diag(sqrt v) sum_n w_n Z_n) x
    eval / merge: y = W0 x + s B A   (plain LoRA of the mean; the noise is training-only)
Loss term (`regularizer`, added by DeltaModel.regularization_loss, mean over the adapter's layers):
    kl_loss_weight * (KL_dir + KL_wish + KL_mvn) + [use_entropy] sum_n w_n^2, with alpha1 = dirichlet_prior,
    KL_dir  = lgG(sum a) - lgG(sum alpha1) + sum(lgG(a) - lgG(alpha1)) + sum (a - alpha1)(psi(a) - psi(sum a)),
    KL_wish = r/2 * sum(exp(2 sigma) - 2 sigma - 1),   KL_mvn = N/2 * sum(v - log v - 1)  (v, w: the last draw).
P = r(d_in + d_out) + r + N. Defaults are PEFT's MontecloraConfig: N=8, c=1e-4, kl_loss_weight=1e-5,
dirichlet_prior=0.1, use_entropy=False; sigma, phi start U[0, 1) (torch.rand, as both sources); B = 0.

[verify] "exact form unknown": established from the code, checked in two places.
- HF peft (installed) tuners/lora/monteclora.py (MontecloraSampler), variants.py (MontecloraLinearVariant),
  model.py (_get_monteclora_loss): exactly the above; the sampler is built with in_features=d_in,
  out_features=r, so sigma has r entries; noise is added to A only, in training only; merge and eval use plain
  LoRA; the loss is summed over layers then divided by their count; only Linear layers are supported.
- LCS2-IIITD/MonteCLoRA peft/src/peft/tuners/tuners_utils.py (MonteCLoRASampler) and tuners/lora/layer.py:
  the same sampler and KL terms, but its layer (a) multiplies the noise by sample_scaler a second time (c^2),
  (b) writes the averaged A back as a new nn.Parameter every training forward, so the noise accumulates in A
  and the sampler gets no task gradient, (c) defaults monteclora_n=4, sample_scaler=5e-3, dirichlet_prior=1.
  We follow PEFT (c once, noise not persisted, gradients reach sigma and phi through the reparameterisation).
- Both write KL_dir with "+ sum(lgG(a) - lgG(alpha1))"; the textbook Dirichlet KL has a minus there. We keep
  the sources' form (so the value equals PEFT's, and can be negative) and compute lgamma directly where they
  take log(exp(lgamma)) (equal wherever theirs is finite).
Randomness: every training forward draws fresh S, z, Z from torch's global RNG, like dropout (PEFT draws the
same distributions from the global RNG into a 150-sample buffer); so resume replays them only if the global RNG
state is restored. diag(S) is drawn by Bartlett's construction directly (the same joint law as PEFT's
Wishart._bartlett_sampling, without torch's private API or its singular-sample resampling). KL_mvn and the
entropy use the last training draw (graph kept, as PEFT): call regularization_loss() after that step's forward.
Beyond PEFT, any layer LoRA supports works (conv, embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.distributions import Chi2

from ...engine.layer import DeltaLayer
from ...engine.registry import register
from ._sharing import LayerShared
from .lora import LoRA, LoRAConfig


class MonteCLoRAConfig(LoRAConfig):
    num_samples: int = Field(8, ge=1, description="Monte Carlo samples N of A mixed per training forward")
    sample_scaler: float = Field(1e-4, ge=0.0, description="scale c of the noise on A (0: plain LoRA)")
    kl_loss_weight: float = Field(1e-5, ge=0.0, description="weight of the three KL terms")
    dirichlet_prior: float = Field(0.1, gt=0.0, description="concentration of the Dirichlet prior on the weights")
    use_entropy: bool = Field(False, description="add sum_n w_n^2 (unweighted, as PEFT) to the loss")


@register("monteclora", config=MonteCLoRAConfig, family="low-rank", formula="r*(d_in + d_out) + r + num_samples",
          paper="arXiv:2411.04358",
          summary="MonteCLoRA: LoRA whose A gets learned Wishart/Dirichlet Monte Carlo noise in training, plus KL")
class MonteCLoRA(LoRA):
    grouped_forward = True  # the training forward goes through lora_out with the noisy A
    def __init__(self, config: MonteCLoRAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, initialize, shared)
        kw = {"dtype": self.lora_A.dtype, "device": self.lora_A.device}
        make = torch.rand if initialize else torch.zeros
        self.std_prior = nn.Parameter(make(config.r, **kw))  # (r,) log-std of A's rows
        self.expert_weights_prior = nn.Parameter(make(config.num_samples, **kw))  # (N,) log Dirichlet concentration
        self._last: tuple[Tensor, Tensor] | None = None  # (v, w) of the last training draw, for the loss

    def train(self, mode: bool = True) -> MonteCLoRA:
        self._last = None  # drop the last draw's graph (it also blocks deepcopy); the next forward redraws
        return super().train(mode)

    @classmethod
    def build_shared(cls, config: MonteCLoRAConfig, layers: Sequence[DeltaLayer]) -> nn.Module:
        return LayerShared(layers)  # PEFT averages the loss over layers

    def draws(self) -> tuple[Tensor, Tensor, Tensor]:
        """Fresh draws from the global RNG: diag of a Wishart(df=r, I_r) sample (r,), z (N,), Z (N, r, d_in)."""
        r, n = self.config.r, self.config.num_samples
        kw = {"dtype": self.std_prior.dtype, "device": self.std_prior.device}
        # Bartlett: S = L L^T, L lower-triangular, L_jj^2 ~ chi2(r - j), L_jk ~ N(0, 1) below; only diag(S) is used
        chi2 = Chi2(torch.arange(r, 0, -1, **kw)).sample()  # (r,) df r, r-1, ..., 1
        s_diag = chi2 + torch.randn(r, r, **kw).tril(-1).square().sum(1)
        return s_diag, torch.randn(n, **kw), torch.randn(n, *self.lora_A.shape, **kw)

    def noise(self, draws: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """c diag(sqrt v) sum_n w_n Z_n (r, d_in), reparameterised so sigma and phi get gradients."""
        s_diag, z, Z = draws
        n = self.config.num_samples
        v = (torch.exp(2 * self.std_prior) * s_diag).clamp_min(1e-3)  # (r,) sampled diagonal covariance
        a = torch.exp(self.expert_weights_prior).clamp_min(1e-6)  # (N,)
        d = ((1 - 2 / n) / a + (1 / a).sum() / n**2).clamp_min(1e-6) + 1e-6  # Laplace-Dirichlet variance
        w = torch.softmax(a.log() - a.log().mean() + d.sqrt() * z, dim=-1)  # (N,) mixing weights, sum 1
        self._last = (v, w)
        # sum_n w_n (A + noise_n) = A + sum_n w_n noise_n since sum w = 1: mix first, one (r, d_in) tensor
        return self.config.sample_scaler * v.sqrt()[:, None] * torch.einsum("n,nrd->rd", w, Z)

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor) -> Tensor:
        if not self.training:
            return super().forward(layer, x, out)  # eval: plain, deterministic LoRA
        A = self.factors()[0]
        r = self.config.r
        A = torch.cat([A[:r] + self.noise(self.draws()), A[r:]])  # only the trainable A (PiSSA's A0 rows stay)
        # its own forward only to draw the noise before the engine's dropout, in the order it always had
        return out + self.change(layer, self.dropped(x), A).to(out.dtype)

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        if not self.training:
            return None  # PEFT's get_variational_loss is 0 in eval
        cfg, r, n = self.config, self.config.r, self.config.num_samples
        a = torch.exp(self.expert_weights_prior)
        a1 = torch.full_like(a, cfg.dirichlet_prior)
        kl_dir = (torch.lgamma(a.sum()) - torch.lgamma(a1.sum()) + (torch.lgamma(a) - torch.lgamma(a1)).sum()
                  + ((a - a1) * (torch.digamma(a) - torch.digamma(a.sum()))).sum())
        var = torch.exp(2 * self.std_prior)
        kl_wish = 0.5 * r * (var - var.log() - 1).sum()
        v, w = self._last if self._last is not None else (torch.ones_like(var), torch.full_like(a, 1 / n))
        v = v.clamp_min(1e-6)
        kl_mvn = 0.5 * n * (v - v.log() - 1).sum()
        loss = cfg.kl_loss_weight * (kl_dir + kl_wish + kl_mvn)
        if cfg.use_entropy:
            loss = loss + (w**2).sum()
        return loss / (self.shared.layer_count if self.shared is not None else 1)
