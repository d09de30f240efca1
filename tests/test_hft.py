"""HFT (methods/selective/hft.py): half of each block's parameter matrices train per round, redrawn by round."""

from __future__ import annotations

import torch
from helpers import train_losses
from torch import nn

import deltatune as dt
from deltatune.training.optimizers import remap_state


class Blocks(nn.Module):
    """Two numbered blocks of four linears and a head outside them: the halves are drawn per block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({k: nn.Linear(6, 6) for k in "qkvo"}) for _ in range(2))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block["o"](block["q"](x) * block["k"](x) + block["v"](x)))
        return self.head(x)


def inject(**options):
    return dt.inject(Blocks(), dt.make_config("hft", **({"round_steps": 3} | options)))


def units(dm):
    return {f"{p}.{n}": (layer.deltas["default"], n) for p, layer in dm.layers() for n in layer.deltas["default"].names}


def test_each_round_trains_exactly_half_of_each_block_and_gradients_reach_only_those():
    dm = inject()
    x = torch.randn(5, 6)
    halves = []
    for step in range(0, 15, 3):
        dm.on_train_step(step)
        dm(x).square().sum().backward()
        trained = set()
        for unit, (delta, n) in units(dm).items():
            g = delta.values[n].grad
            assert (g is not None) == delta.trains(n), unit
            if delta.trains(n):
                assert g.abs().sum() > 0
                trained.add(unit)
        dm.zero_grad(set_to_none=True)
        for b in range(2):
            assert len([u for u in trained if u.startswith(f"layers.{b}.")]) == 2  # 2 of q, k, v, o
        halves.append(frozenset(trained))
    assert len(set(halves)) > 1  # redrawn across rounds
    assert dm.trainable_parameters() == sum(p.numel() for n, p in Blocks().named_parameters() if n.endswith("weight"))


def test_the_halves_are_a_function_of_the_step_so_a_resumed_run_draws_the_same():
    a, b = inject(), inject()
    for step in [0, 1, 2, 3, 4]:
        a.on_train_step(step)
    b.on_train_step(4)
    assert {u for u, (d, n) in units(a).items() if d.trains(n)} == {u for u, (d, n) in units(b).items() if d.trains(n)}
    other = inject(seed=1)

    def plan(m):
        return [{u for u, (d, n) in units(m).items() if d.trains(n, r)} for r in range(6)]

    assert plan(other) != plan(a)


def test_a_resting_matrix_does_not_move_and_one_that_trains_again_restarts_its_optimizer_state():
    dm = inject(round_steps=2)
    params = {u: d.values[n] for u, (d, n) in units(dm).items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    x = torch.randn(5, 6)
    for step in range(8):
        dm.on_train_step(step)
        stale = dm.take_stale_state()
        starting = {id(p) for p, _ in stale}
        if step % 2 == 0 and step > 0:
            rnd = step // 2
            expected = {id(params[u]) for u, (d, n) in units(dm).items() if d.trains(n) and not d.trains(n, rnd - 1)}
            assert starting == expected and all(src is None for _, src in stale)
        else:
            assert not stale
        remap_state(opt, stale)
        for p in params.values():
            if id(p) in starting:
                assert p not in opt.state  # AdamW starts it afresh (step 0)
        resting = {u: p.detach().clone() for u, p in params.items() if not units(dm)[u][0].trains(units(dm)[u][1])}
        dm(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for u, before in resting.items():
            assert torch.equal(params[u], before), u  # no gradient: no step, no weight decay


def test_loss_goes_down_with_the_trainer_loop_helper():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Blocks()

        def forward(self, x, y):
            return type("Out", (), {"loss": nn.functional.cross_entropy(self.net(x), y)})()

    torch.manual_seed(2)
    batch = {"x": torch.randn(32, 6), "y": torch.randint(0, 2, (32,))}
    dm = dt.inject(Model(), dt.make_config("hft", round_steps=2))
    losses = train_losses(dm, batch, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
