"""ShareLoRA: per-projection-type shared factors (A, B or both): counts (with MiniLM's 6 query layers),
init, gradients, merge, save/load incl. shared tensors, mixed batches, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close,
    assert_round_trip,
    assert_rows_match_each_adapter,
    max_diff,
    perturb,
    train_losses,
)
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.sharelora  # noqa: F401

R, L, D_IN, D_OUT = 2, 3, 8, 6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D_IN, D_OUT)
        self.v = nn.Linear(D_IN, D_OUT)
        self.back = nn.Linear(D_OUT, D_IN)

    def forward(self, x):
        return x + self.back(torch.tanh(self.q(x)) * self.v(x))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(L))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


X = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))


def share(model, **options):
    return dt.inject(model, dt.make_config("sharelora", **{"r": R, "targets": ["q", "v"], **options}))


@pytest.mark.parametrize("mode,per_type", [("A", R * D_IN + L * R * D_OUT), ("B", L * R * D_IN + R * D_OUT),
                                           ("AB", R * (D_IN + D_OUT))])
def test_parameter_count_shared_once(mode, per_type):
    dm = share(Stack(), share=mode)
    assert dm.trainable_parameters() == 2 * per_type  # two projection types, q and v
    assert sorted(dm.shared["default"].lora_A) == (["q", "v"] if "A" in mode else [])
    delta = dm.model.blocks[1].q.deltas["default"]
    A, B = delta.factors()
    other = dm.model.blocks[2].q.deltas["default"].factors()
    assert (A is other[0]) == ("A" in mode) and (B is other[1]) == ("B" in mode)
    assert A is not dm.model.blocks[1].v.deltas["default"].factors()[0]  # q and v never share


@pytest.mark.parametrize("mode", ["A", "B", "AB"])
def test_init_merge_and_gradients(mode):
    model = Stack()
    base = model(X).detach()
    W0 = model.blocks[0].q.weight.detach().clone()
    dm = share(model, share=mode)
    assert max_diff(dm(X), base) == 0
    dm(X).sum().backward()
    grads = {n for n, p in dm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    perturb(dm, std=0.3)
    y = dm(X).detach()
    assert max_diff(y, base) > 1e-3
    dm.merge()
    assert max_diff(dm(X), y) < 1e-6 * max(1.0, y.abs().max().item())  # outputs reach ~50: relative
    dm.unmerge()
    assert_close(dm.model.blocks[0].q.base_layer.weight, W0, rtol=1e-5, atol=1e-6)


def test_shared_gradient_sums_over_the_group():
    dm = share(Stack())
    perturb(dm, std=0.3)
    A = dm.shared["default"].lora_A["q"]
    dm(X).sum().backward()
    total = A.grad.clone()
    # the same gradient as three private copies of A summed
    grads = []
    for i in range(L):
        A.grad = None
        delta = dm.model.blocks[i].q.deltas["default"]
        own = A.detach().clone().requires_grad_(True)
        delta.factors = lambda own=own, d=delta: (own, d.lora_B)
        grads.append(own)
    dm(X).sum().backward()
    assert_close(sum(g.grad for g in grads), total)


def test_save_load_round_trip_includes_shared(tmp_path):
    dm = share(Stack(), share="A", bias="lora_only")
    perturb(dm)
    fresh = assert_round_trip(dm, Stack(), X, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    assert {"__shared__.lora_A.q", "__shared__.lora_A.v", "blocks.0.q.lora_B", "blocks.2.v.lora_bias"} <= keys
    assert not any(k.endswith(".lora_A") for k in keys)
    assert torch.equal(fresh.shared["default"].lora_A["q"], dm.shared["default"].lora_A["q"])


def test_mixed_batch():
    dm = share(Stack(), share="A")
    dm.add_adapter("other", dt.make_config("sharelora", r=R, targets=["q", "v"], share="B"))
    dm.set_active(["default", "other"])
    perturb(dm, std=0.3)
    assert_rows_match_each_adapter(dm, X, ["other", dt.BASE, "default", "default", "other"])


def test_errors():
    model = Stack()
    model.blocks[1].q = nn.Linear(D_IN + 1, D_OUT)
    with pytest.raises(ValueError, match=r"shares A across the 'q' layers.*d_in differ.*blocks\.1\.q"):
        share(model, targets=["q"])
    share(Stack(), targets=["q"], share="B")  # d_out still matches: sharing B is fine
    with pytest.raises(ValueError, match="PiSSA"):
        dt.make_config("sharelora", init="pissa")
    with pytest.raises(ValueError):
        dt.make_config("sharelora", share="C")


def test_minilm_query_count_and_training(make_minilm, minilm_batch):
    torch.manual_seed(0)
    r = 4
    dm = dt.inject(make_minilm(), dt.make_config("sharelora", r=r, targets=["query"]))
    assert dm.trainable_parameters() == r * 384 + 6 * r * 384  # r d_in + L r d_out, L = 6 query layers
    losses = train_losses(dm, minilm_batch, steps=4, labels=torch.tensor([1, 0, 0, 1]))
    assert losses[-1] < losses[0], losses
