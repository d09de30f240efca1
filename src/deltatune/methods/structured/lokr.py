"""LoKr / KronA: a Kronecker-product weight delta, in HF PEFT's `lokr` layout.

KronA: Parameter Efficient Tuning with Kronecker Adapter (Edalati et al., arXiv:2212.10650);
LoKr as in LyCORIS / HF peft 0.21 `tuners/lokr`:
    ΔW = s · (A ⊗ B),  A (a1 x a2), B (b1 x b2),  a1·b1 = d_out,  a2·b2 = d_in,  s = alpha / r
    B = B1 B2 (b1 x r)(r x b2) when r < max(b1, b2)/2; A = A1 A2 likewise only with decompose_both.
Shapes follow PEFT's `factorization(dim, decompose_factor)` (the divisor pair nearest sqrt(dim), or
(f, dim/f) when f divides dim), smaller factor to A: (a1, b1) = factorization(d_out), (a2, b2') =
factorization(c_in); a conv's kernel goes into B's columns, b2 = b2'·k_h·k_w (as PEFT's lokr_w2_b).
Init (PEFT default): A (or A1) zero, B, B1, B2 and A2 Kaiming-uniform, so ΔW = 0 at step 0; init='lycoris'
zeroes B (or B2) instead. P = a1 a2 + b1 b2, each dense factor replaced by r(rows + cols) when low-rank.

[verify] checks. Against peft 0.21 lokr/layer.py (read, not copied): key names lokr_w1, lokr_w1_a/_b,
lokr_w2, lokr_w2_a/_b; w1 zero at init; scale alpha/r even when no factor is low-rank; the use_w1/use_w2
rules above; conv: w2 (b1, c_in/a2, *k) full or w2_b (r, c_in/a2 · k) low-rank. KronA's own init and scale:
the paper text was not reachable from this sandbox (the search corpus only held its abstract), so PEFT's
init and alpha/r scale are followed; its "B low-rank" option is LoKr's, not KronA's.
Forward: for Linear / GPT-2 Conv1D, (A ⊗ B) x = vec(A X Bᵀ) with x viewed as X (a2, b2), never forming
ΔW. Conv layers materialise ΔW (d_out x c_in·k) and run the layer's conv with it, as PEFT does.
effective_conv (PEFT use_effective_conv2d): on a conv with a kernel > 1 (x 1) whose B is low-rank, B is the
Tucker form B[p, (q, kh, kw)] = sum_ab t2[a, b, kh, kw] w2_a[a, p] w2_b[b, q], t2 (r, r, kh, kw) (a 1-D kernel
as (k, 1)), w2_a (r, b1), w2_b (r, c_in/a2): P of B = r²·k + r(b1 + c_in/a2) instead of r(b1 + b2).
Dropouts (training only; eval and merge are exact), as PEFT: rank_dropout zeroes each output row of ΔW with
probability p, one mask per forward, rescaled by 1/mean(mask) only with rank_dropout_scale (PEFT's default off);
module_dropout skips the whole delta for a forward with probability p.
Not supported: Embedding (PEFT has no LoKr embedding), rank/alpha patterns.
Deliberate PEFT difference: peft 0.21 forms a Conv1d's *full-rank* w2 with torch.kron of a 2-D and a 3-D tensor,
which mixes channel and kernel indices; deltatune keeps the Kronecker product on channels and refuses to
export/import that one case (low-rank Conv1d, Conv2d and Linear match PEFT exactly; tested).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.kinds import CONV, EMBEDDING, LINEAR_KINDS, kaiming_uniform_
from ...engine.layer import Delta, DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ..lowrank.lora import adapter_dtype
from ._lycoris import drop_ranks, factor_matrix, module_dropped


class LoKrConfig(DeltaConfig):
    r: int = Field(8, ge=1, description="rank of a low-rank Kronecker factor; also the scale s = alpha/r")
    alpha: float = Field(8.0, gt=0, description="scale numerator: s = alpha/r (PEFT's default alpha = r = 8)")
    decompose_both: bool = Field(False, description="also factor A low-rank when r < max(a1, a2)/2")
    decompose_factor: int = Field(-1, description="-1: factors nearest sqrt(dim); f > 0: (f, dim/f) if f divides dim")
    init: Literal["peft", "lycoris"] = Field("peft", description="which factor starts at zero: A ('peft') or B")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: drop output rows of ΔW")
    rank_dropout_scale: bool = Field(False, description="rescale kept rows by 1/mean(mask)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: skip the whole delta")
    effective_conv: bool = Field(False, description="convs with kernel > 1 and a low-rank B: B as a Tucker factor "
                                 "t2 x1 w2_a x2 w2_b over the kernel (PEFT use_effective_conv2d)")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dim, as LyCORIS/PEFT pick them (see the module docstring)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        new_m = next(k for k in range(m + 1, dim + 1) if dim % k == 0)
        if new_m + dim // new_m > m + n or new_m > limit:
            break
        m, n = new_m, dim // new_m
    return min(m, n), max(m, n)


def lokr_shapes(cfg: LoKrConfig, layer: DeltaLayer) -> tuple[tuple[int, int, int, int], bool, bool]:
    """((a1, a2, b1, b2), A low-rank, B low-rank) for one layer, b2 including a conv's kernel (b2 = n·k)."""
    if layer.kind is EMBEDDING:
        raise ValueError("lokr does not adapt nn.Embedding (PEFT's LoKr has no embedding layer); exclude it")
    d_out, d_in = layer.matrix().shape
    kernel = math.prod(layer.weight.shape[2:]) if layer.kind is CONV else 1
    a1, b1 = factorization(d_out, cfg.decompose_factor)
    a2, n = factorization(d_in // kernel, cfg.decompose_factor)
    return (a1, a2, b1, n * kernel), cfg.decompose_both and cfg.r < max(a1, a2) / 2, cfg.r < max(b1, n) / 2


@register("lokr", config=LoKrConfig, family="structured", formula="a1*a2 + b1*b2 (low-rank factor: r*(rows + cols))",
          paper="arXiv:2212.10650", summary="LoKr/KronA: ΔW = (alpha/r) A ⊗ B, B optionally low-rank (PEFT lokr)")
class LoKr(Delta):
    def __init__(self, config: LoKrConfig, layer: DeltaLayer, initialize: bool = True):
        super().__init__(config, layer)
        (a1, a2, b1, b2), low_a, low_b = lokr_shapes(config, layer)
        self.shape, self.scale, r = (a1, a2, b1, b2), config.alpha / config.r, config.r
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        new = lambda *s: nn.Parameter(torch.zeros(*s, **kw))  # noqa: E731
        if low_a:
            self.lokr_w1_a, self.lokr_w1_b = new(a1, r), new(r, a2)  # A = w1_a @ w1_b
        else:
            self.lokr_w1 = new(a1, a2)
        kernel = tuple(layer.weight.shape[2:]) if layer.kind is CONV else ()
        if config.effective_conv and len(kernel) > 2:
            raise ValueError(f"LoKr effective_conv supports 1-D and 2-D convolutions, not a {len(kernel)}-D kernel")
        # PEFT: only a low-rank B of a conv whose kernel is not 1 (x 1) takes the Tucker form
        self.tucker = config.effective_conv and low_b and math.prod(kernel) > 1
        if self.tucker:
            self.lokr_t2 = new(r, r, *(kernel + (1,))[:2])  # (r, r, kh, kw); a 1-D kernel k as (k, 1), as PEFT
            self.lokr_w2_a, self.lokr_w2_b = new(r, b1), new(r, b2 // math.prod(kernel))  # (r, b1), (r, c_in/a2)
        elif low_b:
            self.lokr_w2_a, self.lokr_w2_b = new(b1, r), new(r, b2)  # B = w2_a @ w2_b
        else:
            self.lokr_w2 = new(b1, b2)
        if initialize:
            zero = "lokr_w1" if config.init == "peft" else "lokr_w2"
            zero = zero if hasattr(self, zero) else zero + ("_a" if zero == "lokr_w1" else "_b")
            for name, p in self.named_parameters():
                if name != zero:
                    kaiming_uniform_(p.data)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A (a1 x a2), B (b1 x b2)), multiplying out any low-rank factor (both are small)."""
        A = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if self.tucker:  # B[p, (q, kh, kw)] = sum_ab t2[a, b, kh, kw] w2_a[a, p] w2_b[b, q]
            return A, factor_matrix(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b).contiguous()  # kron views it
        B = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return A, B

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        return self.scale * torch.kron(*self.factors())  # (d_out, d_in)

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor) -> Tensor:
        return out if module_dropped(self, self.config.module_dropout) else super().forward(layer, x, out)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        cfg = self.config
        tokens = x.numel() // x.shape[-1]
        # The Kronecker product applied to activations saves an (a2 x b1) map per token; from d_in tokens on,
        # forming ΔW (d_out x d_in, as PEFT does) is cheaper in time and in saved memory.
        if layer.kind in LINEAR_KINDS and layer.stock and tokens < x.shape[-1]:
            a1, a2, b1, b2 = self.shape
            A = self.factors()[0]
            X = x.reshape(*x.shape[:-1], a2, b2)  # x = vec(X), X (..., a2, b2)
            if hasattr(self, "lokr_w2"):
                H = X @ self.lokr_w2.t()  # X Bᵀ: (..., a2, b1)
            else:
                H = (X @ self.lokr_w2_b.t()) @ self.lokr_w2_a.t()  # rank-r B applied in two steps
            y = (A @ H).reshape(*x.shape[:-1], a1 * b1) * self.scale  # vec(A X Bᵀ): (..., d_out)
        else:
            y = layer.apply_matrix(x, self.delta_weight(layer))
        return drop_ranks(self, layer, y, cfg.rank_dropout, cfg.rank_dropout_scale)


# --- PEFT format ("LOKR"): lokr_w1 / lokr_w1_a / lokr_w1_b / lokr_w2 / lokr_w2_a / lokr_w2_b per layer ----------
# peft 0.21 builds a full-rank Conv1d factor as torch.kron(w1 (2-D), w2 (3-D)), which pads w1 to (1, a1, a2) and
# so scrambles channels against the kernel; deltatune's ΔW is the Kronecker product on channels, so refuse that case.
_CONV1D_FULL = ("'{}' is a Conv1d with a full-rank LoKr factor B, which peft 0.21 lays out differently (torch.kron of "
                "a 2-D and a 3-D tensor); use r < max(b1, b2)/2 so B is low-rank, or save with DeltaModel.save")
_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, tensors = adapter.config, {}
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        for key, t in layer.deltas[adapter.name].named_parameters():
            if key == "lokr_w2" and layer.weight.dim() == 3:
                raise ValueError(_CONV1D_FULL.format(p))
            if key == "lokr_w2" and layer.kind is CONV:  # PEFT keeps a full conv w2 as (b1, c_in/a2, *kernel)
                t = t.reshape(t.shape[0], -1, *layer.weight.shape[2:])
            tensors[f"{p}.{key}"] = t
    return {"r": cfg.r, "alpha": cfg.alpha, "decompose_both": cfg.decompose_both,
            "decompose_factor": cfg.decompose_factor, "rank_dropout": cfg.rank_dropout,
            "rank_dropout_scale": cfg.rank_dropout_scale, "module_dropout": cfg.module_dropout,
            "use_effective_conv2d": cfg.effective_conv, "init_weights": True if cfg.init == "peft" else "lycoris",
            "rank_pattern": {}, "alpha_pattern": {}}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict[str, Tensor]]:
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise ValueError(f"PEFT LoKr adapter at '{path}' uses per-layer {key}, which deltatune cannot import yet")
    per_layer = layer_tensors(tensors, {k: k for k in _KEYS}, path)
    if bad := [p for p, parts in per_layer.items() if "lokr_w2" in parts and parts["lokr_w2"].dim() == 3]:
        raise ValueError(_CONV1D_FULL.format(bad[0]))
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    init = pc.get("init_weights", True)
    config = make_config("lokr", r=pc["r"], alpha=pc["alpha"], decompose_both=pc.get("decompose_both", False),
                         decompose_factor=pc.get("decompose_factor", -1), rank_dropout=pc.get("rank_dropout", 0.0),
                         rank_dropout_scale=pc.get("rank_dropout_scale", False),
                         module_dropout=pc.get("module_dropout", 0.0),
                         effective_conv=pc.get("use_effective_conv2d", False),
                         init="lycoris" if init == "lycoris" else "peft", targets=sorted(per_layer))
    state = {f"{p}.{k}": t.flatten(1) if k == "lokr_w2" else t for p, parts in per_layer.items() for k, t in parts.items()}
    return config, state


register_peft(PeftCodec("LOKR", ("lokr",), _export, _load))
