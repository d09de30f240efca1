"""LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation
(Azizi, Kundu & Pedram, arXiv:2406.12832).

    y = W0 x + s · PMB S PMA x,   PMA (r x d_in) frozen,  S (r x r) trained,  PMB (d_out x r) trained and then
    frozen column by column:  column j stops learning at step (j + 1) · freeze_every;  s = alpha / r.

Checked against ArminAzizi98/LaMDA (lamda.py get_lamda_model, custom_trainer.py gradual_freeze_B):
- PMA = PEFT's lora_A (kaiming-uniform) with requires_grad False; S = nn.Linear(r, r) at its default
  (kaiming-uniform) init; PMB = PEFT's lora_B, zero at init, so ΔW = 0 at step 0. This implements that.
- freeze schedule: t = int(iteration / (eta · max_steps · grad_accum)), eta = 0.3; the gradient of PMB's first
  t columns is zeroed, and once t >= r PMB gets requires_grad False. Here t = step // freeze_every, so
  freeze_every = eta · max_steps reproduces it. Frozen columns are detached in forward (their gradient is
  exactly zero, as official; momentum of a stateful optimizer can still move them, as official).
Not established, so not shipped: the paper's text (abstract, Fig. 1 caption via reviews) says the projections
start from W0's singular vectors and PMB freezes "based on the singular values", but the official code uses
the random/zero LoRA init above and a fixed column order; with eta = 0.3 it freezes at most 3 columns over a
run. No SVD init or LaMDA++ rank allocation is offered until the paper's exact rule can be read.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import kaiming_uniform_
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from .lora import adapter_dtype, check_rank


class LaMDAConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="rank: size of the low-dimensional adapter S (r x r)")
    alpha: float = Field(16.0, gt=0, description="scale s = alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    freeze_every: int = Field(100, ge=1, description="steps between freezing successive PMB columns "
                                                     "(official: 0.3 x total steps); PMB is frozen at r x this")


@register("lamda", config=LaMDAConfig, family="low-rank", formula="r^2 + r d_out (r^2 once PMB is frozen)",
          paper="arXiv:2406.12832",
          summary="LaMDA: PMB S PMA with PMA frozen, S trained and PMB frozen column by column early on")
class LaMDA(Delta):
    def __init__(self, config: LaMDAConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        d_out, d_in = check_rank(config.r, layer, self.method, warn_for=config)
        r, kw = config.r, {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = config.alpha / r
        self.register_buffer("lamda_A", torch.zeros(r, d_in, **kw))  # PMA (r, d_in), frozen
        self.lamda_S = nn.Parameter(torch.zeros(r, r, **kw))
        self.lamda_B = nn.Parameter(torch.zeros(d_out, r, **kw))  # PMB (d_out, r), zero at init
        self.frozen_columns = 0  # a function of the step (on_step), so a resumed run replays it
        if initialize:
            kaiming_uniform_(self.lamda_A)
            kaiming_uniform_(self.lamda_S)

    def on_step(self, step: int) -> None:
        self.frozen_columns = min(step // self.config.freeze_every, self.config.r)
        # S trains exactly when this adapter does (set_active), so B follows it until fully frozen
        self.lamda_B.requires_grad_(self.lamda_S.requires_grad and self.frozen_columns < self.config.r)

    def pmb(self) -> Tensor:
        """PMB with its first `frozen_columns` columns cut from the gradient graph."""
        t = self.frozen_columns
        if t == 0 or not self.lamda_B.requires_grad:
            return self.lamda_B
        return torch.cat([self.lamda_B[:, :t].detach(), self.lamda_B[:, t:]], dim=1)

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.scale * (self.lamda_B @ self.lamda_S @ self.lamda_A)  # (d_out, d_in)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        h = layer.apply_matrix(x, self.lamda_A)  # (.., r)
        return layer.mix(layer.mix(h, self.lamda_S), self.pmb()) * self.scale
