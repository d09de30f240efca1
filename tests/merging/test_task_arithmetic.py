"""The task-vector pipeline and its presets: identities, formulas, a hand-worked TIES case, errors, seeding."""

from __future__ import annotations

import pytest
import torch

from deltatune.merging import MERGE_METHODS, Consensus, Sparsify, TaskVectorMerge, get_merge_method, linear
from deltatune.merging.sparsify import breadcrumbs, magnitude, magnitude_sampled, random_drop
from deltatune.merging.task_arithmetic import Balance


def state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(6, 5, generator=g).to(dtype),
        "lin.bias": torch.randn(6, generator=g).to(dtype),
        "norm.weight": torch.randn(5, generator=g).to(dtype),
        "pos_ids": torch.arange(7),  # int buffer: copied from base
    }


def importance_for(name: str, n: int, seed: int = 9) -> list[dict[str, torch.Tensor]] | None:
    """Random positive per-entry importance for the presets that require it (Fisher), else None."""
    if MERGE_METHODS[name].balance is not Balance.fisher:
        return None
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.rand(v.shape, generator=g) + 0.1 for k, v in state(0).items() if v.is_floating_point()}
            for _ in range(n)]


def exact(name: str) -> TaskVectorMerge:
    """The preset with nothing dropped (density 1, epsilon 0), so it must be exact."""
    return get_merge_method(name, density=1.0, epsilon=0.0)


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_merging_a_model_with_itself_gives_it_back(name: str) -> None:
    base = state(0)
    out = MERGE_METHODS[name].merge_state_dicts(base, [base, base], [0.7, 0.6], importance=importance_for(name, 2))
    assert all(torch.equal(out[k], base[k]) for k in base)


@pytest.mark.parametrize("name", [n for n in MERGE_METHODS if n != "pcb"])  # PCB keeps top scores: test_pcb.py
@pytest.mark.parametrize("n", [1, 3])
def test_n_copies_of_a_finetune_give_it_back(name: str, n: int) -> None:
    base, ft = state(0), state(1)
    out = exact(name).merge_state_dicts(base, [ft] * n, [1 / n] * n, importance=importance_for(name, n))
    for k in base:
        torch.testing.assert_close(out[k], ft[k] if k != "pos_ids" else base[k])


def test_task_arithmetic_equals_the_formula() -> None:
    base, fts, weights, lam = state(0), [state(1), state(2), state(3)], [0.5, -0.3, 1.2], 0.7
    out = get_merge_method("task_arithmetic", lambda_=lam).merge_state_dicts(base, fts, weights)
    for k in ("lin.weight", "lin.bias", "norm.weight"):
        expected = base[k] + lam * sum(w * (ft[k] - base[k]) for w, ft in zip(weights, fts))
        torch.testing.assert_close(out[k], expected)
    assert torch.equal(out["pos_ids"], base["pos_ids"])


@pytest.mark.parametrize("linear_name, ties_name", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")])
def test_dare_with_p_zero_is_its_deterministic_counterpart(linear_name: str, ties_name: str) -> None:
    base, fts, weights = state(0), [state(1), state(2)], [0.6, 0.9]
    dare = get_merge_method(linear_name, density=1.0).merge_state_dicts(base, fts, weights, seed=5)
    ref = get_merge_method(ties_name, density=1.0, normalize=False).merge_state_dicts(base, fts, weights)
    assert all(torch.equal(dare[k], ref[k]) for k in base)


def test_dare_linear_is_unbiased_over_seeds() -> None:
    base, fts, weights, seeds = state(0), [state(1), state(2)], [0.5, 0.5], 300
    method = get_merge_method("dare_linear", density=0.5)
    runs = torch.stack([method.merge_state_dicts(base, fts, weights, seed=s)["lin.weight"] for s in range(seeds)])
    taus = torch.stack([ft["lin.weight"] - base["lin.weight"] for ft in fts])  # (2, 6, 5)
    expected = base["lin.weight"] + 0.5 * taus.sum(0)
    std_of_mean = (0.25 * taus.pow(2).sum(0)).sqrt() / seeds**0.5  # each term w*tau*(m/0.5 - 1), var (w tau)^2
    assert ((runs.mean(0) - expected).abs() <= 5 * std_of_mean + 1e-6).all()


def test_ties_hand_example() -> None:
    taus = torch.tensor(
        [
            [1.0, -2.0, 0.5, 3.0],  # trimmed to [0, -2, 0, 3]
            [2.0, 1.0, -0.1, -1.5],  # -> [2, 0, 0, -1.5]
            [-4.0, 0.5, 0.2, -1.0],  # -> [-4, 0, 0, -1]
        ]
    )
    # sums [-2, -2, 0, 0.5] elect signs [-, -, +, +]; disjoint means: -4/1, -2/1, nothing, 3/1
    base = torch.full((4,), 10.0)
    out = get_merge_method("ties", density=0.5).merge_tensor(base, list(base + taus), [1.0, 1.0, 1.0])
    assert torch.equal(out, base + torch.tensor([-4.0, -2.0, 0.0, 3.0]))
    half = get_merge_method("ties", density=0.5, lambda_=0.5).merge_tensor(base, list(base + taus), [1.0] * 3)
    assert torch.equal(half, base + torch.tensor([-2.0, -1.0, 0.0, 1.5]))


def test_ties_normalises_by_the_weights_that_agree() -> None:
    base, taus = torch.zeros(1), [torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([-1.0])]
    out = get_merge_method("ties", density=1.0).merge_tensor(base, taus, [1.0, 3.0, 1.0])
    assert torch.allclose(out, torch.tensor([(4.0 + 3 * 2.0) / (1.0 + 3.0)]))


def test_sign_count_and_sign_mass_disagree_where_they_should() -> None:
    base, taus = torch.zeros(1), [torch.tensor([10.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    mass = TaskVectorMerge(consensus=Consensus.sign_mass, normalize=True).merge_tensor(base, taus, [1.0] * 3)
    count = TaskVectorMerge(consensus=Consensus.sign_count, normalize=True).merge_tensor(base, taus, [1.0] * 3)
    assert mass.item() == 10.0  # mass 8 > 0 elects +, only the first model agrees
    assert count.item() == -1.0  # two votes for - beat one for +


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_bf16_in_bf16_out(name: str) -> None:
    base, fts = state(0, torch.bfloat16), [state(1, torch.bfloat16), state(2, torch.bfloat16)]
    out = MERGE_METHODS[name].merge_state_dicts(base, fts, [0.5, 0.5], importance=importance_for(name, 2))
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in base.items()}
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_mismatched_state_dicts_name_the_problem() -> None:
    base, ft = state(0), state(1)
    missing = {k: v for k, v in ft.items() if k != "lin.bias"}
    extra = {**ft, "head.weight": torch.zeros(2)}
    reshaped = {**ft, "norm.weight": torch.zeros(6)}
    method = MERGE_METHODS["ties"]
    with pytest.raises(ValueError, match=r"model 0 is missing keys \['lin.bias'\]"):
        method.merge_state_dicts(base, [missing], [1.0])
    with pytest.raises(ValueError, match=r"model 1 has extra keys \['head.weight'\]"):
        method.merge_state_dicts(base, [ft, extra], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \(6,\), base has \(5,\)"):
        method.merge_state_dicts(base, [reshaped], [1.0])
    with pytest.raises(ValueError, match="one weight per"):
        method.merge_state_dicts(base, [ft, ft], [1.0])


def test_unknown_names_and_options_suggest_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'dare_ties'"):
        get_merge_method("dare_tie")
    with pytest.raises(ValueError, match="did you mean 'density'"):
        get_merge_method("ties", densty=0.3)
    with pytest.raises(ValueError):  # pydantic validation
        get_merge_method("ties", density=1.5)
    with pytest.raises(ValueError):  # frozen
        MERGE_METHODS["ties"].density = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_seeded_results_are_deterministic_and_independent_of_dict_order(name: str) -> None:
    base, fts = state(0), [state(1), state(2)]
    method = MERGE_METHODS[name]
    first = method.merge_state_dicts(base, fts, [0.5, 0.5], seed=7)
    again = method.merge_state_dicts(base, fts, [0.5, 0.5], seed=7)
    rev = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    reordered = method.merge_state_dicts(rev(base), [rev(ft) for ft in fts], [0.5, 0.5], seed=7)
    other_seed = method.merge_state_dicts(base, fts, [0.5, 0.5], seed=8)
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], reordered[k]) for k in base)
    assert not torch.equal(first["lin.weight"], other_seed["lin.weight"])


def test_linear_soup_is_the_normalised_weighted_average() -> None:
    models = [state(1), state(2), state(3)]
    out = linear(models, [1.0, 2.0, 1.0])
    for k in ("lin.weight", "norm.weight"):
        torch.testing.assert_close(out[k], (models[0][k] + 2 * models[1][k] + models[2][k]) / 4)
    assert torch.equal(out["pos_ids"], models[0]["pos_ids"])
    torch.testing.assert_close(linear([models[0]] * 3)["lin.weight"], models[0]["lin.weight"])
    with pytest.raises(ValueError, match="nonzero sum"):
        linear(models, [1.0, -1.0, 0.0])


def test_presets_use_the_documented_stages() -> None:
    assert MERGE_METHODS["ties"].sparsify is Sparsify.magnitude and MERGE_METHODS["ties"].normalize
    assert MERGE_METHODS["dare_ties"].consensus is Consensus.sign_mass and MERGE_METHODS["dare_ties"].rescale
    assert MERGE_METHODS["della_linear"].consensus is Consensus.none
    assert MERGE_METHODS["fisher"].balance is Balance.fisher and MERGE_METHODS["fisher"].normalize
    assert MERGE_METHODS["pcb"].balance is Balance.pcb and MERGE_METHODS["pcb"].sparsify is Sparsify.none
    assert all(m.url.startswith("https://arxiv.org/abs/") for m in MERGE_METHODS.values())


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_per_model_parameters_equal_sparsifying_each_vector_by_hand(name: str) -> None:
    """Model i's own density (and gamma/epsilon) sparsify its task vector; the rest of the pipeline is the
    preset's. By hand: sparsify each vector with its own values, then merge with no sparsifier."""
    g = torch.Generator().manual_seed(3)
    zeros = torch.zeros(40, 30)
    taus = [torch.randn(40, 30, generator=g) for _ in range(3)]
    own = [{"density": 0.3}, {"density": 0.75, "gamma": 0.05}, {}]
    preset = get_merge_method(name, density=0.5)
    got = preset.merge_tensor(zeros, taus, [0.5, 0.3, 0.2], torch.Generator().manual_seed(1), model_parameters=own)
    gen = torch.Generator().manual_seed(1)  # random sparsifiers draw vector after vector from one generator
    by_hand = {
        Sparsify.magnitude: lambda t, p: magnitude(t, p.get("density", 0.5)),
        Sparsify.breadcrumbs: lambda t, p: breadcrumbs(t, p.get("density", 0.5), p.get("gamma", preset.gamma)),
        Sparsify.random: lambda t, p: random_drop(t, p.get("density", 0.5), generator=gen),
        Sparsify.magnitude_sampled: lambda t, p: magnitude_sampled(t, p.get("density", 0.5), preset.epsilon,
                                                                   generator=gen),
    }[preset.sparsify]
    by_hand = [by_hand(t, p) for t, p in zip(taus, own)]
    plain = preset.model_copy(update={"sparsify": Sparsify.none})
    assert torch.equal(got, plain.merge_tensor(zeros, by_hand, [0.5, 0.3, 0.2]))
    assert not torch.equal(got, preset.merge_tensor(zeros, taus, [0.5, 0.3, 0.2], torch.Generator().manual_seed(1)))


def test_per_model_parameters_reach_every_tensor_of_a_state_dict() -> None:
    base, fts = state(0), [state(1), state(2)]
    own = [{"density": 0.2}, {"density": 0.9}]
    merged = MERGE_METHODS["ties"].merge_state_dicts(base, fts, [1.0, 1.0], model_parameters=own)
    for key, b in base.items():
        if b.is_floating_point():
            expected = MERGE_METHODS["ties"].merge_tensor(b, [sd[key] for sd in fts], [1.0, 1.0], model_parameters=own)
            assert torch.equal(merged[key], expected)


def test_bad_per_model_parameters_are_named() -> None:
    ties = MERGE_METHODS["ties"]
    x = torch.ones(3)
    with pytest.raises(ValueError, match="unknown per-model parameter 'densty' of model 1; did you mean 'density'"):
        ties.merge_tensor(x, [x, x], [1, 1], model_parameters=[{}, {"densty": 0.3}])
    with pytest.raises(ValueError, match="'weight' of model 0.*weights are given as `weights`"):
        ties.merge_tensor(x, [x, x], [1, 1], model_parameters=[{"weight": 2}, {}])
    with pytest.raises(ValueError, match="one model_parameters mapping per model, got 1 for 2"):
        ties.merge_tensor(x, [x, x], [1, 1], model_parameters=[{}])
    with pytest.raises(ValueError, match="model 0 are invalid: density: Input should be less than or equal to 1"):
        ties.merge_state_dicts({"w": x}, [{"w": x}, {"w": x}], [1, 1], model_parameters=[{"density": 2}, {}])
