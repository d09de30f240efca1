"""SiRA: a sparse mixture of LoRA experts with top-k routing, an expert capacity and expert dropout.

*SiRA: Sparse Mixture of Low Rank Adaptation* (Zhu et al., arXiv:2311.09179). Per token x (d_in):
    g = ExpertDropout(softmax(W_g x)),   W_g (E x d_in)
    y = W0 x + sum_{e in TopK(g)} g_e · s · B_e A_e x,   s = alpha / r,
with A_e (r x d_in) Kaiming, B_e (d_out x r) zero (so y = W0 x at step 0), and each expert taking at most
C = ceil(capacity_factor · k · T / E) of the T tokens in the call; assignments over capacity are dropped for
that expert (the token keeps its other experts and the base output). Priority is GShard's: every token's
first choice is placed before any second choice, then token order. Not mergeable (token dependent).

Sources: the abstract states top-k routing, a per-expert capacity limit and expert dropout on top of the
gating network. The paper body could not be read from the stored copies (only its opening), so these
details are deltatune's choices, stated here and tested: capacity in GShard form (factor x k T / E, default
1.0; None = no limit), expert dropout as dropout (rate `expert_dropout`) on the gate probabilities before
top-k (a dropped expert cannot be picked), gate weights not renormalised after top-k (`normalize=True` to
renormalise), and an optional Switch/GShard load-balancing loss E · sum_e f_e P_e through `regularizer`
(weight `aux_loss_weight`, default 0). Defaults E=4, k=2, r=4 are not the paper's (unverified).
Routing gathers each expert's tokens (index_select / index_add), never running all E experts on all tokens.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.kinds import LINEAR_KINDS, kaiming_uniform_
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from .lora import adapter_dtype, check_rank


class SiRAConfig(DeltaConfig):
    experts: int = Field(4, ge=1, description="LoRA experts per layer (E)")
    top_k: int = Field(2, ge=1, description="experts each token is routed to (k)")
    r: int = Field(4, ge=1, description="rank of each expert")
    alpha: float = Field(8.0, gt=0, description="expert scale numerator: s = alpha/r")
    capacity_factor: float | None = Field(1.0, gt=0, description="C = ceil(factor · k · T / E) tokens per expert; "
                                          "None: no limit")
    expert_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the gate probabilities (training)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the experts' input")
    normalize: bool = Field(False, description="renormalise the top-k gate weights to sum to 1")
    aux_loss_weight: float = Field(0.0, ge=0.0, description="weight of the load-balancing loss E·sum f_e P_e")

    @model_validator(mode="after")
    def _check(self) -> SiRAConfig:
        if self.top_k > self.experts:
            raise ValueError(f"SiRA top_k={self.top_k} is larger than experts={self.experts}")
        return self


def route(probs: Tensor, k: int, capacity: int | None, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k assignments under a per-expert capacity: (token, expert, weight) of the kept ones, each (M,)."""
    N, E = probs.shape
    w, idx = probs.topk(k, dim=-1)  # (N, k)
    if normalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
    tokens = torch.arange(N, device=probs.device).repeat(k)  # choice-major: all first choices, then second...
    experts, weights = idx.t().reshape(-1), w.t().reshape(-1)  # (k N,)
    keep = weights > 0  # an expert removed by expert dropout is never routed to
    if capacity is not None:
        onehot = nn.functional.one_hot(experts, E) * keep[:, None]  # (k N, E)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # this assignment's slot in its expert's queue
        keep = keep & (position < capacity)
    return tokens[keep], experts[keep], weights[keep]


@register("sira", config=SiRAConfig, family="mixture", formula="E*r*(d_in + d_out) + E*d_in",
          paper="arXiv:2311.09179", summary="SiRA: top-k routed LoRA experts with capacity and expert dropout")
class SiRA(Delta):
    mergeable = False

    def __init__(self, config: SiRAConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        if layer.kind not in LINEAR_KINDS:
            raise ValueError(f"SiRA routes tokens and adapts Linear / GPT-2 Conv1D layers only, not "
                             f"'{type(layer.base_layer).__name__}'; exclude it")
        d_out, d_in = check_rank(config.r, layer, self.method, warn_for=config)
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        E = config.experts
        self.sira_A = nn.Parameter(torch.zeros(E, config.r, d_in, **kw))  # (E, r, d_in)
        self.sira_B = nn.Parameter(torch.zeros(E, d_out, config.r, **kw))  # (E, d_out, r)
        self.sira_gate = nn.Parameter(torch.zeros(E, d_in, **kw))  # (E, d_in), W_g
        self.scale = config.alpha / config.r
        self.expert_drop = nn.Dropout(config.expert_dropout) if config.expert_dropout > 0 else nn.Identity()
        self._aux: Tensor | None = None
        if initialize:
            with torch.no_grad():
                for e in range(E):
                    kaiming_uniform_(self.sira_A[e])
                kaiming_uniform_(self.sira_gate)

    def capacity(self, tokens: int) -> int | None:
        cf = self.config.capacity_factor
        return None if cf is None else math.ceil(cf * self.config.top_k * tokens / self.config.experts)

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor) -> Tensor:
        xt = x.reshape(-1, x.shape[-1]).to(self.sira_A.dtype)  # (T, d_in): every token of the call
        probs = torch.softmax(xt @ self.sira_gate.t(), dim=-1)  # (T, E)
        if self.training and self.config.aux_loss_weight > 0:
            f = nn.functional.one_hot(probs.argmax(-1), self.config.experts).float().mean(0)  # top-1 share
            self._aux = self.config.aux_loss_weight * self.config.experts * (f * probs.mean(0)).sum()
        tok, exp, w = route(self.expert_drop(probs), self.config.top_k, self.capacity(len(xt)), self.config.normalize)
        h = self.dropout(xt)
        y = xt.new_zeros(len(xt), self.sira_B.shape[1])  # (T, d_out)
        for e in range(self.config.experts):
            sel = exp == e
            t = tok[sel]
            ye = (h[t] @ self.sira_A[e].t()) @ self.sira_B[e].t()  # (n_e, d_out), only this expert's tokens
            y = y.index_add(0, t, ye * (self.scale * w[sel])[:, None])
        return out + y.reshape(*out.shape[:-1], -1).to(out.dtype)

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        return self._aux
