"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning (Liu et al.,
arXiv:2205.05638), Sec. 3.3: learned vectors rescale activations, K <- l_k * K, V <- l_v * V and the FFN
hidden state h <- l_ff * act(W1 x) (so the FFN's second layer sees scaled inputs). As PEFT `ia3` (peft 0.21,
tuners/ia3/layer.py, checked) this is applied per targeted layer:
    output-scaled layer:   y = l * (W0 x + b)      W' = diag(l) W0,  b' = l * b      l: (d_out,)
    feed-forward layer:    y = W0 (l * x) + b      W' = W0 diag(l)                   l: (d_in,)  (conv: in_channels)
`feedforward` names the layers that take input-side scaling (PEFT's `feedforward_modules`). Every l starts
at 1 (PEFT init_ia3_weights=True), so the model equals the base at step 0.

Merge folds l into W (and b); unmerge divides it back (float tolerance, as PEFT). A zero entry of l cannot be
divided out: then merge keeps a copy of the layer's weight and bias and unmerge restores them exactly.
Several active unmerged adapters multiply, as in PEFT (whose layer has one feedforward flag for all adapters;
here each adapter has its own: a feed-forward vector scales the input of the layer so far, an output vector its
output, exactly as merging them in order). Embedding layers are refused (PEFT's ia3 has none; input scaling of
token ids is meaningless).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ...engine.kinds import CONV, CONV1D, EMBEDDING
from ...engine.layer import Delta, DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import matcher, require_layers
from ..lowrank.lora import adapter_dtype
from ._orthogonal import earlier


class IA3Config(DeltaConfig):
    feedforward: list[str] = Field(
        default_factory=list,
        description="targets scaled on the input side (the FFN's second layer, PEFT's feedforward_modules): "
        "names (dotted-path suffix) or 're:<regex>'; every other target is scaled on its output")

    @field_validator("feedforward", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# --- multiplicative merges shared with SSF ---------------------------------------------------------------

def _row_view(layer: DeltaLayer) -> Tensor:
    """The weight as (d_out, -1) rows: the matrix view, or a per-channel weight (norms) as a column."""
    return layer.weight.view(-1, 1) if layer.kind is None else layer.matrix()


def _set_rows(layer: DeltaLayer, rows: Tensor) -> None:
    w = layer.weight
    w.copy_(rows.reshape(w.shape) if layer.kind is None else layer.kind.to_weight(rows.to(w.dtype), w))


def merge_rows(layer: DeltaLayer, v: Tensor, shift: Tensor | None = None) -> dict[str, Tensor]:
    """W <- diag(v) W, b <- v * b + shift; returns the undo state (the old bias, and W if v has a zero)."""
    undo = {} if bool((v != 0).all()) else {"weight": layer.weight.detach().clone()}
    rows = _row_view(layer)
    _set_rows(layer, rows * v.to(rows.dtype)[:, None])
    if (bias := getattr(layer.base_layer, "bias", None)) is not None:
        undo["bias"] = bias.detach().clone()  # kept exactly: (b' - shift) / v can lose digits
        new = bias * v.to(bias.dtype) + (0 if shift is None else shift.to(bias.dtype))
        bias.copy_(new)
    return undo


def unmerge_rows(layer: DeltaLayer, v: Tensor, undo: dict[str, Tensor]) -> None:
    if "weight" in undo:
        layer.weight.copy_(undo["weight"])
    else:
        rows = _row_view(layer)
        _set_rows(layer, rows / v.to(rows.dtype)[:, None])
    if "bias" in undo:
        layer.base_layer.bias.copy_(undo["bias"])


def columns_scaled(layer: DeltaLayer, M: Tensor, v: Tensor, inverse: bool = False) -> Tensor:
    """M diag(v) for a (d_out, d_in) matrix view M, v over the input channels (inverse: divide by v)."""
    g = layer.base_layer.groups if layer.kind is CONV else 1
    view = M.reshape(g, M.shape[0] // g, v.numel() // g, -1)  # (groups, d_out/groups, in/groups, kernel)
    v = v.to(M.dtype).reshape(g, 1, -1, 1)  # (groups, 1, in/groups, 1)
    return (view / v if inverse else view * v).reshape(M.shape)


def scale_columns(layer: DeltaLayer, v: Tensor, inverse: bool = False) -> None:
    """W <- W diag(v) over input channels (inverse: divide by v)."""
    w = layer.weight
    w.copy_(layer.kind.to_weight(columns_scaled(layer, layer.matrix(), v, inverse), w))


@register("ia3", config=IA3Config, family="multiplicative", formula="d_out (d_in for feedforward layers)",
          paper="arXiv:2205.05638", summary="(IA)^3: learned vectors rescale a layer's output (or FFN input)")
class IA3(Delta):
    additive = False  # it rescales the whole layer output
    composes = True  # several active (IA)^3 vectors multiply, as PEFT; stacked on other deltas as merging them would

    def __init__(self, config: IA3Config, layer: DeltaLayer, initialize: bool = True, shared: Any = None):
        super().__init__(config, layer)
        if layer.kind is EMBEDDING:
            raise ValueError("(IA)^3 does not adapt nn.Embedding layers (nor does PEFT's ia3); exclude them")
        self.feedforward = bool(config.feedforward) and any(
            matcher(s)(path, layer.base_layer) for path in [layer.path] for s in config.feedforward)
        if self.feedforward:
            n = layer.base_layer.in_channels if layer.kind is CONV else layer.matrix().shape[1]
            self.uses_base_output = False  # forward runs the base layer on the scaled input
        else:
            n = layer.matrix().shape[0]
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=adapter_dtype(layer), device=layer.weight.device))

    def forward(self, layer: DeltaLayer, x: Tensor, out: Tensor | None) -> Tensor:
        if self.feedforward:  # the layer so far (the base alone unless stacked) on the scaled input
            return earlier(layer, self, (x * layer.per_channel(self.ia3_l, x)).to(x.dtype))
        return (out * layer.per_channel(self.ia3_l, out)).to(out.dtype)

    def fold(self, layer: DeltaLayer, W: Tensor) -> Tensor:
        """The (d_out x d_in) matrix W with this delta merged: W diag(l) (feedforward) or diag(l) W."""
        return columns_scaled(layer, W, self.ia3_l) if self.feedforward else W * self.ia3_l.to(W.dtype)[:, None]

    @torch.no_grad()
    def merge(self, layer: DeltaLayer) -> Any:
        if not self.feedforward:
            return merge_rows(layer, self.ia3_l)
        undo = {} if bool((self.ia3_l != 0).all()) else {"weight": layer.weight.detach().clone()}
        scale_columns(layer, self.ia3_l)
        return undo

    @torch.no_grad()
    def unmerge(self, layer: DeltaLayer, undo: Any) -> None:
        if not self.feedforward:
            unmerge_rows(layer, self.ia3_l, undo)
        elif "weight" in undo:
            layer.weight.copy_(undo["weight"])
        else:
            scale_columns(layer, self.ia3_l, inverse=True)


# --- PEFT format: '<path>.ia3_l', (d_out, 1) / (1, d_in) for linear, (1, C, 1, 1) for conv ----------------

def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors, ff, fan_in_fan_out = {}, [], False
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        delta = layer.deltas[adapter.name]
        if isinstance(layer.base_layer, nn.Conv1d):
            raise ValueError(f"PEFT's ia3 cannot hold nn.Conv1d layer '{p}'; save with DeltaModel.save instead")
        vec = delta.ia3_l
        if layer.kind is CONV:
            vec = vec.reshape(1, -1, *[1] * (layer.weight.dim() - 2))
        else:
            vec = vec[None, :] if delta.feedforward else vec[:, None]
        tensors[f"{p}.ia3_l"] = vec
        ff += [p] if delta.feedforward else []
        fan_in_fan_out |= layer.kind is CONV1D
    return {"feedforward_modules": ff, "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": True}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict]:
    per_layer = layer_tensors(tensors, {"ia3_l": "l"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    ff_spec = pc.get("feedforward_modules") or []

    def is_ff(key: str) -> bool:  # PEFT's rule: a string is a full-match regex, a list matches key suffixes
        return bool(re.fullmatch(ff_spec, key)) if isinstance(ff_spec, str) else any(key.endswith(s) for s in ff_spec)

    ff = sorted(p for p in per_layer if is_ff(p))
    config = make_config("ia3", feedforward=ff, targets=sorted(per_layer))
    return config, {f"{p}.ia3_l": parts["l"].reshape(-1) for p, parts in per_layer.items()}


register_peft(PeftCodec("IA3", ("ia3",), _export, _load))
