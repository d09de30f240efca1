"""DAREx-q: q = density is DARE, the mean scales by density/q, and the q searches pick what they should."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.merging.darex import bernoulli_phi, darex_prune, layer_q, per_layer_q, q_for, search_q
from deltatune.merging.sparsify import random_drop
from deltatune.merging.task_arithmetic import get_merge_method, tensor_generator


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_q_equal_to_density_is_dare_and_other_q_rescale_the_same_survivors() -> None:
    tau = rand(50, seed=0)
    dare = random_drop(tau, 0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(random_drop(tau, 0.2, generator=torch.Generator().manual_seed(1), rescale_q=0.2), dare)
    darex = random_drop(tau, 0.2, generator=torch.Generator().manual_seed(1), rescale_q=0.5)
    torch.testing.assert_close(darex, dare * 0.2 / 0.5)  # same mask, survivors x 1/q instead of x 1/(1-p)
    base = {"w": rand(4, 5, seed=2)}
    fts = [{"w": rand(4, 5, seed=3)}, {"w": rand(4, 5, seed=4)}]
    plain = get_merge_method("dare_ties", density=0.3).merge_state_dicts(base, fts, [0.5, 0.5], seed=7)
    as_q = get_merge_method("dare_ties", density=0.3, rescale_q=0.3)
    as_q = as_q.merge_state_dicts(base, fts, [0.5, 0.5], seed=7)
    assert torch.equal(plain["w"], as_q["w"])


def test_expected_value_is_density_over_q_times_tau() -> None:
    tau, density, q, seeds = rand(40, seed=0), 0.25, 0.5, 600
    runs = torch.stack([random_drop(tau, density, generator=torch.Generator().manual_seed(s), rescale_q=q)
                        for s in range(seeds)])
    # each entry is tau/q with prob density, else 0: mean density*tau/q, variance density*(1-density)*(tau/q)^2
    std_of_mean = (tau / q).abs() * math.sqrt(density * (1 - density) / seeds)
    assert ((runs.mean(0) - density / q * tau).abs() <= 5 * std_of_mean + 1e-6).all()


def test_search_q_picks_the_argmax_of_a_known_function() -> None:
    candidates = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]
    best, scores = search_q(candidates, lambda q: -((q - 0.23) ** 2))
    assert best == 0.25 and list(scores) == candidates
    assert scores[0.2] == pytest.approx(-(0.03**2))
    assert search_q([0.4, 0.2, 0.3], lambda q: 1.0)[0] == 0.4  # ties: the first candidate
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        search_q([0.0, 0.5], lambda q: q)
    with pytest.raises(ValueError, match="finite"):
        search_q([0.5], lambda q: float("nan"))
    with pytest.raises(ValueError, match="at least one"):
        search_q([], lambda q: q)


def official_scan(c: torch.Tensor, p: float, eta: float, prob: float = 0.95) -> float:
    """The per-neuron objective of the official analytical_resolve_new, over the whole grid (no early stop)."""
    phi = (1 - 2 * p) / math.log((1 - p) / p)
    s1, s2 = c.sum(1).double(), c.square().sum(1).double()
    best_q = torch.full_like(s1, float("nan"))
    best = torch.full_like(s1, float("inf"))
    for k in range(round((1 - p) * 1000), 999 + 1):
        q = k * 0.001
        res = (eta * (1 - (1 - p) / q) * s1 + eta**2 * phi * s2 / (4 * q**2) + math.log(2 / (1 - prob))).abs()
        better = res < best
        best_q[better], best[better] = q, res[better]
    return float(best_q.mean())


def test_layer_q_minimises_the_official_objective() -> None:
    # one input, c = 0.1: f(q) = eta (1 - d/q) c + eta^2 phi c^2 / (4 q^2) + log 40 > 0 has its minimum where
    # f'(q) = 0, at q* = eta phi c / (2 d) = phi(0.9) = 0.364 for eta = 2, d = 0.1
    assert layer_q(torch.tensor([[0.1]]), torch.ones(1), density=0.1, eta=2.0) == pytest.approx(0.364, abs=1e-3)
    delta, x = rand(6, 8, seed=0) * 0.03, rand(8, seed=1).abs() + 0.5
    bias = rand(6, seed=2) * 0.03
    found = []
    for eta in (0.5, 5.0, 20.0):
        q = layer_q(delta, x, density=0.1, eta=eta, bias_delta=bias)
        c = torch.cat([delta * x, bias[:, None]], dim=1)
        assert q == pytest.approx(official_scan(c, p=0.9, eta=eta), abs=2e-3)  # within a grid step
        found.append(q)
    assert 0.1 <= found[0] < found[1] < found[2] < 1.0  # eta moves q across the range
    # no net contribution in any row: the bound only falls with q, so the largest q on the grid wins
    balanced = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    assert layer_q(balanced, torch.ones(2), density=0.1, eta=1.0) == pytest.approx(0.999, abs=1e-6)
    assert bernoulli_phi(0.9) == pytest.approx(-0.8 / math.log(1 / 9)) and bernoulli_phi(0.5) == 0.5
    with pytest.raises(ValueError, match="d_in"):
        layer_q(delta, torch.ones(3), density=0.1, eta=1.0)


def test_per_layer_q_uses_each_layers_mean_input() -> None:
    torch.manual_seed(0)
    base_model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    tuned = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    x = rand(10, 4, seed=5)
    qs = per_layer_q(tuned, base, [{"input": x[:6]}, {"input": x[6:]}], density=0.2, eta=1.0)
    assert qs.keys() == {"0.weight", "2.weight"}
    sd = tuned.state_dict()
    with torch.no_grad():
        hidden = torch.relu(tuned[0](x))
    for name, inputs in (("0", x), ("2", hidden)):
        expected = layer_q(sd[f"{name}.weight"] - base[f"{name}.weight"], inputs.mean(0), 0.2, 1.0,
                           bias_delta=sd[f"{name}.bias"] - base[f"{name}.bias"])
        assert qs[f"{name}.weight"] == pytest.approx(expected)
    assert per_layer_q(tuned, base, {"input": x}, 0.2, 1.0, exclude=["2"]).keys() == {"0.weight"}


def test_darex_prune_and_q_lookup() -> None:
    base = {"l.weight": rand(3, 4, seed=0), "l.bias": rand(3, seed=1), "head.weight": rand(2, 3, seed=2),
            "ids": torch.arange(3)}
    ft = {k: (v + rand(*v.shape, seed=9) if v.is_floating_point() else v) for k, v in base.items()}
    out = darex_prune(base, ft, density=0.3, q=0.6, keep=["head.weight"], seed=4)
    for key in ("l.weight", "l.bias"):
        dropped = random_drop(ft[key] - base[key], 0.3, generator=tensor_generator(4, key), rescale_q=0.6)
        torch.testing.assert_close(out[key], base[key] + dropped)
    assert torch.equal(out["head.weight"], ft["head.weight"]) and torch.equal(out["ids"], base["ids"])
    qs = {"l.weight": 0.2, "m.weight": 0.4}
    assert (q_for("l.weight", qs), q_for("l.bias", qs), q_for("x.norm", qs)) == (0.2, 0.2, pytest.approx(0.3))
    with pytest.raises(ValueError, match="keep"):
        darex_prune(base, ft, density=0.3, q=0.6, keep=["heads.weight"])


def test_invalid_q_settings() -> None:
    with pytest.raises(ValueError, match="sparsify='random'"):
        get_merge_method("ties", rescale_q=0.5)
    with pytest.raises(ValueError, match="rescale=True"):
        get_merge_method("dare_linear", rescale=False, rescale_q=0.5)
    with pytest.raises(ValueError):
        get_merge_method("dare_linear", rescale_q=0.0)
    with pytest.raises(ValueError, match="rescale_q"):
        random_drop(rand(4, seed=0), 0.5, rescale_q=1.5)
