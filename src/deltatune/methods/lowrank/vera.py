"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., arXiv:2310.11454), Eq. (2):

    y = W0 x + Λ_b B Λ_d A x,   Λ_b = diag(b), Λ_d = diag(d),

A (r x d_in) and B (d_out x r) frozen random matrices shared by every adapted layer, b (d_out) and
d (r) trained per layer. Checked against HF peft 0.21 `tuners/vera` (the paper's reference port):
- one pair A, B per adapter, sized for the largest target layer (max d_out, max d_in) and sliced
  A[:, :d_in], B[:d_out, :] per layer (model.py `_find_dim`, layer.py forward);
- both Kaiming-uniform (gain sqrt(2), bound sqrt(6 / fan_in), fan_in = the row length) drawn from
  one CPU generator seeded with `projection_prng_key` (default 0), A first, then B;
- d starts at d_initial = 0.1, b at 0 (so ΔW = 0 at init); default r = 256; no scale factor.
A and B are non-persistent buffers regenerated from `seed`: a saved adapter holds only b, d and the
seed. PEFT export writes them as `base_model.vera_A` / `vera_B` when save_projection (PEFT's default).
Beyond PEFT (Linear and GPT-2 Conv1D only) the engine's matrix view also adapts Conv and Embedding.
P = r + d_out per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ...engine.fused import LowRank
from ...engine.kinds import CONV1D, LINEAR_KINDS, matrix_shape
from ...engine.layer import Delta, DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from .lora import adapter_dtype


class VeRAConfig(DeltaConfig):
    r: int = Field(256, ge=1, description="rank of the shared random matrices A (r x d_in), B (d_out x r)")
    d_initial: float = Field(0.1, description="initial value of the scaling vector d")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    seed: int = Field(0, ge=0, description="seed of the shared random A, B (PEFT's projection_prng_key)")
    save_projection: bool = Field(True, description="PEFT export writes vera_A / vera_B (PEFT's default)")


def kaiming_bases(r: int, d_out: int, d_in: int, seed: int) -> tuple[Tensor, Tensor]:
    """(A (r, d_in), B (d_out, r)) as PEFT draws them: uniform(±sqrt(6/fan_in)) from one seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(r, d_in).uniform_(-math.sqrt(6 / d_in), math.sqrt(6 / d_in), generator=g)
    B = torch.empty(d_out, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    return A, B


class VeRABases(nn.Module):
    """The adapter's shared A, B for the largest target layer, regenerated from the seed (not saved)."""

    def __init__(self, config: VeRAConfig, layers: list[DeltaLayer]):
        super().__init__()
        d_out = max(layer.matrix().shape[0] for layer in layers)
        d_in = max(layer.matrix().shape[1] for layer in layers)
        A, B = kaiming_bases(config.r, d_out, d_in, config.seed)
        kw = {"dtype": adapter_dtype(layers[0]), "device": layers[0].weight.device}
        self.register_buffer("vera_A", A.to(**kw), persistent=False)  # (r, max d_in)
        self.register_buffer("vera_B", B.to(**kw), persistent=False)  # (max d_out, r)


@register("vera", config=VeRAConfig, family="low-rank", formula="r + d_out", paper="arXiv:2310.11454",
          summary="VeRA: diag(b) B diag(d) A with frozen random A, B shared by all layers")
class VeRA(Delta):
    def __init__(self, config: VeRAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: VeRABases | None = None):
        super().__init__(config, layer, shared=shared)
        if getattr(layer.base_layer, "groups", 1) != 1:
            raise ValueError(f"VeRA cannot adapt a grouped convolution (groups={layer.base_layer.groups})")
        self.d_out, self.d_in = layer.matrix().shape
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **kw))

    @classmethod
    def build_shared(cls, config: VeRAConfig, layers: list[DeltaLayer]) -> VeRABases:
        return VeRABases(config, list(layers))

    def bases(self) -> tuple[Tensor, Tensor]:
        """This layer's slices A[:, :d_in] (r, d_in) and B[:d_out] (d_out, r) of the shared matrices."""
        return self.shared.vera_A[:, : self.d_in], self.shared.vera_B[: self.d_out]

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        A, B = self.bases()
        return (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)  # (d_out, d_in)

    def low_rank(self) -> LowRank:
        """ΔW = (Λb B)(Λd A): scaled copies of the thin shared slices, for the engine's fused paths."""
        A, B = self.bases()
        return LowRank(self.vera_lambda_d[:, None] * A, self.vera_lambda_b[:, None] * B, 1.0,
                       self.dropout_p)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        A, B = self.bases()
        h = layer.apply_matrix(x, A)  # r channels
        h = h * layer.per_channel(self.vera_lambda_d, h)
        y = layer.mix(h, B)  # d_out channels
        return y * layer.per_channel(self.vera_lambda_b, y)


# --- PEFT format (peft_type VERA): per layer vera_lambda_b / vera_lambda_d, shared base_model.vera_A / vera_B


def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, tensors, fan_in_fan_out = adapter.config, {}, False
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        if layer.kind not in LINEAR_KINDS:
            raise ValueError(f"PEFT's VeRA adapts only Linear and GPT-2 Conv1D layers; '{p}' is "
                             f"{type(layer.base_layer).__name__}. Save this adapter with DeltaModel.save instead")
        fan_in_fan_out |= layer.kind is CONV1D
        delta = layer.deltas[adapter.name]
        tensors[f"{p}.vera_lambda_b"], tensors[f"{p}.vera_lambda_d"] = delta.vera_lambda_b, delta.vera_lambda_d
    if cfg.save_projection:
        bases = dm.shared[adapter.name]
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = bases.vera_A, bases.vera_B
    return {"r": cfg.r, "projection_prng_key": cfg.seed, "save_projection": cfg.save_projection,
            "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "fan_in_fan_out": fan_in_fan_out,
            "bias": "none", "init_weights": True}, tensors


def _matrix_shape(module: nn.Module) -> torch.Size:
    if isinstance(module, DeltaLayer):
        return module.matrix().shape
    return matrix_shape(module)


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict[str, Tensor]]:
    if pc.get("bias", "none") != "none":
        raise ValueError(f"PEFT VeRA adapter at '{path}' trains bias={pc['bias']!r}; deltatune imports bias='none'")
    if pc.get("layers_to_transform") is not None:
        raise ValueError(f"PEFT VeRA adapter at '{path}' uses layers_to_transform, which deltatune cannot import")
    A, B = tensors.pop("base_model.vera_A", None), tensors.pop("base_model.vera_B", None)
    per_layer = layer_tensors(tensors, {"vera_lambda_b": "b", "vera_lambda_d": "d"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    config = make_config("vera", r=pc["r"], seed=pc.get("projection_prng_key", 0), dropout=pc.get("vera_dropout", 0.0),
                         d_initial=pc.get("d_initial", 0.1), save_projection=pc.get("save_projection", True),
                         targets=sorted(per_layer))
    if A is not None and B is not None:  # the stored projections must be the ones the seed regenerates
        shapes = [_matrix_shape(dm.model.get_submodule(p)) for p in per_layer]
        ref_A, ref_B = kaiming_bases(config.r, max(s[0] for s in shapes), max(s[1] for s in shapes), config.seed)
        if A.shape != ref_A.shape or B.shape != ref_B.shape or not (torch.allclose(A.float(), ref_A, atol=1e-6)
                                          and torch.allclose(B.float(), ref_B, atol=1e-6)):
            raise ValueError(f"PEFT VeRA adapter at '{path}' stores vera_A / vera_B that projection_prng_key="
                             f"{config.seed} does not regenerate for its target layers; deltatune regenerates "
                             "VeRA's projections from the seed and cannot import these")
    state = {}
    for p, parts in per_layer.items():
        state[f"{p}.vera_lambda_b"], state[f"{p}.vera_lambda_d"] = parts["b"], parts["d"]
    return config, state


register_peft(PeftCodec("VERA", ("vera",), _export, _load))
