"""Task-vector merging as one pipeline: vectors -> sparsify -> weight -> consensus -> normalise -> lambda -> add.

Task vectors tau_i = theta_i - theta_0 (Ilharco et al. 2022, arXiv:2212.04089). Every stage is a pure function
picked by an enum, and TIES, DARE, Breadcrumbs and DELLA are presets of one frozen config (`MERGE_METHODS`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from deltatune.engine.registry import did_you_mean
from deltatune.merging.sparsify import Sparsify, sparsify

StateDict = Mapping[str, Tensor]


def no_consensus(weighted: Tensor) -> Tensor:
    """Every model contributes to every entry."""
    return torch.ones_like(weighted, dtype=torch.bool)


def sign_mass(weighted: Tensor) -> Tensor:
    """TIES sign election: gamma = sgn(sum_i w_i tau_i), ties -> +; keep agreeing entries (arXiv:2306.01708)."""
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    return weighted.sign() == elected


def sign_count(weighted: Tensor) -> Tensor:
    """Majority vote of signs (one vote per nonzero entry), ties -> +; keep agreeing entries."""
    elected = torch.where(weighted.sign().sum(0) >= 0, 1.0, -1.0)
    return weighted.sign() == elected


class Consensus(str, Enum):
    """Which entries of the (N, ...) stack of weighted task vectors are merged."""

    none = "none"
    sign_mass = "sign_mass"
    sign_count = "sign_count"


CONSENSUS: dict[Consensus, Callable[[Tensor], Tensor]] = {
    Consensus.none: no_consensus,
    Consensus.sign_mass: sign_mass,
    Consensus.sign_count: sign_count,
}


def check_compatible(base: StateDict, others: Sequence[StateDict]) -> None:
    """Raise one ValueError listing every missing/extra key and shape mismatch against `base`."""
    problems = []
    for i, sd in enumerate(others):
        missing, extra = sorted(base.keys() - sd.keys()), sorted(sd.keys() - base.keys())
        problems += [f"model {i} is missing keys {missing}"] if missing else []
        problems += [f"model {i} has extra keys {extra}"] if extra else []
        problems += [
            f"model {i} '{k}' has shape {tuple(sd[k].shape)}, base has {tuple(base[k].shape)}"
            for k in base
            if k in sd and sd[k].shape != base[k].shape
        ]
    if problems:
        raise ValueError("state dicts do not match: " + "; ".join(problems))


def tensor_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): results do not depend on dict order or on the other keys."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))  # CPU generators use 32 bits


class TaskVectorMerge(BaseModel):
    """theta = theta_0 + lambda * combine_i(w_i * sparsify(theta_i - theta_0)); one config covers the family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparsify: Sparsify = Field(Sparsify.none, description="how each task vector is sparsified")
    density: float = Field(1.0, ge=0, le=1, description="fraction of entries kept (in expectation if random)")
    gamma: float = Field(0.01, ge=0, le=1, description="breadcrumbs: fraction of largest |entries| dropped")
    epsilon: float = Field(0.15, ge=0, lt=1, description="DELLA: width of the drop-probability range")
    consensus: Consensus = Field(Consensus.none, description="sign election across task vectors")
    normalize: bool = Field(False, description="divide by the summed weights of the entries that contribute")
    lambda_: float = Field(1.0, description="scale of the merged task vector")
    rescale: bool = Field(True, description="random sparsifiers: scale survivors by 1/keep-probability")
    pretty_name: str = Field("", description="display name")
    url: str = Field("", description="paper")

    def merge_tensor(
        self,
        base: Tensor,
        finetuned: Sequence[Tensor],
        weights: Sequence[float],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run the pipeline for one tensor; computes in float32 and returns base's dtype."""
        if not finetuned or len(finetuned) != len(weights):
            raise ValueError(f"need one weight per fine-tuned tensor, got {len(finetuned)} and {len(weights)}")
        theta0 = base.float()
        kw = dict(density=self.density, gamma=self.gamma, epsilon=self.epsilon, rescale=self.rescale)
        taus = torch.stack([sparsify(self.sparsify, t.float() - theta0, generator=generator, **kw) for t in finetuned])
        w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *[1] * base.dim())  # (N, 1, ...)
        weighted = taus * w  # (N, ...)
        mask = CONSENSUS[self.consensus](weighted)
        merged = (weighted * mask).sum(0)
        if self.normalize:
            divisor = (w * mask).sum(0)
            merged = merged / torch.where(divisor.abs() < 1e-8, 1.0, divisor)
        return (theta0 + self.lambda_ * merged).to(base.dtype)

    def merge_state_dicts(
        self, base: StateDict, finetuned: Sequence[StateDict], weights: Sequence[float], seed: int = 0
    ) -> dict[str, Tensor]:
        """Merge tensor by tensor; non-float tensors (int buffers) are copied from base."""
        check_compatible(base, finetuned)
        return {
            key: self.merge_tensor(b, [sd[key] for sd in finetuned], weights, tensor_generator(seed, key))
            if b.is_floating_point()
            else b.clone()
            for key, b in base.items()
        }


_TIES, _DARE, _BREADCRUMBS, _DELLA = (
    "https://arxiv.org/abs/2306.01708",
    "https://arxiv.org/abs/2311.03099",
    "https://arxiv.org/abs/2312.06795",
    "https://arxiv.org/abs/2406.11617",
)
MERGE_METHODS: dict[str, TaskVectorMerge] = {
    "task_arithmetic": TaskVectorMerge(pretty_name="Task Arithmetic", url="https://arxiv.org/abs/2212.04089"),
    # TIES paper keeps the top 20% per task and takes the disjoint mean.
    "ties": TaskVectorMerge(
        sparsify=Sparsify.magnitude, density=0.2, consensus=Consensus.sign_mass, normalize=True,
        pretty_name="TIES", url=_TIES,
    ),
    # DARE paper drops 90% of SFT deltas (p=0.9); large deltas need a higher density.
    "dare_linear": TaskVectorMerge(sparsify=Sparsify.random, density=0.1, pretty_name="Linear DARE", url=_DARE),
    "dare_ties": TaskVectorMerge(
        sparsify=Sparsify.random, density=0.1, consensus=Consensus.sign_mass, pretty_name="DARE TIES", url=_DARE
    ),
    "breadcrumbs": TaskVectorMerge(
        sparsify=Sparsify.breadcrumbs, density=0.9, gamma=0.01, rescale=False,
        pretty_name="Model Breadcrumbs", url=_BREADCRUMBS,
    ),
    "breadcrumbs_ties": TaskVectorMerge(
        sparsify=Sparsify.breadcrumbs, density=0.9, gamma=0.01, rescale=False, consensus=Consensus.sign_mass,
        pretty_name="Model Breadcrumbs with TIES", url=_BREADCRUMBS,
    ),
    "della": TaskVectorMerge(
        sparsify=Sparsify.magnitude_sampled, density=0.5, epsilon=0.15, consensus=Consensus.sign_mass,
        normalize=True, pretty_name="DELLA", url=_DELLA,
    ),
    "della_linear": TaskVectorMerge(
        sparsify=Sparsify.magnitude_sampled, density=0.5, epsilon=0.15, pretty_name="Linear DELLA", url=_DELLA
    ),
}


def get_merge_method(name: str, **overrides: object) -> TaskVectorMerge:
    """The preset `name` with validated field overrides, e.g. get_merge_method("ties", density=0.5)."""
    if name not in MERGE_METHODS:
        raise ValueError(
            f"unknown merge method '{name}'{did_you_mean(name, MERGE_METHODS)} (known: {', '.join(MERGE_METHODS)})"
        )
    unknown = sorted(overrides.keys() - TaskVectorMerge.model_fields.keys())
    if unknown:
        raise ValueError(f"unknown option '{unknown[0]}'{did_you_mean(unknown[0], TaskVectorMerge.model_fields)}")
    preset = MERGE_METHODS[name]
    return TaskVectorMerge.model_validate({**preset.model_dump(), **overrides})


def linear(models: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Model soup: theta = sum_k w_k theta_k / sum_k w_k (Wortsman et al. 2022, arXiv:2203.05482)."""
    if not models:
        raise ValueError("need at least one model")
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models) or abs(sum(weights)) < 1e-12:
        raise ValueError(f"need one weight per model with a nonzero sum, got {weights} for {len(models)} models")
    check_compatible(models[0], models[1:])
    total = sum(weights)
    return {
        key: (sum(w * sd[key].float() for w, sd in zip(weights, models)) / total).to(first.dtype)
        if first.is_floating_point()
        else first.clone()
        for key, first in models[0].items()
    }
