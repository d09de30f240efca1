"""Model soups: average fine-tuned weights, uniformly or greedily by a held-out score.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", arXiv:2203.05482. Uniform soup: theta = mean_k theta_k. Greedy soup (Algorithm 1):
sort the models by held-out score, then add each one whose addition does not lower the soup's score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from deltatune.merging.task_arithmetic import StateDict, check_compatible, linear


def uniform_soup(models: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """theta = sum_k w_k theta_k / sum_k w_k (uniform without weights); the same as merging.linear."""
    return linear(models, weights)


@dataclass(frozen=True)
class GreedySoupResult:
    state_dict: dict[str, Tensor]  # the soup: the uniform average of the chosen models
    chosen_indices: list[int]  # into `models`, in the order they joined the soup
    scores: list[float]  # held-out score of each model alone, in input order
    soup_score: float  # held-out score of the returned soup


def _score(evaluate: Callable[[StateDict], float], state: StateDict, what: str) -> float:
    value = float(evaluate(state))
    if not math.isfinite(value):
        raise ValueError(f"evaluate returned {value} for {what}; it must return a finite held-out score")
    return value


def greedy_soup(
    models: Sequence[StateDict],
    evaluate: Callable[[StateDict], float],
    *,
    higher_is_better: bool = True,
) -> GreedySoupResult:
    """Greedy soup (Algorithm 1 of arXiv:2203.05482): add a model only if the held-out score does not drop.

    `evaluate` scores a state dict on held-out data (accuracy, or a loss with higher_is_better=False); it is
    called once per model and once per candidate soup (2N - 1 calls). Ties keep the input order. Each
    candidate is averaged afresh from its ingredients; memory holds the current soup and one candidate.
    """
    if not models:
        raise ValueError("need at least one model")
    check_compatible(models[0], models[1:])
    better = 1.0 if higher_is_better else -1.0
    scores = [_score(evaluate, m, f"model {i}") for i, m in enumerate(models)]
    order = sorted(range(len(models)), key=lambda i: -better * scores[i])  # best first; sorted() is stable
    chosen, soup, soup_score = [order[0]], dict(models[order[0]]), scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([models[j] for j in [*chosen, i]])
        candidate_score = _score(evaluate, candidate, f"the soup of models {[*chosen, i]}")
        if better * candidate_score >= better * soup_score:
            chosen, soup, soup_score = [*chosen, i], candidate, candidate_score
    return GreedySoupResult({k: v.clone() for k, v in soup.items()} if len(chosen) == 1 else soup,
                            chosen, scores, soup_score)
