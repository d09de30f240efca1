"""Sparsifiers: exact counts for the deterministic ones, unbiasedness over seeds for DARE and DELLA."""

from __future__ import annotations

import pytest
import torch

from deltatune.merging.sparsify import (
    Sparsify,
    breadcrumbs,
    drop_probabilities,
    kept_count,
    magnitude,
    magnitude_sampled,
    random_drop,
    sparsify,
)


def distinct(n: int, seed: int = 0) -> torch.Tensor:
    """n entries with distinct magnitudes 1..n, random signs, shuffled."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.arange(1, n + 1, dtype=torch.float32)[torch.randperm(n, generator=g)]
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mags * signs


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 0.93, 1.0])
def test_magnitude_keeps_the_largest(density: float) -> None:
    x = distinct(60).reshape(6, 10)
    out = magnitude(x, density)
    k = int(density * x.numel())
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], x[kept])  # survivors untouched
    if 0 < k < x.numel():
        assert x[kept].abs().min() > x[~kept].abs().max()


def test_breadcrumbs_drops_top_gamma_and_keeps_density() -> None:
    x = distinct(100)
    out = breadcrumbs(x, density=0.6, gamma=0.1)
    kept_mags = sorted(int(v) for v in out[out != 0].abs())
    assert kept_mags == list(range(31, 91))  # ranks 31..90: top 10 and bottom 30 gone
    assert torch.equal(out[out != 0], x[out != 0])


def test_breadcrumbs_shrinks_gamma_when_density_needs_it() -> None:
    x = distinct(10)
    out = breadcrumbs(x, density=0.95, gamma=0.2)  # int(9.5) = 9 kept: only 1 of the 2 outliers can go
    assert sorted(int(v) for v in out[out != 0].abs()) == list(range(1, 10))
    assert torch.equal(breadcrumbs(x, density=1.0, gamma=0.3), x)


# (numel, density): mergekit keeps int(density * numel); the starred rows are where round() keeps one more
# (a fractional part >= 0.5, or a product just under an integer: 0.29 * 100 = 28.999999999999996).
COUNTS = [(100, 0.29), (10, 0.95), (121, 0.55), (576, 0.3), (1000, 0.9995), (7, 0.5), (3, 0.5),  # *
          (121, 0.5), (100, 0.5), (8192, 0.07), (10, 0.7), (1, 0.3), (64, 0.0), (64, 1.0)]


def test_count_table_covers_both_conventions() -> None:
    differ = [(n, d) for n, d in COUNTS if round(d * n) != int(d * n)]
    assert len(differ) == 7  # the table tests the cases where the conventions part


@pytest.mark.parametrize(("numel", "density"), COUNTS)
def test_magnitude_and_breadcrumbs_keep_mergekits_count(numel: int, density: float) -> None:
    x = distinct(numel, seed=numel)
    k = int(density * numel)  # mergekit sparsify.magnitude: k = int(density * tensor.numel())
    assert kept_count(density, numel) == k
    out = magnitude(x, density)
    assert int((out != 0).sum()) == k
    if 0 < k < numel:
        assert out.abs().max() == numel and x[out == 0].abs().max() < x[out != 0].abs().min()
    # magnitude_outliers: target_n = int(density * n) kept, n_top = int(gamma * n) largest dropped
    gamma = 0.1
    crumbs = breadcrumbs(x, density, gamma)
    assert int((crumbs != 0).sum()) == k
    n_top = min(int(gamma * numel), numel - k)
    kept = sorted(int(v) for v in crumbs[crumbs != 0].abs())
    assert kept == list(range(numel - n_top - k + 1, numel - n_top + 1))


def test_magnitude_ties_at_the_cut_fall_as_mergekits_sort() -> None:
    """Many equal magnitudes straddle the cut: exactly k stay, the ones mergekit's argsort puts first."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (40, 50), generator=g).float()  # 7 values over 2000 entries: ties everywhere
    for density in (0.3, 0.55):
        k = int(density * x.numel())
        reference = torch.zeros(x.numel(), dtype=torch.bool)  # mergekit: argsort(|w|, descending=True)[:k]
        reference[torch.argsort(x.abs().flatten(), descending=True)[:k]] = True
        assert torch.equal(magnitude(x, density).flatten() != 0, reference & (x.flatten() != 0))
        assert int(reference.sum()) == k


def test_dare_is_unbiased_over_seeds() -> None:
    tau, density, seeds = distinct(200) / 100, 0.3, 400
    runs = torch.stack([random_drop(tau, density, generator=torch.Generator().manual_seed(s)) for s in range(seeds)])
    ratio = runs / tau
    assert ((ratio == 0) | torch.isclose(ratio, torch.tensor(1 / density))).all()  # dropped or scaled by 1/(1-p)
    std_of_mean = tau.abs() * ((1 - density) / density) ** 0.5 / seeds**0.5
    assert ((runs.mean(0) - tau).abs() <= 5 * std_of_mean + 1e-6).all()
    assert abs((runs != 0).float().mean().item() - density) < 0.01  # 80k Bernoulli draws


def test_dare_density_one_is_identity_and_zero_drops_all() -> None:
    tau = distinct(50)
    assert torch.equal(random_drop(tau, 1.0, generator=torch.Generator().manual_seed(1)), tau)
    assert torch.equal(random_drop(tau, 0.0), torch.zeros_like(tau))
    no_rescale = random_drop(tau, 0.5, rescale=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(no_rescale[no_rescale != 0], tau[no_rescale != 0])


def test_della_drop_probabilities_fall_linearly_with_rank() -> None:
    x = distinct(11)
    p = drop_probabilities(x, density=0.6, epsilon=0.2)
    by_rank = p[torch.argsort(x.abs())]
    assert torch.allclose(by_rank, torch.linspace(0.5, 0.3, 11))  # p = 0.4, range [p - eps/2, p + eps/2]
    rows = drop_probabilities(torch.stack([x, -2 * x]), density=0.6, epsilon=0.2)  # ranked per row
    assert torch.allclose(rows[0], p) and torch.allclose(rows[1], p)


def test_della_empirical_keep_rate_grows_with_magnitude_and_is_unbiased() -> None:
    tau, density, epsilon, seeds = distinct(20) / 10, 0.5, 0.8, 2000
    runs = torch.stack(
        [magnitude_sampled(tau, density, epsilon, generator=torch.Generator().manual_seed(s)) for s in range(seeds)]
    )
    keep_rate = (runs != 0).float().mean(0)[torch.argsort(tau.abs())]  # by ascending magnitude
    expected = torch.linspace(0.1, 0.9, 20)
    assert ((keep_rate - expected).abs() <= 5 * (expected * (1 - expected) / seeds).sqrt()).all()
    assert keep_rate[-5:].mean() > keep_rate[:5].mean() + 0.5
    keep = 1 - drop_probabilities(tau, density, epsilon)
    std_of_mean = tau.abs() * ((1 - keep) / keep).sqrt() / seeds**0.5
    assert ((runs.mean(0) - tau).abs() <= 5 * std_of_mean + 1e-6).all()


def test_della_rejects_probabilities_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        magnitude_sampled(distinct(10), density=0.9, epsilon=0.4)
    assert torch.equal(magnitude_sampled(distinct(10), density=1.0, epsilon=0.4), distinct(10))


@pytest.mark.parametrize("kind", list(Sparsify))
def test_dtype_preserved_and_dispatcher_matches(kind: Sparsify) -> None:
    x = distinct(64).reshape(8, 8).to(torch.bfloat16)
    kw = dict(density=0.5, gamma=0.1, epsilon=0.2, rescale=True)
    out = sparsify(kind, x, generator=torch.Generator().manual_seed(3), **kw)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    again = sparsify(kind.value, x, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out, again)


def test_dispatcher_rejects_unknown_arguments() -> None:
    with pytest.raises(TypeError, match="densty"):
        sparsify(Sparsify.magnitude, distinct(4), densty=0.5)
    with pytest.raises(ValueError):
        sparsify("magnitud", distinct(4), density=0.5)
