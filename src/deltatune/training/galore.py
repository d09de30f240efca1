"""GaLore: Adam on a low-rank projection of each weight matrix's gradient (full-parameter training, small state).

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv:2403.03507, Alg. 1.
For a trainable matrix W (m x n) with gradient G, every T steps (`update_proj_gap`) P becomes the top-r singular
vectors of G on its smaller side: U_r (m x r, left) when m < n, else V_r (n x r, right). Adam then runs on the
projected gradient R = P^T G (r x n), or G P (m x r), and the update is projected back and scaled:
    W <- W - lr_t * alpha * P * Adam(R)          (lr_t with Adam's bias correction)
Adam's moments are r x n instead of m x n, so a matrix's state is 2rn + mr numbers instead of 2mn. The moments
carry over when P is recomputed, as in the official code (jiaweizzhao/GaLore, galore_torch.GaLoreAdamW), whose
update this follows step for step (eps 1e-6 inside the root, decoupled weight decay after the update);
tests/test_optimizers.py compares the two. Matrices with min(m, n) <= r and every other parameter (biases, norms)
take the same Adam step unprojected. The state holds tensors and ints only, so it checkpoints and resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

# the state keys of a projected matrix: the projection and Adam's moments of the projected gradient, which
# are not shaped like the parameter (training/optimizers.py moment_tensors skips the shape check for them)
PROJECTED = ("galore_projection", "galore_exp_avg", "galore_exp_avg_sq")


def projects(p: Tensor, rank: int) -> bool:
    """Whether GaLore projects the gradient of `p`: a matrix wider than the rank on both sides."""
    return p.dim() == 2 and min(p.shape) > rank


def projection(grad: Tensor, rank: int) -> Tensor:
    """The top-`rank` singular vectors of `grad` on its smaller side: U_r (m x r) when m < n, else V_r^T (r x n)."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    P = U[:, :rank] if grad.shape[0] < grad.shape[1] else Vh[:rank, :]
    return P.to(grad.dtype).contiguous()


def project(grad: Tensor, P: Tensor) -> Tensor:
    return P.t() @ grad if grad.shape[0] < grad.shape[1] else grad @ P.t()


def project_back(update: Tensor, P: Tensor, like: Tensor) -> Tensor:
    return P @ update if like.shape[0] < like.shape[1] else update @ P


class GaLoreAdamW(Optimizer):
    """AdamW with GaLore's gradient projection on every matrix wider than `rank` on both sides."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = state.get("step", 0)
                grad = p.grad
                if projects(p, group["rank"]):
                    if step % group["update_proj_gap"] == 0:  # a new subspace every T steps (the first at step 0)
                        state["galore_projection"] = projection(grad, group["rank"])
                    grad = project(grad, state["galore_projection"])
                    keys = ("galore_exp_avg", "galore_exp_avg_sq")
                else:
                    keys = ("exp_avg", "exp_avg_sq")
                if keys[0] not in state:
                    state[keys[0]], state[keys[1]] = torch.zeros_like(grad), torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state[keys[0]], state[keys[1]]
                state["step"] = step = step + 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if "galore_projection" in state:
                    update = project_back(update, state["galore_projection"], p).mul_(group["scale"])
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def state_numbers(self) -> int:
        """Numbers held in the optimizer state (projections and moments), for memory reports."""
        return sum(t.numel() for s in self.state.values() for t in s.values() if isinstance(t, Tensor))
