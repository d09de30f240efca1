"""Model soups: uniform = the weighted mean, greedy soup follows Algorithm 1 on hand-made held-out scores."""

from __future__ import annotations

import pytest
import torch

from deltatune.merging import linear
from deltatune.merging.soup import greedy_soup, uniform_soup


def model(w: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.tensor([w]), "noise": torch.randn(3, generator=g), "ids": torch.arange(2)}


def distance_to(target: float):
    return lambda sd: -abs(sd["w"].item() - target)


def test_uniform_soup_is_linear() -> None:
    models = [model(1.0, 1), model(2.0, 2), model(4.0, 3)]
    out = uniform_soup(models, [1.0, 1.0, 2.0])
    assert out["w"].item() == pytest.approx((1 + 2 + 8) / 4)
    assert all(torch.equal(out[k], linear(models, [1.0, 1.0, 2.0])[k]) for k in out)
    torch.testing.assert_close(uniform_soup(models)["noise"], sum(m["noise"] for m in models) / 3)


def test_greedy_soup_hand_example() -> None:
    models = [model(1.3), model(0.8), model(5.0), model(1.1), model(-3.0)]
    # alone: -.3, -.2, -4, -.1, -4 -> try order 3, 1, 0, 2, 4 (ties keep input order)
    # {3}: 1.1 (-.1); +1 -> .95 (-.05) kept; +0 -> 1.067 (-.067) rejected; +2 -> 2.3 and +4 -> -.37 rejected
    result = greedy_soup(models, distance_to(1.0))
    assert result.chosen_indices == [3, 1]
    assert result.scores == pytest.approx([-0.3, -0.2, -4.0, -0.1, -4.0])
    assert result.state_dict["w"].item() == pytest.approx(0.95) and result.soup_score == pytest.approx(-0.05)
    assert torch.equal(result.state_dict["ids"], torch.arange(2))
    as_loss = greedy_soup(models, lambda sd: abs(sd["w"].item() - 1.0), higher_is_better=False)
    assert as_loss.chosen_indices == [3, 1]


def test_greedy_soup_never_keeps_a_model_that_lowers_the_score() -> None:
    g = torch.Generator().manual_seed(0)
    models = [model(float(w), seed=i) for i, w in enumerate(torch.randn(8, generator=g) * 2)]
    calls = []

    def evaluate(sd):
        calls.append(1)
        return -float((sd["w"] - 0.3).abs() + 0.1 * sd["noise"].norm())

    result = greedy_soup(models, evaluate)
    assert len(calls) == 2 * len(models) - 1  # each model once, then each candidate soup once
    chosen = result.chosen_indices
    assert chosen[0] == max(range(len(models)), key=result.scores.__getitem__)
    assert 1 < len(chosen) < len(models)  # the example is not trivial: some kept, some rejected
    for k in range(1, len(chosen)):  # every model that joined did not lower the score of the soup before it
        before = evaluate(uniform_soup([models[i] for i in chosen[:k]]))
        assert evaluate(uniform_soup([models[i] for i in chosen[: k + 1]])) >= before
    assert result.soup_score >= max(result.scores)
    expected = uniform_soup([models[i] for i in chosen])
    assert all(torch.equal(result.state_dict[k], expected[k]) for k in expected)


def test_an_equal_score_counts_as_not_worse() -> None:
    result = greedy_soup([model(2.0), model(2.0), model(9.0)], distance_to(2.0))
    assert result.chosen_indices == [0, 1]


def test_single_model_soup_is_a_copy() -> None:
    only = model(1.0)
    result = greedy_soup([only], distance_to(0.0))
    assert result.chosen_indices == [0] and torch.equal(result.state_dict["w"], only["w"])
    result.state_dict["w"].add_(1.0)
    assert only["w"].item() == 1.0


def test_greedy_soup_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], distance_to(0.0))
    with pytest.raises(ValueError, match="finite"):
        greedy_soup([model(1.0), model(2.0)], lambda sd: float("nan"))
    with pytest.raises(ValueError, match="missing keys"):
        greedy_soup([model(1.0), {"w": torch.ones(1)}], distance_to(0.0))
