"""SpIEL (methods/selective/spiel.py): sparse entries that drop by smallest |Δ| and regrow by largest |Σ grad|."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, train_losses
from torch import nn

import deltatune as dt
from deltatune.training.optimizers import remap_state


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def inject(**options):
    cfg = dict(density=0.25, update_every=3, accumulate=2, fraction=0.5, targets=["a.weight"]) | options
    return dt.inject(Two(), dt.make_config("spiel", **cfg))


def delta_of(dm, path="a"):
    return dict(dm.layers())[path].deltas["default"]


def test_the_hand_built_case_drops_smallest_change_and_regrows_largest_summed_gradient():
    dm = inject()
    d = delta_of(dm)
    d.set_selection("weight", torch.tensor([0, 5, 10, 15]), torch.tensor([0.1, -0.5, 0.02, 0.3]))
    opt = torch.optim.AdamW([d.value("weight")], lr=0.1)
    d.value("weight").grad = torch.ones(4)
    opt.step()  # some state to move
    state = {k: v.clone() for k, v in opt.state[d.value("weight")].items()}
    with torch.no_grad():
        d.value("weight").copy_(torch.tensor([0.1, -0.5, 0.02, 0.3]))
    scores = torch.zeros(16)
    scores[5], scores[3], scores[0], scores[7] = 100.0, -9.0, 8.0, 1.0  # 5 is kept, so not a candidate
    d.move("weight", scores, fraction=0.5)
    # m = 2: drop positions 10 (|0.02|) and 0 (|0.1|); regrow 3 (|-9|) and 0 (|8|): 0 comes back with its value
    assert torch.equal(d.index("weight"), torch.tensor([0, 3, 5, 15]))
    assert torch.equal(d.value("weight").detach(), torch.tensor([0.1, 0.0, -0.5, 0.3]))
    [(param, source)] = dm.take_stale_state()
    assert param is d.value("weight") and torch.equal(source, torch.tensor([0, -1, 1, 3]))
    remap_state(opt, [(param, source)])
    for k in ("exp_avg", "exp_avg_sq"):
        old = state[k]
        assert torch.equal(opt.state[param][k], torch.stack([old[0], torch.zeros(()), old[1], old[3]]))
    assert torch.equal(opt.state[param]["step"], state["step"])
    assert dm.take_stale_state() == []


def test_the_summed_gradient_is_the_dense_gradient_of_the_window_steps():
    dm = inject(update_every=4, accumulate=2)
    d = delta_of(dm)
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    expected = torch.zeros(4, 4)
    for step, x in enumerate(xs):
        dm.on_train_step(step)
        assert d.capturing == (step >= 2)
        dm(x).square().sum().backward()
        plain = Two()
        w = (plain.a.weight.detach() + d.dense(dict(dm.layers())["a"], "weight").detach()).requires_grad_(True)
        loss = plain.b(torch.tanh(x @ w.t() + plain.a.bias)).square().sum()
        (g,) = torch.autograd.grad(loss, w)
        if step >= 2:
            expected += g
        assert_close(d.value("weight").grad, g.reshape(-1)[d.index("weight")])  # sparse or dense path alike
        d.value("weight").grad = None
    assert_close(d._sums["weight"], expected.reshape(-1))


def test_training_moves_entries_keeps_the_count_and_a_save_after_regrowth_reloads_exactly(tmp_path):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Two()

        def forward(self, x, y):
            return type("Out", (), {"loss": nn.functional.mse_loss(self.net(x), y)})()

    torch.manual_seed(1)
    batch = {"x": torch.randn(16, 4), "y": torch.randn(16, 3)}
    dm = dt.inject(Model(), dt.make_config("spiel", density=0.25, update_every=3, accumulate=2, fraction=0.5,
                                           targets=["net.a.weight", "net.b.weight"]))
    before = {p: delta_of(dm, p).index("weight").clone() for p in ["net.a", "net.b"]}
    losses = train_losses(dm, batch, steps=10, lr=5e-2)
    assert losses[-1] < losses[0]
    for p in ["net.a", "net.b"]:
        idx = delta_of(dm, p).index("weight")
        assert idx.numel() == before[p].numel() == dm.model.get_submodule(p).base_layer.weight.numel() // 4
        assert torch.equal(idx, torch.unique(idx))  # sorted, no repeats
    assert any(not torch.equal(delta_of(dm, p).index("weight"), before[p]) for p in before)
    dm.eval()
    x = batch["x"]
    expected = dm.model.net(x).detach()
    dm.save(tmp_path / "a")
    loaded = dt.load(Model(), tmp_path / "a")
    assert torch.equal(loaded.model.net(x), expected)
    for p in before:
        assert torch.equal(delta_of(loaded, p).index("weight"), delta_of(dm, p).index("weight"))


def test_the_fraction_decays_to_zero_and_bad_windows_are_rejected():
    d = delta_of(inject(fraction=0.4, decay_steps=10))
    assert [d.fraction_at(s) for s in (0, 5, 10, 20)] == pytest.approx([0.4, 0.2, 0.0, 0.0])
    with pytest.raises(ValueError, match="accumulate=5 exceeds update_every=3"):
        dt.make_config("spiel", update_every=3, accumulate=5)


def test_the_trainer_hands_the_moved_entries_to_the_optimizer_state(monkeypatch):
    # SpIEL's regrowth inside Trainer.train_step: the moments of moved entries must follow them (remap_state);
    # a trainer that forgot the call would keep AdamW moments at the wrong positions with no other symptom
    from test_training_precision import MINILM_SHORT

    from deltatune.training import loop
    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    handed = []

    def spy(optimizer, stale):
        stale = list(stale)
        handed.append([(p, None if s is None else s.clone()) for p, s in stale])
        remap_state(optimizer, stale)

    monkeypatch.setattr(loop, "remap_state", spy)
    method = "method={name: spiel, density: 0.01, update_every: 2, accumulate: 1, fraction: 0.5, targets: [query]}"
    trainer = Trainer(load_recipe(None, [*MINILM_SHORT, "train.steps=4", method]))
    trainer.setup()
    for _ in range(4):
        trainer.train_step()
        trainer.step += 1
    moved = [entries for entries in handed if entries]
    assert moved, "no regrowth reached the optimizer"
    values = {id(p) for _, layer in trainer.model.layers() for p in layer.parameters() if p.requires_grad}
    for param, source in moved[0]:
        assert id(param) in values and source is not None and (source < 0).any()  # regrown entries start fresh
