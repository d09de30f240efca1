"""LoRA-Mini: Adaptation Matrices Decomposition and Selective Training (Aher et al., arXiv:2411.15804):

    y = W0 x + (alpha / r) · B_aux B_train A_train A_aux x

A_aux (a x d_in) and B_aux (d_out x b) frozen, random normal (`aux_scale`, below); A_train (r x a) and B_train
(b x r) trained, so P = r(a + b), independent of the layer's width. Defaults r = 16, a = b = 32, alpha = 16.

[verify] items, checked against the official code (RajdeepAher/initial_it, HEAD b8185a8; the README names it
the official implementation):
- factors and shapes: `lora_A_aux` (lora_a, in), `lora_A_train` (r, lora_a), `lora_B_aux` (out, lora_b),
  `lora_B_train` (lora_b, r), scaling lora_alpha / r; forward x (A_train A_aux)ᵀ (B_aux B_train)ᵀ · scaling
  (lidb.py, Kaiming_init/lidb_but_train_is_small_randn.py `Linear`). Only names containing "train" get
  gradients (Kaiming_init/train_script_randn.py `merge_l`).
- init: the root lidb.py zeros both trained matrices, which cannot train (dL/dA_train and dL/dB_train are both
  zero). The training script imports lidb_but_train_is_small_randn, whose `reset_parameters` draws the aux
  matrices `normal_` and A_train `kaiming_uniform_(a=sqrt(5))` (twice) and never touches B_train, so B_train
  stays zero (`new_zeros`). We follow that variant: A_train Kaiming-uniform, B_train 0, so Init ΔW = 0.
- defaults: train_script_randn.py hard-codes lora_alpha=16 and takes r, a, b as required arguments; the
  notebooks' `apply_lora_to_bert(r=16, lora_a=32, lora_b=32, lora_alpha=16)` give r, a, b.
Deviation (storage only): the frozen A_aux, B_aux are regenerated from a seed (layer n of an adapter uses the
CPU generator (seed, n), `_sharing.generator`) as non-persistent buffers, not saved as the official parameters,
so a saved adapter holds only the r(a + b) trained numbers per layer. The forward forms the two rank-r factors
A_train A_aux (r x d_in) and B_aux B_train (d_out x r), as the official code, and applies them to x (cheaper per
token than passing x through the a- and b-wide aux spaces when r < a, b; the same product).
Departure (default `aux_scale='fan_in'`): A_aux and B_aux are N(0, 1/d_in) and N(0, 1/b), not N(0, 1). With
standard normal ones A = A_train A_aux is sqrt(d_in)x LoRA's Kaiming A and an Adam step on B_train moves
B = B_aux B_train sqrt(b)x as far as a step on LoRA's B: on a 384 x 384 layer ΔW moves ~90x as far as LoRA's per
step at the same rate (tests/methods/test_lora_mini.py). A rate the adapter survives is too small for the new
head, and LoRA's wrecks the attention (||ΔW|| / ||W0|| = 2 after 20 steps at 3e-3, LoRA's 0.02): on MiniLM / Rotten
Tomatoes it never left the head-only accuracy 0.575 at any rate from 3e-5 to 3e-2. Scaled by 1/sqrt(fan-in), A
has LoRA's init variance 1/(3 d_in) and the steps are LoRA's size; the function class is the same (a constant
factor in s). What remains is the method's own limit: the update lives in a random a-dim input and b-dim output
subspace (LoRA's factors are free), so less of each step is useful and it wants a larger rate. Seed 0 with the
defaults: 0.575 / 0.594 / 0.692 / 0.653 / 0.575 at 3e-3 / 5e-3 / 1e-2 / 2e-2 / 3e-2; at 3e-3 with b = 384 0.617, with
a = b = 384 (no restriction) 0.734, near LoRA's 0.757. `aux_scale='unit'` keeps the official matrices.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.kinds import kaiming_uniform_
from ...engine.layer import DeltaLayer
from ...engine.registry import DeltaConfig, register
from ._factored import Factored
from ._sharing import LayerShared, generator
from .lora import adapter_dtype


class LoRAMiniConfig(DeltaConfig):
    r: int = Field(16, ge=1, description="rank r of the trained inner pair A_train (r x a), B_train (b x r)")
    a: int = Field(32, ge=1, description="inner width of A: frozen A_aux is a x d_in")
    b: int = Field(32, ge=1, description="inner width of B: frozen B_aux is d_out x b")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    seed: int = Field(0, ge=0, description="seed of the frozen A_aux, B_aux (layer n uses the stream (seed, n))")
    aux_scale: Literal["fan_in", "unit"] = Field(
        "fan_in", description="std of the frozen A_aux, B_aux: 'fan_in' 1/sqrt(d_in) and 1/sqrt(b), so A and its "
        "Adam steps are LoRA's size; 'unit' standard normal as the official code (steps ~90x LoRA's at d_in 384)")

    @model_validator(mode="after")
    def _rank_fits(self):
        if self.r > min(self.a, self.b):
            raise ValueError(f"lora_mini rank r={self.r} exceeds the inner widths a={self.a}, b={self.b}: "
                             "the product has rank <= min(a, b); use r <= min(a, b)")
        return self


@register("lora_mini", config=LoRAMiniConfig, family="low-rank", formula="r*(a + b)", paper="arXiv:2411.15804",
          summary="LoRA-Mini: each LoRA factor split in a frozen random outer and a trained inner matrix")
class LoRAMini(Factored):
    def __init__(self, config: LoRAMiniConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: LayerShared | None = None):
        super().__init__(config, layer, shared=shared)
        d_out, d_in = layer.matrix().shape
        if config.a > d_in or config.b > d_out:
            raise ValueError(f"lora_mini inner widths a={config.a}, b={config.b} are larger than the layer "
                             f"({d_out} x {d_in}, {type(layer.base_layer).__name__}); use a <= {d_in}, b <= {d_out}")
        if getattr(layer.base_layer, "groups", 1) != 1:
            raise ValueError(f"lora_mini cannot adapt a grouped convolution (groups={layer.base_layer.groups})")
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = config.alpha / config.r
        g = generator(config.seed, shared.position(layer))
        A_aux = torch.randn(config.a, d_in, generator=g)  # (a, d_in), standard normal as the official normal_
        B_aux = torch.randn(d_out, config.b, generator=g)  # (d_out, b)
        if config.aux_scale == "fan_in":  # each a map scaled by 1/sqrt(its fan-in): see the module docstring
            A_aux, B_aux = A_aux / math.sqrt(d_in), B_aux / math.sqrt(config.b)
        self.register_buffer("lora_A_aux", A_aux.to(**kw), persistent=False)
        self.register_buffer("lora_B_aux", B_aux.to(**kw), persistent=False)
        self.lora_A_train = nn.Parameter(torch.zeros(config.r, config.a, **kw))  # (r, a)
        self.lora_B_train = nn.Parameter(torch.zeros(config.b, config.r, **kw))  # (b, r), zero: Init ΔW = 0
        if initialize:
            with torch.no_grad():
                kaiming_uniform_(self.lora_A_train)

    @classmethod
    def build_shared(cls, config: LoRAMiniConfig, layers: list[DeltaLayer]) -> LayerShared:
        return LayerShared(layers)  # only each layer's position (its seed stream); no tensors

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A (r, d_in), B (d_out, r)) = (A_train A_aux, B_aux B_train)."""
        return self.lora_A_train @ self.lora_A_aux, self.lora_B_aux @ self.lora_B_train
