"""Diff pruning: θ0 + z ⊙ w with the hard-concrete gates written by hand, the expected-L0 penalty, and the
magnitude projection (global top-k of |z ⊙ w|) to a fixed sparse selection that saves only the kept entries.
The engine's properties (merge, round trips, mixed batches, bf16) are tests/test_selection.py's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, perturb, train_losses
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.selective.diff_pruning import project


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, y=None):
        out = self.b(torch.tanh(self.a(x)))
        return out if y is None else SimpleNamespace(loss=nn.functional.mse_loss(out, y))


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
TARGETS = ["a.weight", "b.weight", "b.bias"]


def gated(dm) -> dict[str, torch.Tensor]:
    """z ⊙ w per full parameter name, z = clamp(sigmoid(log α)(r - l) + l, 0, 1) with (l, r) = (-1.5, 1.5), the
    official code's stretch."""
    out = {}
    for path, layer in dm.layers():
        d = layer.deltas["default"]
        for n in d.names:
            z = (torch.sigmoid(d.log_alpha[n.replace(".", "__")]) * 3.0 - 1.5).clamp(0, 1)
            out[f"{path}.{n}"] = (z * d.values[n.replace(".", "__")]).detach()
    return out


def by_hand(update: dict[str, torch.Tensor]) -> torch.Tensor:
    plain = Net()
    with torch.no_grad():
        for name, u in update.items():
            plain.get_parameter(name).add_(u)
        return plain(X)


def trained() -> dt.DeltaModel:
    dm = dt.inject(Net(), dt.make_config("diff_pruning", density=0.2, targets=TARGETS))
    perturb(dm, std=0.3)
    with torch.no_grad():  # gates spread over (0, 1): log α around 0
        for a in (a for _, layer in dm.layers() for a in layer.deltas["default"].log_alpha.values()):
            a.sub_(5.0)
    return dm.eval()


def test_eval_output_is_theta0_plus_gate_times_w_and_training_draws_gates():
    dm = trained()
    with torch.no_grad():
        assert_close(dm(X), by_hand(gated(dm)))
        dm.train()
        assert not torch.equal(dm(X), dm(X))  # a fresh u per forward


@pytest.mark.parametrize("options,shift", [
    ({}, 0.0),  # the official code's (l, r) = (-1.5, 1.5), β = 1: P(z > 0) = sigmoid(log α)
    ({"stretch": (-0.1, 1.1), "temperature": 2 / 3}, (2 / 3) * math.log(0.1 / 1.1)),  # Louizos et al.'s values
])
def test_the_penalty_is_lambda_times_the_expected_number_of_open_gates(options, shift):
    dm = dt.inject(Net(), dt.make_config("diff_pruning", l0_lambda=0.01, targets=TARGETS, **options))
    perturb(dm, std=1.0)
    alphas = [a for _, layer in dm.layers() for a in layer.deltas["default"].log_alpha.values()]
    expected = 0.01 * sum(torch.sigmoid(a - shift).sum() for a in alphas)
    assert_close(dm.regularization_loss(), expected.detach())


def test_the_gates_train_at_their_own_rate_and_a_bad_stretch_is_refused():
    from deltatune.training.param_groups import param_groups

    dm = dt.inject(Net(), dt.make_config("diff_pruning", targets=TARGETS))
    alphas = {id(a) for _, layer in dm.layers() for a in layer.deltas["default"].log_alpha.values()}
    rates = {id(p): g["lr"] for g in param_groups(dm, 1e-3) for p in g["params"]}
    assert {rates[i] for i in alphas} == {0.1}  # the official code's second AdamW
    assert {r for i, r in rates.items() if i not in alphas} == {1e-3}
    same = dt.inject(Net(), dt.make_config("diff_pruning", targets=TARGETS, alpha_lr=None))
    assert {g["lr"] for g in param_groups(same, 1e-3)} == {1e-3}
    with pytest.raises(ValueError, match=r"l < 0 and r > 1"):
        dt.make_config("diff_pruning", stretch=(0.0, 1.5))


def test_projection_keeps_the_global_top_k_and_saves_only_them(tmp_path):
    dm = trained()
    update = gated(dm)
    names = sorted(update)
    flat = torch.cat([update[n].reshape(-1).abs() for n in names])
    k = math.ceil(0.2 * flat.numel())
    threshold = torch.topk(flat, k).values[-1]
    assert project(dm) == k
    assert dm.trainable_parameters() == k
    kept = {}
    for path, layer in dm.layers():
        d = layer.deltas["default"]
        assert d.projected and len(d.log_alpha) == 0 and dm.regularization_loss().item() == 0
        for n in d.names:
            kept[f"{path}.{n}"] = d.dense(layer, n).detach()
    for n in names:  # every kept entry is an old z ⊙ w entry at least as large as the k-th
        on = kept[n] != 0
        assert_close(kept[n][on], update[n][on])
        assert (update[n][on].abs() >= threshold).all() and (update[n][~on].abs() <= threshold).all()
    with torch.no_grad():
        assert_close(dm(X), by_hand(kept))
    dm.save(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert sum(t.numel() for key, t in tensors.items() if ".values." in key) == k
    assert not [key for key in tensors if "log_alpha" in key]
    again = dt.load(Net(), tmp_path / "a")
    with torch.no_grad():
        assert_close(again(X), dm(X))
    with pytest.raises(ValueError, match="projected already"):
        project(dm)


def test_an_unprojected_adapter_round_trips_with_its_gates(tmp_path):
    dm = trained()
    dm.save(tmp_path / "a")
    again = dt.load(Net(), tmp_path / "a").eval()
    with torch.no_grad():
        assert_close(again(X), dm(X))


def test_loss_goes_down_then_the_projected_entries_train_on():
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    dm = dt.inject(Net(), dt.make_config("diff_pruning", density=0.3, l0_lambda=1e-3, targets=TARGETS))
    losses = train_losses(dm, {"x": X, "y": y}, steps=15, lr=3e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    project(dm)
    after = train_losses(dm, {"x": X, "y": y}, steps=10, lr=1e-2)  # a new optimizer over the kept entries
    assert after[-1] < after[0], after


@pytest.mark.slow
def test_deltatune_train_projects_after_the_last_step_on_minilm(tmp_path):
    from deltatune.training.loop import Trainer
    from deltatune.training.recipe import load_recipe

    method = "{name: diff_pruning, density: 0.01, targets: ['re:.*\\.(query|value)\\.weight']}"
    trainer = Trainer(load_recipe(None, [f"method={method}", "data.max_train=40", "data.max_eval=16",
                                         "train.batch_size=4", "train.max_length=24", "train.steps=3",
                                         f"train.output_dir={tmp_path}"]))
    trainer.setup()
    assert trainer.model.trainable_parameters() == 2 * 12 * 384 * 384 + 770  # w and log α, + the new head
    result = trainer.train()
    k = math.ceil(0.01 * 12 * 384 * 384)
    assert result.trainable == k + 770 and math.isfinite(result.after["loss"])
    loaded = dt.load(trainer.task.build_model(torch.float32), result.adapter_dir)
    assert loaded.trainable_parameters() == k + 770
