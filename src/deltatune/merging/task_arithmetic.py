"""Task-vector merging as one pipeline: vectors -> sparsify -> weight -> consensus -> normalise -> lambda -> add.

Task vectors tau_i = theta_i - theta_0 (Ilharco et al. 2022, arXiv:2212.04089). Every stage is a pure function
picked by an enum, and TIES, DARE (and DAREx-q), Breadcrumbs, DELLA, Fisher and PCB merging are presets of
one frozen config (`MERGE_METHODS`). The weight stage is per entry: w_i times an optional `importance[i]` (a
diagonal Fisher) times the balance scores (PCB), so consensus and normalisation see the same entry weights.
Each model may have its own sparsifier parameters (`model_parameters`: density, gamma, epsilon, as mergekit's
per-model parameters), over the config's.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from deltatune.engine.registry import did_you_mean
from deltatune.merging.pcb import pcb_balance
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


class Balance(str, Enum):
    """Per-entry weights on top of the scalar w_i."""

    none = "none"  # w_i (times `importance` when one is given)
    fisher = "fisher"  # w_i * importance_i, required: a diagonal Fisher (Matena & Raffel, arXiv:2111.09832)
    pcb = "pcb"  # w_i * PCB scores computed from the stacked task vectors (Du et al., arXiv:2410.02396)


def no_balance(taus: Tensor, cfg: TaskVectorMerge) -> tuple[Tensor, Tensor]:
    """Task vectors unchanged, every entry scored 1."""
    return taus, torch.ones(())


def pcb(taus: Tensor, cfg: TaskVectorMerge) -> tuple[Tensor, Tensor]:
    """Clipped task vectors and their PCB scores; `density` is PCB's pcb_ratio."""
    return pcb_balance(taus, ratio=cfg.density, clip=cfg.pcb_clip)


BALANCE: dict[Balance, Callable[[Tensor, TaskVectorMerge], tuple[Tensor, Tensor]]] = {
    Balance.none: no_balance,
    Balance.fisher: no_balance,
    Balance.pcb: pcb,
}

NEEDS_IMPORTANCE = (
    "merge method 'fisher' needs per-entry importance for every model: estimate it with "
    "deltatune.merging.fisher.estimate_fisher(model, batches) and save_fisher(...), then pass "
    "importance=[...] (or give each model a `fisher:` file in a merge config)"
)


# The parameters one model may set for its own task vector (mergekit's per-model `parameters`, weight aside).
PER_MODEL = ("density", "gamma", "epsilon")


def stack_importance(importance: Sequence[Tensor], base: Tensor, n: int, floor: float) -> Tensor:
    """(N, ...) float32 stack of the importance tensors, checked and raised to at least `floor`."""
    if len(importance) != n:
        raise ValueError(f"need one importance tensor per fine-tuned tensor, got {len(importance)} for {n}")
    for i, imp in enumerate(importance):
        if imp.shape != base.shape:
            raise ValueError(f"importance {i} has shape {tuple(imp.shape)}, the tensor {tuple(base.shape)}")
    stacked = torch.stack([imp.float() for imp in importance])
    if not torch.isfinite(stacked).all() or (stacked < 0).any():
        raise ValueError("importance must be finite and >= 0 (a diagonal Fisher is a mean of squares)")
    return stacked.clamp_min(floor)


def check_importance(base: StateDict, importance: Sequence[StateDict], n: int) -> None:
    """Each importance dict covers the same tensors, all of them in `base`."""
    if len(importance) != n:
        raise ValueError(f"need one importance dict per fine-tuned model, got {len(importance)} for {n}")
    for i, imp in enumerate(importance):
        unknown = sorted(imp.keys() - base.keys())
        if unknown:
            raise ValueError(f"importance {i} names tensors the base lacks: {unknown[:5]}"
                             f"{did_you_mean(unknown[0], base)}")
        if not imp:
            raise ValueError(f"importance {i} is empty")
        if imp.keys() != importance[0].keys():
            diff = sorted(imp.keys() ^ importance[0].keys())[:5]
            raise ValueError(f"importance {i} and importance 0 cover different tensors, e.g. {diff}")


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
    rescale_q: float | None = Field(
        None, gt=0, le=1, description="DAREx-q: scale DARE survivors by 1/q, not 1/density (None = DARE)"
    )
    balance: Balance = Field(Balance.none, description="per-entry weights: none, fisher (importance) or pcb")
    pcb_clip: float = Field(1e-4, ge=0, lt=0.5, description="PCB: fraction of smallest/largest |tau| clipped")
    importance_floor: float = Field(
        1e-6, ge=0, description="importance entries below this are raised to it (Fisher merging's fisher_floor)"
    )
    consensus: Consensus = Field(Consensus.none, description="sign election across task vectors")
    normalize: bool = Field(False, description="divide by the summed weights of the entries that contribute")
    lambda_: float = Field(1.0, description="scale of the merged task vector")
    rescale: bool = Field(True, description="random sparsifiers: scale survivors by 1/keep-probability")
    pretty_name: str = Field("", description="display name")
    url: str = Field("", description="paper")

    @model_validator(mode="after")
    def _stages_fit(self) -> TaskVectorMerge:
        if self.balance is Balance.pcb and self.sparsify is not Sparsify.none:
            raise ValueError("PCB drops entries itself (density is its pcb_ratio): set sparsify='none'")
        if self.rescale_q is not None and (self.sparsify is not Sparsify.random or not self.rescale):
            raise ValueError("rescale_q (DAREx-q) rescales DARE survivors: set sparsify='random', rescale=True")
        return self

    def for_models(self, model_parameters: Sequence[Mapping[str, float]] | None, n: int) -> list[TaskVectorMerge]:
        """One validated config per model: this one with the model's own PER_MODEL values (None: this one)."""
        if model_parameters is None:
            return [self] * n
        if len(model_parameters) != n:
            raise ValueError(f"need one model_parameters mapping per model, got {len(model_parameters)} for {n}")
        methods = []
        for i, params in enumerate(model_parameters):
            unknown = sorted(set(params) - set(PER_MODEL))
            if unknown:
                hint = " (weights are given as `weights`)" if unknown[0] == "weight" else ""
                raise ValueError(f"unknown per-model parameter '{unknown[0]}' of model {i}"
                                 f"{did_you_mean(unknown[0], PER_MODEL)}{hint}; known: {', '.join(PER_MODEL)}")
            if "density" in params and self.balance is Balance.pcb:
                raise ValueError("PCB's density is its pcb_ratio over all models' entries together, so it cannot "
                                 "differ per model; set it once in the method's parameters")
            try:
                methods.append(self.model_validate({**self.model_dump(), **params}) if params else self)
            except ValidationError as err:
                what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"per-model parameters of model {i} are invalid: {what}") from None
        return methods

    def sparsify_options(self) -> dict[str, object]:
        """The keyword arguments of `sparsify` that this config sets."""
        return dict(density=self.density, gamma=self.gamma, epsilon=self.epsilon, rescale=self.rescale,
                    rescale_q=self.rescale_q)

    def merge_tensor(
        self,
        base: Tensor,
        finetuned: Sequence[Tensor],
        weights: Sequence[float],
        generator: torch.Generator | None = None,
        importance: Sequence[Tensor] | None = None,
        model_parameters: Sequence[Mapping[str, float]] | None = None,
    ) -> Tensor:
        """Run the pipeline for one tensor; computes in float32 and returns base's dtype.

        `importance[i]` (base's shape, >= 0) multiplies w_i entry-wise before consensus and normalisation;
        with normalize=True and F_i = importance[i] this is Fisher merging (Matena & Raffel, arXiv:2111.09832):
        theta0 + sum_i w_i F_i tau_i / sum_i w_i F_i = sum_i w_i F_i theta_i / sum_i w_i F_i.

        `model_parameters[i]` (optional, e.g. {"density": 0.7}): model i's own PER_MODEL values for
        sparsifying its task vector, over this config's (mergekit's per-model parameters).
        """
        if not finetuned or len(finetuned) != len(weights):
            raise ValueError(f"need one weight per fine-tuned tensor, got {len(finetuned)} and {len(weights)}")
        if importance is None and self.balance is Balance.fisher:
            raise ValueError(NEEDS_IMPORTANCE)
        theta0 = base.float()
        methods = self.for_models(model_parameters, len(finetuned))
        taus = torch.stack([sparsify(m.sparsify, t.float() - theta0, generator=generator, **m.sparsify_options())
                            for m, t in zip(methods, finetuned)])
        taus, scores = BALANCE[self.balance](taus, self)  # (N, ...), scores broadcast to it
        w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *[1] * base.dim()) * scores  # (N, ...)
        if importance is not None:
            w = w * stack_importance(importance, base, len(finetuned), self.importance_floor)
        weighted = taus * w  # (N, ...)
        del taus  # each (N, ...) stack is N tensors' worth of memory: free them as soon as they are used
        mask = CONSENSUS[self.consensus](weighted)
        merged = weighted.mul_(mask).sum(0)
        del weighted
        if self.normalize:
            contributing = w * mask  # (N, ...)
            divisor = contributing.sum(0)
            # no contributor (or weights that cancel): keep the plain sum rather than divide by ~0
            degenerate = divisor.abs() <= 1e-8 * contributing.abs_().sum(0)
            del contributing
            merged = merged / torch.where(degenerate, 1.0, divisor)
        return (theta0 + self.lambda_ * merged).to(base.dtype)

    def merge_state_dicts(
        self,
        base: StateDict,
        finetuned: Sequence[StateDict],
        weights: Sequence[float],
        seed: int = 0,
        importance: Sequence[StateDict] | None = None,
        model_parameters: Sequence[Mapping[str, float]] | None = None,
    ) -> dict[str, Tensor]:
        """Merge tensor by tensor; non-float tensors (int buffers) are copied from base.

        `importance[i][key]` is passed through to merge_tensor. Tensors the importance dicts do not cover
        (frozen parameters, buffers) are merged without it, i.e. with isotropic Fisher: the weighted mean.
        `model_parameters` (one mapping per model, see merge_tensor) applies to every tensor.
        """
        check_compatible(base, finetuned)
        if importance is None and self.balance is Balance.fisher:
            raise ValueError(NEEDS_IMPORTANCE)
        if importance is not None:
            check_importance(base, importance, len(finetuned))
        self.for_models(model_parameters, len(finetuned))  # bad per-model parameters fail before any work
        covered = importance[0].keys() if importance else set()
        plain = self.model_copy(update={"balance": Balance.none}) if self.balance is Balance.fisher else self
        merged = {}
        for key, b in base.items():
            if not b.is_floating_point():
                merged[key] = b.clone()
                continue
            tensors, generator = [sd[key] for sd in finetuned], tensor_generator(seed, key)
            if key in covered:
                per_model = [imp[key] for imp in importance]
                merged[key] = self.merge_tensor(b, tensors, weights, generator, importance=per_model,
                                                model_parameters=model_parameters)
            else:
                merged[key] = plain.merge_tensor(b, tensors, weights, generator, model_parameters=model_parameters)
        return merged


_TIES, _DARE, _BREADCRUMBS, _DELLA, _FISHER, _PCB = (
    "https://arxiv.org/abs/2306.01708",
    "https://arxiv.org/abs/2311.03099",
    "https://arxiv.org/abs/2312.06795",
    "https://arxiv.org/abs/2406.11617",
    "https://arxiv.org/abs/2111.09832",
    "https://arxiv.org/abs/2410.02396",
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
    # sum_i w_i F_i theta_i / sum_i w_i F_i; needs importance= (estimate_fisher); official fisher_floor 1e-6
    "fisher": TaskVectorMerge(
        balance=Balance.fisher, normalize=True, pretty_name="Fisher merging", url=_FISHER
    ),
    # official code: pcb_ratio 0.05-0.2 (density here), clip 0.0001; tune lambda on validation (0.8-2.2, T5)
    "pcb": TaskVectorMerge(
        balance=Balance.pcb, density=0.1, normalize=True, pretty_name="PCB-Merging", url=_PCB
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
