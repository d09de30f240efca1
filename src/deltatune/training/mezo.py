"""MeZO: zeroth-order SGD from two forward passes, with in-place perturbations regenerated from a seed.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv:2305.17333, Alg. 1 (SPSA):
    z ~ N(0, I) from seed s;  l+ = L(theta + eps z);  l- = L(theta - eps z);  g = (l+ - l-) / (2 eps)
    theta <- theta - lr (g z + weight_decay theta)
z is never stored: each use redraws it from s, one parameter at a time, so the step needs inference memory
plus one parameter-sized buffer (no gradients, no activations kept for a backward, no optimizer moments).
The perturbation is applied in place (+eps z, -2 eps z, +eps z); in floating point that restores theta up to
about one rounding of theta + eps z per entry, not bit for bit (as in the paper's code): storing theta to
restore it exactly would double the parameter memory that MeZO exists to save.
s is a function of the run's seed and the step count (kept in the param group, so it is checkpointed), so a
resumed run draws the same z as an uninterrupted one. The global RNG is never touched: dropout's draws are
unaffected (the trainer runs both probes in eval mode, as the paper's code does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: seeds of consecutive steps lie far apart


def step_seed(seed: int, step: int) -> int:
    return (seed * _MIX + step + 1) % (2**63 - 1)


class MeZO(Optimizer):
    """SPSA over `params`; `step(closure)` calls closure() (a forward pass returning the loss) twice."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        for group in self.param_groups:
            group.setdefault("mezo_step", 0)  # in the state dict: the next step's seed survives a resume
        self.last_grad: float | None = None  # the projected gradient g of the last step

    def _params(self) -> list[tuple[dict, Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"]]

    def _z(self, s: int) -> Iterable[tuple[dict, Tensor, Tensor]]:
        """(group, parameter, z) in a fixed order, z redrawn from seed s with a generator of its own."""
        gen: dict[torch.device, torch.Generator] = {}
        for group, p in self._params():
            if p.device not in gen:
                gen[p.device] = torch.Generator(device=p.device).manual_seed(s)
            yield group, p, torch.randn(p.shape, generator=gen[p.device], device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def perturb(self, s: int, factor: float) -> None:
        """theta += factor * eps * z(s), in place."""
        for group, p, z in self._z(s):
            p.add_(z, alpha=factor * group["eps"])

    def current_seed(self) -> int:
        return step_seed(self.seed, self.param_groups[0]["mezo_step"])

    @torch.no_grad()
    def estimate(self, closure: Callable[[], Tensor | float]) -> tuple[float, float, float]:
        """(g, l+, l-) at the current parameters, which it leaves as it found them (up to rounding)."""
        s, eps = self.current_seed(), self.param_groups[0]["eps"]
        self.perturb(s, 1.0)
        plus = float(closure())
        self.perturb(s, -2.0)
        minus = float(closure())
        self.perturb(s, 1.0)
        return (plus - minus) / (2 * eps), plus, minus

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None) -> float:  # type: ignore[override]
        """One MeZO step; returns the mean of the two probe losses (the loss near theta)."""
        if closure is None:
            raise ValueError("MeZO.step needs a closure that runs the forward pass and returns the loss")
        g, plus, minus = self.estimate(closure)
        s = self.current_seed()
        for group, p, z in self._z(s):
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(z, alpha=-group["lr"] * g)
        for group in self.param_groups:
            group["mezo_step"] += 1
        self.last_grad = g
        return (plus + minus) / 2
