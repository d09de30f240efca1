"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023,
arXiv:2303.10512).

    ΔW = s · P Λ Q,   P = lora_B (d_out x r), Λ = diag(lora_E) (r x 1), Q = lora_A (r x d_in),  s = alpha / (r + 1e-5)
    L_reg = orth_reg_weight · mean over the adapter's 2L factors of ||Q Qᵀ - I||_F and ||Pᵀ P - I||_F

Λ starts at zero (P, Q ~ N(0, 0.02)), so the output at init is the base model's. After every optimizer step
(`after_update`, where PEFT's `update_and_allocate` runs), each entry's sensitivity I = |w · ∇w| is smoothed,
Ī ← β1 Ī + (1 - β1) I, with its uncertainty Ū ← β2 Ū + (1 - β2) |I - Ī|; a triplet i scores
S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki), s = Ī · Ū. The budget (kept triplets over all layers) stays
b0 = L · init_r for `tinit` steps, then falls cubically, b(t) = b_T + (b0 - b_T)(1 - (t - tinit)/(T - tfinal - tinit))³
(floored), to b_T = L · target_r at T - tfinal; every `delta_t` steps the triplets with S at or below the
(b0 - b)-th smallest score get Λ_i = 0 (they keep training and may come back at the next allocation, as in
the paper). At t = T - tfinal the mask is final and re-applied after every later step.

Checked against peft 0.21.2 (tuners/adalora: RankAllocator, AdaLoraModel.update_and_allocate) and tested
for parity (tests/methods/test_adalora.py): same seeds and batches give the same masks and weights. PEFT's
quirks are kept: the step index is the 0-based count of earlier steps, so with tfinal = 0 the final forced
allocation never happens (set tfinal >= 1 for a fixed final mask); Λ_i = 0 triplets stay allocated, so
the parameter count is r(d_in + d_out + 1) throughout. Departure: the allocator's state (Ī, Ū per entry,
the last mask) lives in persistent buffers, so checkpoints resume exactly; they are saved with the adapter
(Ī and Ū: twice its parameters, plus a mask). PEFT files hold only the kept triplets (rank_pattern).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...engine.fused import LowRank
from ...engine.kinds import LINEAR_KINDS
from ...engine.layer import Delta, DeltaLayer
from ...engine.peft_format import PeftCodec, layer_tensors, register_peft
from ...engine.registry import DeltaConfig, make_config, register
from ...engine.targeting import require_layers
from ..lowrank._sharing import LayerShared
from ..lowrank.lora import adapter_dtype, check_rank

FACTORS = ("lora_A", "lora_E", "lora_B")


class AdaLoRAConfig(DeltaConfig):
    init_r: int = Field(12, ge=1, description="rank every layer starts with (PEFT init_r)")
    target_r: int = Field(8, ge=0, description="average rank per layer once the budget has fallen (PEFT target_r)")
    alpha: float = Field(8.0, gt=0, description="scale s = alpha / init_r (PEFT lora_alpha)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    tinit: int = Field(0, ge=0, description="warm-up steps at the full budget")
    tfinal: int = Field(0, ge=0, description="final steps at the target budget with the mask fixed")
    delta_t: int = Field(1, ge=1, description="steps between two allocations while the budget falls (PEFT deltaT)")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of the sensitivity |w·grad|")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of its uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality penalty on P and Q")
    total_step: int | None = Field(None, ge=1, description="steps of the schedule; null = the trainer's total")

    @model_validator(mode="after")
    def _check(self) -> AdaLoRAConfig:
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoRA prunes ranks: target_r={self.target_r} must be <= init_r={self.init_r}")
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        return self


def orthogonality(A: Tensor, B: Tensor) -> Tensor:
    """||A Aᵀ - I||_F + ||Bᵀ B - I||_F for Q = A (r x d_in) and P = B (d_out x r)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)


def orthogonality_loss(delta: Any) -> Tensor | None:
    """A delta's share of PEFT's orthogonality penalty: the weight times its layer's term, over 2 x the layers."""
    if delta.config.orth_reg_weight == 0:
        return None
    n = delta.shared.layer_count if delta.shared is not None else 1
    return delta.config.orth_reg_weight * delta.orthogonality() / (2 * n)


def check_schedule(config: Any, total: int) -> None:
    if config.tinit >= total - config.tfinal:
        raise ValueError(f"{type(config).__name__}: tinit={config.tinit} and tfinal={config.tfinal} leave no "
                         f"budgeting phase in {total} steps; need tinit < total_step - tfinal: lower tinit/tfinal "
                         "or train longer")


class AllocatorState(LayerShared):
    """The adapter-wide part: layer count (the penalty's mean), whether a mask was ever set, the schedule length."""

    def __init__(self, layers: Sequence[DeltaLayer]):
        super().__init__(layers)
        self.register_buffer("allocated", torch.zeros((), dtype=torch.bool))
        self.register_buffer("total_step", torch.zeros((), dtype=torch.int64))  # 0: not known yet


@register("adalora", config=AdaLoRAConfig, family="allocation", formula="r(d_in + d_out + 1)",
          paper="arXiv:2303.10512",
          summary="AdaLoRA: SVD-form P Λ Q with importance-driven pruning of Λ to a cubic rank budget")
class AdaLoRA(Delta):
    def __init__(self, config: AdaLoRAConfig, layer: DeltaLayer, initialize: bool = True,
                 shared: nn.Module | None = None):
        super().__init__(config, layer, shared=shared)
        r = self.rank_capacity(config)
        d_out, d_in = check_rank(r, layer, self.method, warn_for=config)
        kw = {"dtype": adapter_dtype(layer), "device": layer.weight.device}
        self.lora_A = nn.Parameter(torch.zeros(r, d_in, **kw))  # Q (r, d_in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))  # Λ (r, 1)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **kw))  # P (d_out, r)
        for name in FACTORS:  # the allocator's smoothed sensitivity and uncertainty of every entry
            p = getattr(self, name)
            self.register_buffer(f"ipt_{name}", torch.zeros_like(p))
            self.register_buffer(f"unc_{name}", torch.zeros_like(p))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=kw["device"]))  # last allocation
        if initialize:
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    @staticmethod
    def rank_capacity(config: Any) -> int:
        return config.init_r

    @property
    def scale(self) -> float:
        return self.config.alpha / (self.rank_capacity(self.config) + 1e-5)  # PEFT: alpha / (ranknum + 1e-5)

    @classmethod
    def build_shared(cls, config: AdaLoRAConfig, layers: Sequence[DeltaLayer]) -> nn.Module:
        return AllocatorState(layers)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(Λ Q, P): ΔW = s · P (Λ Q)."""
        return self.lora_A * self.lora_E, self.lora_B

    def delta_weight(self, layer: DeltaLayer) -> Tensor:
        A, B = self.factors()
        return self.scale * (B @ A)

    def change(self, layer: DeltaLayer, x: Tensor) -> Tensor:
        A, B = self.factors()
        return layer.mix(layer.apply_matrix(x, A), B) * self.scale

    def low_rank(self) -> LowRank | None:
        A, B = self.factors()
        return LowRank(A, B, self.scale, self.dropout_p)

    def orthogonality(self) -> Tensor:
        """||Q Qᵀ - I||_F + ||Pᵀ P - I||_F, unweighted (PEFT's penalty of one layer)."""
        return orthogonality(self.lora_A, self.lora_B)

    def regularizer(self, layer: DeltaLayer) -> Tensor | None:
        return orthogonality_loss(self)

    # --- the allocator ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī, Ū of every entry from this step's gradients (PEFT's RankAllocator.update_ipt)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name in FACTORS:
            p = getattr(self, name)
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            avg, unc = getattr(self, f"ipt_{name}"), getattr(self, f"unc_{name}")
            avg.mul_(b1).add_((1 - b1) * ipt)
            unc.mul_(b2).add_((1 - b2) * (ipt - avg).abs())

    def triplet_scores(self) -> Tensor:
        """S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki), s = Ī·Ū (r,)."""
        s = {n: getattr(self, f"ipt_{n}") * getattr(self, f"unc_{n}") for n in FACTORS}
        return s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)

    @torch.no_grad()
    def reset_importance(self) -> None:
        for name in FACTORS:
            getattr(self, f"ipt_{name}").zero_()
            getattr(self, f"unc_{name}").zero_()

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    @property
    def rank(self) -> int:
        """Triplets kept at the last allocation."""
        return int(self.rank_mask.sum())

    @classmethod
    @torch.no_grad()
    def after_update(cls, deltas: Sequence[Delta], shared: nn.Module | None, step: int,
                     total_steps: int | None) -> None:
        c = deltas[0].config
        total = resolve_total(c, shared, total_steps)
        final = total - c.tfinal
        if step < final:
            for d in deltas:
                d.update_importance()
            budget, mask = budget_schedule(c, len(deltas), step, total)
            if mask:
                mask_to_budget(deltas, budget, shared)
        elif step == final:
            mask_to_budget(deltas, c.target_r * len(deltas), shared)
            for d in deltas:
                d.reset_importance()
        else:
            for d in deltas:
                d.apply_mask()


def resolve_total(config: Any, shared: nn.Module | None, total_steps: int | None) -> int:
    """The schedule's length: the config's total_step, else the trainer's; remembered for the PEFT export."""
    total = config.total_step or total_steps
    if total is None:
        raise ValueError(f"{type(config).__name__} needs the schedule's length: set total_step, or pass "
                         "total_steps to DeltaModel.after_update (the trainer passes its own)")
    check_schedule(config, total)
    if shared is not None:
        shared.total_step.fill_(total)
    return total


def budget_schedule(config: AdaLoRAConfig, layers: int, step: int, total: int) -> tuple[int, bool]:
    """(budget in kept triplets, whether to allocate now) at `step` (PEFT's RankAllocator.budget_schedule)."""
    init_bgt, target_bgt = config.init_r * layers, config.target_r * layers
    if step <= config.tinit:
        return init_bgt, False
    if step > total - config.tfinal:
        return target_bgt, True
    mul = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((init_bgt - target_bgt) * mul ** 3 + target_bgt), step % config.delta_t == 0


def mask_to_budget(deltas: Sequence[AdaLoRA], budget: int, shared: nn.Module | None) -> None:
    """Zero Λ_i of every triplet scoring at or below the (b0 - budget)-th smallest score over all layers."""
    scores = [d.triplet_scores() for d in deltas]
    k = sum(s.numel() for s in scores) - budget
    if k <= 0:
        return
    threshold = torch.kthvalue(torch.cat(scores), k).values.item()
    for d, s in zip(deltas, scores):
        d.rank_mask.copy_(s > threshold)
        d.apply_mask()
    if shared is not None:
        shared.allocated.fill_(True)


def ranks(dm: Any, adapter: str | None = None) -> dict[str, int]:
    """Layer path -> triplets kept at the last allocation, for the AdaLoRA layers of `adapter` (default: all)."""
    return {path: layer.deltas[name].rank for path, layer in dm.layers() for name in layer.deltas
            if isinstance(layer.deltas[name], AdaLoRA) and adapter in (None, name)}


# --- PEFT format (peft_type ADALORA): <path>.lora_A (r' x d_in), lora_E (r' x 1), lora_B (d_out x r') holding
# the r' kept triplets, and rank_pattern {'<path>.lora_E': [kept?] * init_r} once an allocation has run.

def _export(dm: Any, adapter: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    c, name, tensors, pattern = adapter.config, adapter.name, {}, {}
    shared = dm.shared[name] if name in dm.shared else None
    allocated = shared is not None and bool(shared.allocated)
    for p in adapter.paths:
        layer = dm.model.get_submodule(p)
        if layer.kind not in LINEAR_KINDS:
            raise ValueError(f"PEFT's AdaLoRA export covers Linear layers here; '{p}' is "
                             f"{type(layer.base_layer).__name__}. Save this adapter with DeltaModel.save instead")
        d = layer.deltas[name]
        keep = d.rank_mask if allocated else torch.ones_like(d.rank_mask)
        tensors[f"{p}.lora_A"], tensors[f"{p}.lora_E"] = d.lora_A[keep], d.lora_E[keep]
        tensors[f"{p}.lora_B"] = d.lora_B[:, keep]
        pattern[f"{p}.lora_E"] = keep.tolist()
    total = c.total_step or (int(shared.total_step) if shared is not None else 0) or c.tinit + c.tfinal + 1
    return {"init_r": c.init_r, "target_r": c.target_r, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
            "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.delta_t, "beta1": c.beta1, "beta2": c.beta2,
            "orth_reg_weight": c.orth_reg_weight, "total_step": total, "rank_pattern": pattern if allocated else None,
            "r": 8, "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True}, tensors


def _load(dm: Any, pc: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> tuple[DeltaConfig, dict[str, Tensor]]:
    if pc.get("bias", "none") != "none" or pc.get("fan_in_fan_out"):
        raise ValueError(f"PEFT AdaLoRA adapter at '{path}' uses bias={pc.get('bias')!r} / fan_in_fan_out, which "
                         "deltatune does not import (bias='none' on Linear layers only)")
    per_layer = layer_tensors(tensors, {"lora_A": "A", "lora_E": "E", "lora_B": "B"}, path)
    require_layers(dm.model, sorted(per_layer), f"PEFT adapter '{path}'")
    init_r = pc.get("init_r", 12)
    config = make_config("adalora", init_r=init_r, target_r=pc.get("target_r", 8), alpha=pc.get("lora_alpha", 8),
                         dropout=pc.get("lora_dropout", 0.0), tinit=pc.get("tinit", 0), tfinal=pc.get("tfinal", 0),
                         delta_t=pc.get("deltaT", 1), beta1=pc.get("beta1", 0.85), beta2=pc.get("beta2", 0.85),
                         orth_reg_weight=pc.get("orth_reg_weight", 0.5), total_step=pc.get("total_step"),
                         targets=sorted(per_layer))
    pattern = pc.get("rank_pattern") or {}
    state = {"__shared__.allocated": torch.tensor(bool(pattern)),
             "__shared__.total_step": torch.tensor(int(pc.get("total_step") or 0))}
    for p, parts in per_layer.items():
        keep = torch.tensor(pattern.get(f"{p}.lora_E", [True] * init_r), dtype=torch.bool)
        if keep.numel() != init_r or int(keep.sum()) != parts["E"].shape[0]:
            raise ValueError(f"PEFT AdaLoRA adapter at '{path}': layer '{p}' holds {parts['E'].shape[0]} triplets "
                             f"but its rank_pattern keeps {int(keep.sum())} of {keep.numel()} (init_r={init_r})")
        A = parts["A"].new_zeros(init_r, parts["A"].shape[1])
        B = parts["B"].new_zeros(parts["B"].shape[0], init_r)
        E = parts["E"].new_zeros(init_r, 1)
        A[keep], E[keep], B[:, keep] = parts["A"], parts["E"], parts["B"]
        state.update({f"{p}.lora_A": A, f"{p}.lora_E": E, f"{p}.lora_B": B, f"{p}.rank_mask": keep})
        for n, t in (("lora_A", A), ("lora_E", E), ("lora_B", B)):
            state[f"{p}.ipt_{n}"], state[f"{p}.unc_{n}"] = torch.zeros_like(t), torch.zeros_like(t)
    return config, state


register_peft(PeftCodec("ADALORA", ("adalora",), _export, _load))
