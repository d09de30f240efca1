"""Sparsifiers for task vectors: pure tensor -> tensor functions, picked by `Sparsify`.

`density` is always the fraction of entries kept (in expectation for the random ones). Every function
computes in float32 and returns the input dtype.

The deterministic cuts follow mergekit's conventions, so that TIES and Breadcrumbs agree with it entry for
entry: counts are `kept_count` (int(density * numel), truncated, not rounded), and the ranking is the same
float32 torch sort mergekit runs on CPU (the default, unstable one), so that equal magnitudes at the cut
fall the same way in both tools on one torch build.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def kept_count(fraction: float, numel: int) -> int:
    """How many of `numel` entries a fraction selects: int(fraction * numel), mergekit's count (truncated:
    round() would keep one more entry whenever the product's fractional part is >= 0.5)."""
    return int(fraction * numel)


def _keep_ranked(delta: Tensor, start: int, stop: int, descending: bool = False) -> Tensor:
    """Keep the entries ranked [start, stop) by |delta| over the whole tensor (ascending, or descending);
    zero the rest. Exactly stop - start entries, however many share the magnitude at a cut."""
    x = delta.float().flatten()
    order = torch.argsort(x.abs(), descending=descending)  # mergekit's sort, for its tie order (see above)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[order[start:stop]] = True
    return (x * mask).reshape(delta.shape).to(delta.dtype)


def none(delta: Tensor) -> Tensor:
    """No sparsification: the task vector as is."""
    return delta


def magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the kept_count(density, numel) largest |entries| (TIES trim step; Yadav et al. 2023,
    arXiv:2306.01708), ranked as mergekit's `magnitude` ranks them."""
    _check_fraction("density", density)
    return _keep_ranked(delta, 0, kept_count(density, delta.numel()), descending=True)


def random_drop(
    delta: Tensor,
    density: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
    rescale_q: float | None = None,
) -> Tensor:
    """DARE: keep each entry with prob density, scale survivors by 1/density (Yu et al. 2023, arXiv:2311.03099).

    DAREx-q (Deng et al. 2024, arXiv:2410.09344) scales survivors by 1/`rescale_q` instead; q = density is DARE, and
    E[out] = (density / q) * delta. See deltatune.merging.darex for choosing q.
    """
    _check_fraction("density", density)
    if rescale_q is not None and not 0.0 < rescale_q <= 1.0:
        raise ValueError(f"rescale_q must be in (0, 1] (survivors are scaled by 1/q), got {rescale_q}")
    if density == 0.0:
        return torch.zeros_like(delta)
    x = delta.float()
    keep = torch.rand(x.shape, generator=generator) < density  # density=1 keeps all: rand is in [0, 1)
    out = x * keep
    if rescale:
        out = out / (density if rescale_q is None else rescale_q)
    return out.to(delta.dtype)


def breadcrumbs(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the top gamma and the smallest |entries| so density remains (arXiv:2312.06795).

    Counts as mergekit's `magnitude_outliers`: kept_count(density, n) kept, kept_count(gamma, n) outliers
    dropped (fewer when density needs them). Unlike mergekit, a gamma cut of 0 entries keeps the density
    (mergekit's slice [n_bot:-0] then keeps nothing)."""
    _check_fraction("density", density)
    _check_fraction("gamma", gamma)
    n = delta.numel()
    n_keep = kept_count(density, n)
    n_top = min(kept_count(gamma, n), n - n_keep)  # never drop so many outliers that density cannot be met
    return _keep_ranked(delta, n - n_top - n_keep, n - n_top)


def drop_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MAGPRUNE drop probs per row: linear in magnitude rank over [p + eps/2, p - eps/2], p = 1 - density."""
    x = delta.float().reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.float().reshape(1, 1)
    n = x.shape[-1]
    rank = torch.argsort(torch.argsort(x.abs(), dim=-1, stable=True), dim=-1).float()  # 0 = smallest |.|
    step = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    p = 1.0 - density
    return (p + epsilon / 2 - epsilon * step).reshape(delta.shape)


def magnitude_sampled(
    delta: Tensor,
    density: float,
    epsilon: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA MAGPRUNE: drop with rank-based prob p_i, survivors scaled by 1/(1-p_i) (Deep et al. 2024, arXiv:2406.11617)."""
    _check_fraction("density", density)
    if density in (0.0, 1.0):
        return delta if density == 1.0 else torch.zeros_like(delta)  # p in {0, 1}: nothing to sample
    p = 1.0 - density
    if epsilon < 0 or p - epsilon / 2 < 0 or p + epsilon / 2 >= 1:
        raise ValueError(
            f"DELLA needs 0 <= 1 - density - epsilon/2 and 1 - density + epsilon/2 < 1; "
            f"got density={density}, epsilon={epsilon}"
        )
    x = delta.float()
    keep_prob = 1.0 - drop_probabilities(delta, density, epsilon)
    keep = torch.rand(x.shape, generator=generator) < keep_prob
    out = x * keep
    return (out / keep_prob if rescale else out).to(delta.dtype)


class Sparsify(str, Enum):
    """Which sparsifier a merge applies to each task vector."""

    none = "none"
    magnitude = "magnitude"
    random = "random"
    breadcrumbs = "breadcrumbs"
    magnitude_sampled = "magnitude_sampled"


SPARSIFIERS: dict[Sparsify, Callable[..., Tensor]] = {
    Sparsify.none: none,
    Sparsify.magnitude: magnitude,
    Sparsify.random: random_drop,
    Sparsify.breadcrumbs: breadcrumbs,
    Sparsify.magnitude_sampled: magnitude_sampled,
}
_ARGS = {kind: set(inspect.signature(fn).parameters) - {"delta"} for kind, fn in SPARSIFIERS.items()}
_ALL_ARGS = set().union(*_ARGS.values())


def sparsify(kind: Sparsify | str, delta: Tensor, **kw: object) -> Tensor:
    """Apply sparsifier `kind`; keywords it does not take (e.g. `gamma` for DARE) are ignored, unknown ones raise."""
    kind = Sparsify(kind)
    unknown = set(kw) - _ALL_ARGS
    if unknown:
        raise TypeError(f"unknown sparsify arguments {sorted(unknown)}; known: {sorted(_ALL_ARGS)}")
    return SPARSIFIERS[kind](delta, **{k: v for k, v in kw.items() if k in _ARGS[kind]})
