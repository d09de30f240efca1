"""Low-rank factorisation of linear layers (truncated SVD), and LASER.

Truncated SVD: W = U S V^T (d_out x d_in) is replaced by the two thin factors U_k S_k (d_out x k) and
V_k^T (k x d_in), the best rank-k approximation in Frobenius norm (Eckart-Young). One matmul of
d_out * d_in multiply-adds becomes two of k * (d_in + d_out), a saving only while k < d_out d_in / (d_out + d_in).
k is given directly, or as the smallest rank whose singular values keep a fraction `energy` of
sum(S^2) = ||W||_F^2.

LASER: *The Truth is in There: Improving Reasoning in Language Models with Layer-Selective Rank
Reduction*, Sharma, Ash & Misra 2023, https://arxiv.org/abs/2312.13558. One chosen matrix is replaced by
its rank-k truncation in place (same shape, no new parameters); which layer, which matrix and what
fraction to keep are chosen by a validation search. Checked against the official code
(github.com/pratyushasharma/laser, src/laser/matrix_utils.py `do_low_rank`): k = int(fraction * min(d_out,
d_in)) with the kept fraction written there as (10 - rate) / 10. That code uses the randomised
`torch.svd_lowrank(niter=2)`; this one uses the exact SVD (deterministic, and the same up to its error).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.engine.kinds import float_kind_of, kind_of
from deltatune.engine.registry import did_you_mean
from deltatune.engine.targeting import get_parent, named_layers, resolve


class LowRankLinear(nn.Module):
    """y = US (Vt x) + b: a linear layer stored as two thin factors of rank k.

    Args:
        US: (d_out, k), U_k diag(S_k).
        Vt: (k, d_in), V_k^T.
        bias: (d_out,) or None, kept from the layer it replaces.
    """

    def __init__(self, US: Tensor, Vt: Tensor, bias: Tensor | None = None):
        super().__init__()
        if US.shape[1] != Vt.shape[0]:
            raise ValueError(f"factor shapes {tuple(US.shape)} and {tuple(Vt.shape)} do not share a rank")
        self.US = nn.Parameter(US)
        self.Vt = nn.Parameter(Vt)
        self.register_parameter("bias", nn.Parameter(bias) if bias is not None else None)
        self.out_features, self.rank = US.shape
        self.in_features = Vt.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The rank-`rank` truncated SVD of `linear` (same dtype and device)."""
        US, Vt = truncated_svd(linear.weight.detach(), rank)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        layer = cls(US.to(linear.weight.dtype), Vt.to(linear.weight.dtype), bias)
        layer.requires_grad_(linear.weight.requires_grad)
        return layer

    @classmethod
    def placeholder(cls, d_out: int, d_in: int, rank: int, bias: bool) -> LowRankLinear:
        """Zero factors of the given shape, to load saved factors into."""
        return cls(torch.zeros(d_out, rank), torch.zeros(rank, d_in), torch.zeros(d_out) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.Vt), self.US, self.bias)  # (..., d_in) -> (..., k) -> (..., d_out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


def truncated_svd(W: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(U_k S_k, V_k^T) of a (d_out, d_in) matrix, computed in float32."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U[:, :k] * S[:k], Vh[:k]


def rank_for_energy(S: Tensor, energy: float) -> int:
    """The smallest k with sum(S[:k]^2) >= energy * sum(S^2) (S sorted descending)."""
    cumulative = S.double().pow(2).cumsum(0)
    k = int((cumulative < energy * cumulative[-1]).sum().item()) + 1
    return min(k, len(S))  # rounding can leave energy=1.0 a hair above the total


def max_useful_rank(d_out: int, d_in: int) -> int:
    """The largest k whose factors k * (d_out + d_in) hold fewer parameters than d_out * d_in."""
    return (d_out * d_in - 1) // (d_out + d_in)


@dataclass(frozen=True)
class FactorizedLayer:
    """One target of `factorize`: its shape, the rank chosen, and why it stayed dense (if it did)."""

    path: str
    d_out: int
    d_in: int
    rank: int
    skipped: str | None = None  # the reason the layer kept its dense weight

    @property
    def params_before(self) -> int:
        return self.d_out * self.d_in

    @property
    def params_after(self) -> int:
        return self.params_before if self.skipped else self.rank * (self.d_out + self.d_in)


@dataclass(frozen=True)
class LowRankReport:
    """Weight parameters and matmul FLOPs per token of the targeted layers, before and after (biases unchanged)."""

    layers: list[FactorizedLayer] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def flops_before(self) -> int:
        return 2 * self.params_before  # one multiply and one add per weight and token

    @property
    def flops_after(self) -> int:
        return 2 * self.params_after

    @property
    def factorized(self) -> list[FactorizedLayer]:
        return [layer for layer in self.layers if not layer.skipped]

    def require_change(self, rank: int | None, energy: float | None) -> None:
        """Refuse a factorisation that left every layer dense (an unchanged model), naming the rank that helps."""
        if self.factorized:
            return
        linear = [x for x in self.layers if x.rank]  # skipped for size; non-Linear layers have rank 0
        if not linear:
            kinds = sorted({x.skipped for x in self.layers if x.skipped})
            raise ValueError(f"lowrank: none of the {len(self.layers)} target layers is an nn.Linear ({kinds[:2]}); "
                             "target linear layers")
        best = max(linear, key=lambda x: max_useful_rank(x.d_out, x.d_in))
        useful = max_useful_rank(best.d_out, best.d_in)
        asked = f"rank {rank}" if rank is not None else f"energy {energy} (rank {min(x.rank for x in linear)} or more)"
        fix = f"pass rank <= {useful}" if rank is not None else f"lower the energy, or pass rank <= {useful}"
        raise ValueError(f"lowrank: {asked} factorises none of the {len(self.layers)} target layers, so the model "
                         f"would be unchanged: factors save parameters only below d_out*d_in/(d_out+d_in); the "
                         f"largest useful rank is {useful} (layer '{best.path}', {best.d_out}x{best.d_in}): {fix}")

    def to_dict(self) -> dict[str, Any]:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "flops_per_token_before": self.flops_before, "flops_per_token_after": self.flops_after,
                "layers": [{"path": x.path, "shape": [x.d_out, x.d_in], "rank": x.rank, "skipped": x.skipped}
                           for x in self.layers]}

    def to_markdown(self) -> str:
        saved = 1 - self.params_after / self.params_before if self.params_before else 0.0
        lines = [f"Low-rank factorisation: {len(self.factorized)} of {len(self.layers)} layers factorised; "
                 f"weights {self.params_before:,} -> {self.params_after:,} ({100 * saved:.1f}% fewer), "
                 f"FLOPs/token {self.flops_before:,} -> {self.flops_after:,}", "",
                 "| layer | shape | rank | parameters | note |", "|---|---|---|---|---|"]
        lines += [f"| {x.path} | {x.d_out}x{x.d_in} | {x.rank} | {x.params_before:,} -> {x.params_after:,} | "
                  f"{x.skipped or ''} |" for x in self.layers]
        return "\n".join(lines)


def _block_linears(model: nn.Module) -> list[str]:
    """Default targets: the layers inside the repeated blocks (the embeddings and output head stay dense)."""
    from deltatune.compression.layers import find_blocks

    path, _ = find_blocks(model)
    return [f"re:{re.escape(path)}\\..*"]


def _choose_rank(S: Tensor, rank: int | None, energy: float | None) -> int:
    return min(rank, len(S)) if rank is not None else rank_for_energy(S, energy)


@torch.no_grad()
def factorize(model: nn.Module, targets: Any = None, *, rank: int | None = None, energy: float | None = None,
              exclude: Any = None) -> LowRankReport:
    """Replace each targeted nn.Linear by a LowRankLinear of its truncated SVD, in place.

    Args:
        model: any module; the replaced layers keep their dtype, device and requires_grad.
        targets: names / 're:<regex>' / types as in `deltatune.engine.targeting`; None = every layer
            inside the model's repeated blocks.
        rank: keep this many singular values (capped at min(d_out, d_in)); or
        energy: keep the fewest singular values holding this fraction of ||W||_F^2, in (0, 1].
        exclude: layers to leave alone, same forms as targets.

    A layer is left dense, with the reason in the report, when it is not an nn.Linear or when its
    factors would hold as many parameters as its weight (rank >= d_out d_in / (d_out + d_in)).
    At full rank the factorised layer reproduces the original up to float32 rounding.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (an int >= 1) or energy (a fraction in (0, 1])")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    paths = resolve(model, _block_linears(model) if targets is None else targets, exclude)
    layers = []
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            shape = tuple(getattr(module, "weight", torch.empty(0, 0)).shape[:2])
            layers.append(FactorizedLayer(path, *shape, 0, f"{type(module).__name__} is not an nn.Linear"))
            continue
        S = torch.linalg.svdvals(module.weight.float())
        k = _choose_rank(S, rank, energy)
        d_out, d_in = module.weight.shape
        if k > max_useful_rank(d_out, d_in):
            layers.append(FactorizedLayer(path, d_out, d_in, k, f"rank {k} saves nothing "
                                          f"(needs <= {max_useful_rank(d_out, d_in)})"))
            continue
        parent, name = get_parent(model, path)
        setattr(parent, name, LowRankLinear.from_linear(module, k))
        layers.append(FactorizedLayer(path, d_out, d_in, k))
    return LowRankReport(layers)


def _layer(model: nn.Module, path: str) -> nn.Module:
    layers = dict(named_layers(model))
    if path not in layers:
        raise ValueError(f"model has no layer '{path}'{did_you_mean(path, layers)}")
    module = layers[path]
    if float_kind_of(module, path, "reduce the rank of") is None:
        raise ValueError(f"layer '{path}' ({type(module).__name__}) has no weight matrix to reduce")
    return module


@torch.no_grad()
def laser(model: nn.Module, layer_path: str, keep_fraction: float) -> int:
    """Replace the weight of `layer_path` by its rank-k truncation in place; returns k.

    k = max(1, int(keep_fraction * min(d_out, d_in))), as in the official code. Works on any layer kind
    deltatune adapts (Linear, conv kernels flattened to d_out x d_in, Embedding, GPT-2 Conv1D).
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    module = _layer(model, layer_path)
    kind = kind_of(module)
    M = kind.to_matrix(module.weight)  # (d_out, d_in)
    k = max(1, int(keep_fraction * min(M.shape)))
    US, Vt = truncated_svd(M, k)
    module.weight.copy_(kind.to_weight(US @ Vt, module.weight).to(module.weight.dtype))
    return k


@dataclass(frozen=True)
class LaserResult:
    """The metric of the unchanged model, of every candidate, and the candidate kept (None: none helped)."""

    baseline: float
    scores: dict[tuple[str, float], float]
    best: tuple[str, float] | None

    @property
    def best_score(self) -> float:
        return self.scores[self.best] if self.best is not None else self.baseline


def laser_search(model: nn.Module, candidates: Iterable[tuple[str, float]], evaluate: Callable[[nn.Module], float],
                 *, goal: Literal["min", "max"] = "min") -> LaserResult:
    """Try each (layer_path, keep_fraction), keep the one with the best validation metric, if it beats none.

    Args:
        candidates: (layer path, fraction of the rank kept) pairs, e.g. the MLP matrices of the last
            layers at fractions 0.1, 0.05, 0.01 (the paper's search space).
        evaluate: model -> validation metric (e.g. perplexity on held-out text).
        goal: "min" when lower is better (loss, perplexity), "max" for accuracy.
    Each candidate is tried on the original weights (restored after scoring); the winner is applied in place.
    """
    if goal not in ("min", "max"):
        raise ValueError(f"goal must be 'min' or 'max', got {goal!r}")
    sign = 1.0 if goal == "min" else -1.0
    candidates = list(candidates)
    if not candidates:
        raise ValueError("laser_search needs at least one (layer_path, keep_fraction) candidate")
    baseline = evaluate(model)
    scores: dict[tuple[str, float], float] = {}
    for path, fraction in candidates:
        weight = _layer(model, path).weight
        saved = weight.detach().clone()
        laser(model, path, fraction)
        scores[(path, fraction)] = evaluate(model)
        with torch.no_grad():
            weight.copy_(saved)
    best = min(scores, key=lambda c: sign * scores[c])
    if sign * scores[best] >= sign * baseline:
        return LaserResult(baseline, scores, None)
    laser(model, *best)
    return LaserResult(baseline, scores, best)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Put zero LowRankLinear placeholders of the given ranks at `ranks`' paths (before loading saved factors)."""
    for path, k in ranks.items():
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"saved factors at '{path}' but the rebuilt model has a {type(module).__name__} there")
        parent, name = get_parent(model, path)
        d_out, d_in = module.weight.shape
        setattr(parent, name, LowRankLinear.placeholder(d_out, d_in, k, module.bias is not None))


def saved_ranks(shapes: dict[str, Sequence[int]]) -> dict[str, int]:
    """{layer path: rank} of the LowRankLinear factors in a saved state dict's {key: shape}."""
    return {key[: -len(".US")]: shape[1] for key, shape in shapes.items() if key.endswith(".US")}
