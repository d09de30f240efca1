"""Engine features methods build on: adapter-wide shared tensors, regulariser terms, per-step hooks, token masks.

The first three are exercised through a small test-only method (registered for the test, then removed), so
each engine path is checked without depending on any one method's math.
"""

from __future__ import annotations

import pytest
import torch
from helpers import Holder, assert_close, max_diff, perturb
from pydantic import Field
from torch import nn

import deltatune as dt
from deltatune.engine import registry
from deltatune.engine.layer import Delta, DeltaLayer


class SharedScaleConfig(dt.DeltaConfig):
    r: int = Field(2, ge=1)
    penalty: float = 0.5


class SharedScale(Delta):
    """dW = diag(v) P Q: P, Q shared by every layer (Q trainable, P a seeded non-persistent buffer)."""

    @classmethod
    def build_shared(cls, config, layers):
        d_out = max(layer.matrix().shape[0] for layer in layers)
        d_in = max(layer.matrix().shape[1] for layer in layers)
        shared = nn.Module()
        shared.q = nn.Parameter(torch.randn(config.r, d_in))
        shared.register_buffer("p", torch.randn(d_out, config.r, generator=torch.Generator().manual_seed(0)),
                               persistent=False)
        return shared

    def __init__(self, config, layer, initialize=True, shared=None):
        super().__init__(config, layer, initialize, shared)
        self.v = nn.Parameter(torch.zeros(layer.matrix().shape[0]))
        self.steps: list[int] = []

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        d_out, d_in = layer.matrix().shape
        return self.v[:, None] * (self.shared.p[:d_out] @ self.shared.q[:, :d_in])

    def regularizer(self, layer: DeltaLayer) -> torch.Tensor:
        return self.config.penalty * self.v.square().sum()

    def on_step(self, step: int) -> None:
        self.steps.append(step)

    @classmethod
    def after_update(cls, deltas, shared, step, total_steps):
        # what the hook sees: every delta of the adapter, its gradients (not zeroed yet), the trainer's total
        cls.calls.append((step, total_steps, [d.shared is shared for d in deltas],
                          [d.v.grad is not None and bool(d.v.grad.abs().sum() > 0) for d in deltas]))


@pytest.fixture
def shared_scale():
    registry.register("test_shared_scale", config=SharedScaleConfig, family="test", formula="d_out",
                      paper="-", summary="test only")(SharedScale)
    yield
    registry._METHODS.pop("test_shared_scale")


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_shared_tensors_live_once_are_counted_once_and_round_trip(shared_scale, tmp_path):
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(3, 6)
    fresh = TwoLayers()
    fresh.load_state_dict(model.state_dict())
    dm = dt.inject(model, SharedScaleConfig(targets=["a", "b"]))
    shared = dm.shared["default"]
    assert dm.model.a.deltas["default"].shared is shared is dm.model.b.deltas["default"].shared
    assert dm.trainable_parameters() == 5 + 4 + 2 * 6  # v per layer, q once
    assert set(dm.adapter_state_dict()) == {"a.v", "b.v", "__shared__.q"}  # p regenerates from its seed
    perturb(dm, std=0.3)
    expected = dm(x)
    dm.save(tmp_path)
    again = dt.load(fresh, tmp_path)
    assert torch.equal(again.shared["default"].q, shared.q)
    assert max_diff(again(x), expected) == 0
    dm.add_adapter("other", dt.LoRAConfig(r=1, targets=["a"]))
    dm.set_active("other")
    assert not shared.q.requires_grad  # an inactive adapter's shared tensors are frozen too
    dm.delete_adapter("default")
    assert "default" not in dm.shared


def test_merge_with_shared_tensors_equals_the_unmerged_forward(shared_scale):
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(3, 6)
    dm = dt.inject(model, SharedScaleConfig(targets=["a", "b"]))
    perturb(dm, std=0.3)
    expected = dm(x)
    dm.merge()
    assert_close(dm(x), expected)
    assert isinstance(dm.merge_and_unload(), TwoLayers)


def test_regularization_loss_sums_the_active_unmerged_deltas(shared_scale):
    dm = dt.inject(TwoLayers(), SharedScaleConfig(targets=["a", "b"], penalty=0.5))
    assert dm.regularization_loss().item() == 0
    perturb(dm, std=0.3)
    v = [dm.model.a.deltas["default"].v, dm.model.b.deltas["default"].v]
    expected = 0.5 * sum(t.square().sum() for t in v)
    assert_close(dm.regularization_loss(), expected, rtol=1e-5, atol=1e-6)
    dm.regularization_loss().backward()
    assert all(t.grad is not None for t in v)
    dm.merge()
    assert dm.regularization_loss().item() == 0  # merged deltas no longer train


def test_trainer_calls_on_train_step_with_the_step_counter(shared_scale):
    dm = dt.inject(TwoLayers(), SharedScaleConfig(targets=["a"]))
    for step in (0, 1, 2):
        dm.on_train_step(step)
    assert dm.model.a.deltas["default"].steps == [0, 1, 2]


def test_after_update_gets_the_whole_adapter_after_the_optimizer_step(shared_scale, monkeypatch):
    monkeypatch.setattr(SharedScale, "calls", [], raising=False)
    dm = dt.inject(TwoLayers(), SharedScaleConfig(targets=["a", "b"]))
    dm.add_adapter("frozen", SharedScaleConfig(targets=["a"]))
    perturb(dm, std=0.3)
    opt = torch.optim.SGD([p for p in dm.parameters() if p.requires_grad], lr=0.1)
    before = dm.model.a.deltas["default"].v.detach().clone()
    (dm(torch.randn(3, 6)).square().sum() + dm.regularization_loss()).backward()
    opt.step()
    dm.after_update(0, 7)
    assert SharedScale.calls == [(0, 7, [True, True], [True, True])]  # once, for the trained adapter only
    assert not torch.equal(dm.model.a.deltas["default"].v, before)  # after the step


# --- token masks --------------------------------------------------------------------------------
def test_token_mask_applies_the_delta_only_to_masked_tokens(make_minilm, minilm_batch):
    model = make_minilm()
    dm = dt.inject(model, dt.LoRAConfig(r=4, targets=["query", "value"]))
    perturb(dm, std=0.2)
    batch = {k: v for k, v in minilm_batch.items() if k != "labels"}
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    mask[:, 3:6] = True
    h = {}
    layer = dm.model.bert.encoder.layer[0].attention.self.query
    hook = layer.register_forward_hook(lambda m, i, o: h.__setitem__("out", o))
    dm(**batch, token_mask=mask)
    masked = h["out"]
    dm(**batch)
    adapted = h["out"]
    with dm.disabled():
        dm(**batch)
    base = h["out"]
    hook.remove()
    assert torch.equal(masked[mask], adapted[mask])
    assert torch.equal(masked[~mask], base[~mask])
    assert max_diff(adapted[~mask], base[~mask]) > 1e-3  # the delta is not zero where the mask is off
    full = dm(**batch, token_mask=torch.ones_like(mask))
    assert max_diff(full.logits, dm(**batch).logits) == 0


def test_token_mask_combines_with_mixed_adapter_batches():
    torch.manual_seed(0)
    dm = dt.inject(Holder(nn.Linear(6, 4)), dt.LoRAConfig(r=2, targets=["layer"]))
    perturb(dm, std=0.3)
    x = torch.randn(2, 5, 6)
    mask = torch.rand(2, 5) > 0.5
    out = dm(x, adapter_names=["default", "__base__"], token_mask=mask)
    with dm.disabled():
        base = dm(x)
    assert torch.equal(out[1], base[1])
    assert_close(out[0][mask[0]], dm(x)[0][mask[0]], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0][~mask[0]], base[0][~mask[0]])


def test_token_mask_of_the_wrong_shape_says_what_it_needs():
    dm = dt.inject(Holder(nn.Linear(6, 4)), dt.LoRAConfig(r=2, targets=["layer"]))
    with pytest.raises(ValueError, match="token_mask has shape \\(2, 3\\).*\\(batch, sequence\\)"):
        dm(torch.randn(2, 5, 6), token_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be \\(batch, sequence\\)"):
        dm(torch.randn(2, 5, 6), token_mask=torch.ones(2, 5, 1, dtype=torch.bool))
