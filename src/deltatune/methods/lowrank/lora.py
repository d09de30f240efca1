"""LoRA, rsLoRA and PiSSA initialisation.

LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., arXiv:2106.09685), Eq. (3):
    y = W0 x + s · B A x,   s = alpha / r   (rsLoRA, arXiv:2312.03732: s = alpha / sqrt(r))
A (r x d_in) starts Kaiming-uniform (as PEFT and nn.Linear) or Gaussian N(0, 1/r^2); B (d_out x r)
starts at zero, so the adapted model equals the base model at step 0.

PiSSA (Meng et al., arXiv:2404.02948): A and B start from the principal singular triplets of W0,
    B0 = U_r sqrt(S_r / s),  A0 = sqrt(S_r / s) V_r^T,  y = (W0 - s B0 A0) x + s B A x.
Departure from the paper's code, same function: the residual W_res = W0 - s B0 A0 is not written into
the shared base weight; B0 and A0 stay frozen buffers and the delta is s(BA - B0 A0), one rank-2r
product in activation space. So the base model, other adapters and `__base__` rows are untouched, the
output at step 0 equals the base exactly, and the adapter exports as a plain rank-2r LoRA.
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from ...engine.fused import LowRank
from ...engine.kinds import kaiming_uniform_
from ...engine.layer import Delta, DeltaLayer
from ...engine.registry import DeltaConfig, register
from ...engine.targeting import matcher

_PISSA = re.compile(r"pissa(?:_niter_(\d+))?")


class LoRAConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    bias: Literal["none", "lora_only"] = Field("none", description="'lora_only': train a bias delta on adapted layers")
    rslora: bool = Field(False, description="rank-stabilised scale alpha/sqrt(r)")
    init: str = Field("kaiming", description="A's init: 'kaiming', 'gaussian', 'pissa' or 'pissa_niter_K' (fast SVD)")
    rank_pattern: dict[str, int] = Field({}, description="per-layer r over `r` (PEFT's rank_pattern): layer path, "
                                         "dotted suffix or 're:<regex>' -> rank; an exact path wins, then the first match")
    alpha_pattern: dict[str, float] = Field({}, description="per-layer alpha over `alpha` (PEFT's alpha_pattern), "
                                            "keyed as rank_pattern")

    @field_validator("init")
    @classmethod
    def _known_init(cls, v: str) -> str:
        if v not in ("kaiming", "gaussian") and not _PISSA.fullmatch(v):
            raise ValueError(f"unknown init '{v}': use 'kaiming', 'gaussian', 'pissa' or 'pissa_niter_K'")
        return v

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x <= 0}
        if bad:
            raise ValueError(f"rank_pattern and alpha_pattern values must be > 0, got {bad}")
        return v

    @property
    def scaling(self) -> float:
        return self.scale_at(self.r, self.alpha)

    def scale_at(self, r: int, alpha: float) -> float:
        """s = alpha / r (alpha / sqrt(r) with rslora) for a layer of rank r and alpha `alpha`."""
        return alpha / (math.sqrt(r) if self.rslora else r)

    def for_layer(self, path: str) -> tuple[int, float]:
        """(r, alpha) of the layer at `path`: rank_pattern / alpha_pattern over r / alpha."""
        def pick(pattern: dict, default: float) -> float:
            if path in pattern:
                return pattern[path]
            return next((v for k, v in pattern.items() if matcher(k)(path, None)), default)
        return int(pick(self.rank_pattern, self.r)), float(pick(self.alpha_pattern, self.alpha))

    @property
    def pissa(self) -> bool:
        return self.init.startswith("pissa")


_WARNED: dict[int, weakref.ref] = {}  # id -> adapter config already warned about a rank above a layer's side


def _first_time(config: DeltaConfig) -> bool:
    """True once per config object (configs hold lists, so they are not hashable; a weak ref tells reused ids)."""
    ref = _WARNED.get(id(config))
    if ref is not None and ref() is config:
        return False
    _WARNED[id(config)] = weakref.ref(config, lambda _, key=id(config): _WARNED.pop(key, None))
    return True


def check_rank(r: int, layer: DeltaLayer, method: str, warn_for: DeltaConfig | None = None,
               grouped: bool = False) -> tuple[int, int]:
    """(d_out, d_in) of the layer's update after checking r against them.

    r > min(d_out, d_in) raises, or with `warn_for` (the adapter's config; for methods whose math stays valid,
    as PEFT allows) warns once per adapter: the update's rank cannot exceed the smaller side. `grouped`: the
    method adapts grouped convolutions as PEFT does (A sees every input channel), so d_in is C_in * kernel.
    """
    d_out, d_in = layer.matrix().shape
    groups = getattr(layer.base_layer, "groups", 1)
    if groups != 1 and not grouped:
        raise ValueError(f"{method} cannot adapt a grouped convolution (groups={groups}); "
                         "exclude it or target only groups=1 layers")
    if groups != 1:
        check_grouped(r, layer, method)
        d_in *= groups
    if r > min(d_out, d_in):
        what = f"{method} rank r={r} is larger than the layer ({d_out} x {d_in}, {type(layer.base_layer).__name__})"
        if warn_for is None:
            raise ValueError(f"{what}; use r <= {min(d_out, d_in)}")
        if _first_time(warn_for):
            warnings.warn(f"{what}: the update has rank at most {min(d_out, d_in)} there, so the extra rank only "
                          "adds parameters (warned once per adapter)", stacklevel=2)
    return d_out, d_in


def check_grouped(r: int, layer: DeltaLayer, method: str) -> None:
    conv, groups = layer.base_layer, layer.base_layer.groups
    if r % groups:
        raise ValueError(f"{method} rank r={r} on a grouped convolution (groups={groups}) must be divisible by "
                         f"groups (B is a grouped 1x1 conv, as PEFT); use r = {groups * max(1, r // groups)}")
    if not layer.stock:
        stock = next(c.__name__ for c in type(conv).__mro__ if c.__module__.startswith("torch.nn"))
        raise ValueError(f"{method} on a grouped convolution needs the stock {stock} forward; "
                         f"'{type(conv).__name__}' has its own: exclude it")


def grouped_lora(conv: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """B A x on a grouped conv as PEFT builds it: A (r, C_in * kernel) a full conv over every input channel with
    the layer's stride, padding and dilation, then B (C_out, r / groups) a grouped 1x1 conv."""
    n = conv.weight.dim() - 2
    op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    padding = conv.padding
    if conv.padding_mode != "zeros":  # as nn.ConvNd._conv_forward
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    h = op(x, A.reshape(A.shape[0], -1, *conv.weight.shape[2:]), None, conv.stride, padding, conv.dilation)
    return op(h, B.reshape(*B.shape, *[1] * n), groups=conv.groups)


def adapter_dtype(layer: DeltaLayer) -> torch.dtype:
    """Half-precision bases get float32 adapters: tiny, and their updates would underflow in fp16/bf16.
    A layer of no kind (a sublayer an activation adapter sits on) is read by its first float parameter."""
    if layer.kind is not None:
        dtype = layer.weight.dtype
    else:
        dtype = next((p.dtype for p in layer.base_layer.parameters() if p.is_floating_point()), torch.float32)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@register("lora", config=LoRAConfig, family="low-rank", formula="r(d_in + d_out)",
          paper="arXiv:2106.09685", summary="LoRA: W0 + (alpha/r) B A; rsLoRA and PiSSA via rslora/init")
class LoRA(Delta):
    groups = 1  # the base conv's groups (subclasses that build their own factors keep 1)
    grouped_forward = False  # True: a subclass's own forward goes through lora_out, so grouped convs work

    @classmethod
    def adapts_grouped_convs(cls) -> bool:
        """Grouped convs need LoRA's own factors, lora_out and merge rule; a forward of its own must opt in."""
        own = all(getattr(cls, f) is getattr(LoRA, f) for f in ("factors", "lora_out", "delta_weight"))
        return own and (cls.change is LoRA.change and cls.forward is Delta.forward or cls.grouped_forward)

    def __init__(self, config: LoRAConfig, layer: DeltaLayer, initialize: bool = True, shared: nn.Module | None = None):
        super().__init__(config, layer, shared=shared)
        r, alpha = config.r, config.alpha
        if config.rank_pattern or config.alpha_pattern:
            if type(self) is not LoRA:  # subclasses read config.r themselves
                raise ValueError(f"{self.method} does not take rank_pattern/alpha_pattern; only lora does")
            r, alpha = config.for_layer(layer.path)
        if config.pissa and r > min(layer.matrix().shape):
            raise ValueError(f"PiSSA init needs r <= {min(layer.matrix().shape)} on this "
                             f"{' x '.join(map(str, layer.matrix().shape))} layer ({type(layer.base_layer).__name__}):"
                             " its SVD has only that many singular triplets; lower r or use init='kaiming'")
        d_out, d_in = check_rank(r, layer, self.method, warn_for=config,
                                 grouped=not config.pissa and self.adapts_grouped_convs())
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.scale = config.scale_at(r, alpha)  # a float; prepare_for_hotswap makes it a tensor buffer
        self.groups = getattr(layer.base_layer, "groups", 1)  # > 1: B is a grouped 1x1 conv (PEFT's layout)
        self.lora_A = nn.Parameter(torch.zeros(r, d_in, **kw))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r // self.groups, **kw))  # (d_out, r / groups)
        has_bias = config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None
        self.lora_bias = nn.Parameter(torch.zeros(d_out, **kw)) if has_bias else None
        if config.pissa:
            self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
            self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        if initialize:
            self._init_weights(layer)

    @torch.no_grad()
    def _init_weights(self, layer: DeltaLayer) -> None:
        r = self.lora_A.shape[0]  # this layer's rank (rank_pattern)
        if self.config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        elif self.config.pissa:
            B0, A0 = pissa_factors(layer.matrix(), r, self.scale, self.config.init)
            for p, v in ((self.lora_A, A0), (self.lora_B, B0), (self.lora_A0, A0), (self.lora_B0, B0)):
                p.copy_(v)
        else:
            kaiming_uniform_(self.lora_A)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) with ΔW = s · B A: for PiSSA the rank-2r pair [A; A0], [B, -B0]."""
        if self.config.pissa:
            return torch.cat([self.lora_A, self.lora_A0]), torch.cat([self.lora_B, -self.lora_B0], dim=1)
        return self.lora_A, self.lora_B

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        if self.groups > 1:
            raise ValueError(f"{self.method} on a grouped convolution (groups={self.groups}) cannot be merged: its "
                             "update connects every input channel, which the grouped weight cannot hold (PEFT "
                             "refuses too); keep the adapter unmerged")
        A, B = self.factors()
        return self.scale * (B @ A)  # (d_out, d_in)

    def bias_delta(self) -> Tensor | None:
        return self.lora_bias

    def low_rank(self) -> LowRank | None:
        cls = type(self)
        own = cls.forward is Delta.forward and cls.change is LoRA.change and cls.lora_out is LoRA.lora_out
        if self.lora_bias is not None or not own:
            return None  # a bias term, or a subclass with its own arithmetic
        A, B = self.factors()
        return LowRank(A, B, self.scale, self.dropout_p)

    def lora_out(self, layer: DeltaLayer, x: Tensor, A: Tensor | None = None) -> Tensor:
        """s · B A x, computed in activation space (ΔW is never formed); `A` replaces the factor A if given."""
        A0, B = self.factors()
        A = A0 if A is None else A
        if self.groups > 1:
            return grouped_lora(layer.base_layer, x, A, B) * self.scale
        return layer.mix(layer.apply_matrix(x, A), B) * self.scale

    def change(self, layer: DeltaLayer, x: Tensor, A: Tensor | None = None) -> Tensor:
        """s · B A x (+ the bias delta); `A` replaces the factor A if given (MonteCLoRA's sampled A)."""
        y = self.lora_out(layer, x) if A is None else self.lora_out(layer, x, A)  # DyLoRA's lora_out takes no A
        return y if self.lora_bias is None else y + layer.per_channel(self.lora_bias, y)


def pissa_factors(W: Tensor, r: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """(B0, A0) with s·B0 A0 the best rank-r approximation of W (exact SVD, or randomized with niter)."""
    W = W.detach().float()
    niter = _PISSA.fullmatch(init).group(1)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(niter))
        Vh = V.t()
    root = (S[:r] / scale).sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]
