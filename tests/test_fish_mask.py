"""FISH mask: the chosen entries are exactly the global top-k of the empirical Fisher computed by hand, a saved
adapter loads without scores, and `deltatune train` scores its first training batches (MiniLM). The engine's
properties are tests/test_selection.py's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, perturb
from torch import nn

import deltatune as dt
from deltatune.training.loop import Trainer
from deltatune.training.recipe import load_recipe


class Softmax(nn.Module):
    """Linear softmax classifier: its CE gradient has a closed form, (p - y)ᵀ x / B."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(5, 3)

    def forward(self, x, labels=None):
        logits = self.head(x)
        return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [{"x": torch.randn(6, 5, generator=g), "labels": torch.randint(0, 3, (6,), generator=g)} for _ in range(n)]


def hand_fisher(model: Softmax, data) -> dict[str, torch.Tensor]:
    w, b = model.head.weight.detach(), model.head.bias.detach()
    fw, fb = torch.zeros_like(w), torch.zeros_like(b)
    for batch in data:
        x, y = batch["x"], batch["labels"]
        err = (torch.softmax(x @ w.T + b, -1) - nn.functional.one_hot(y, 3).float()) / len(y)  # dL/dlogits
        fw += (err.T @ x).square()
        fb += err.sum(0).square()
    return {"head.weight": fw / len(data), "head.bias": fb / len(data)}


def test_the_chosen_entries_are_the_global_top_k_of_the_hand_computed_fisher():
    model, data = Softmax(), batches()
    scores = dt.fisher_scores(model, data, ["head.weight", "head.bias"])
    hand = hand_fisher(Softmax(), data)
    for name in hand:
        assert_close(scores[name], hand[name])
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # the model is left as it was

    dm = dt.inject(model, dt.make_config("fish_mask", density=0.3, scores=scores, targets=["head.weight", "head.bias"]))
    delta = dict(dm.layers())["head"].deltas["default"]
    k = math.ceil(0.3 * 18)
    flat = torch.cat([hand["head.bias"], hand["head.weight"].reshape(-1)])  # sorted names: bias first
    top = set(torch.topk(flat, k).indices.tolist())
    got = {i for i in delta.index("bias").tolist()} | {3 + i for i in delta.index("weight").tolist()}
    assert got == top and dm.trainable_parameters() == k


def test_a_saved_adapter_loads_without_scores(tmp_path):
    data = batches()
    scores = dt.fisher_scores(Softmax(), data)
    dm = dt.inject(Softmax(), dt.make_config("fish_mask", density=0.25, scores=scores))
    perturb(dm, std=0.3)
    dm.save(tmp_path / "a")
    again = dt.load(Softmax(), tmp_path / "a")  # no scores: the indices come from the file
    with torch.no_grad():
        assert_close(again(**data[0]).logits, dm(**data[0]).logits)
    assert torch.equal(dict(again.layers())["head"].deltas["default"].index("weight"),
                       dict(dm.layers())["head"].deltas["default"].index("weight"))


def test_missing_or_foreign_scores_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="needs Fisher scores.*dt.fisher_scores"):
        dt.inject(Softmax(), dt.make_config("fish_mask"))
    other = {"head.bias": torch.ones(3)}
    with pytest.raises(ValueError, match="no Fisher scores for 'head.weight'"):
        dt.inject(Softmax(), dt.make_config("fish_mask", scores=other))
    with pytest.raises(ValueError, match="no .loss"):
        dt.fisher_scores(nn.Sequential(nn.Linear(5, 3)), [{"input": torch.ones(2, 5)}])


@pytest.mark.slow
def test_deltatune_train_scores_its_first_training_batches_on_minilm(tmp_path):
    method = "{name: fish_mask, density: 0.002, calibration_batches: 2, targets: ['re:.*\\.(query|value)\\.weight']}"
    recipe = load_recipe(None, [f"method={method}", "data.max_train=40", "data.max_eval=16", "train.batch_size=4",
                                "train.max_length=24", "train.steps=3", f"train.output_dir={tmp_path}"])
    trainer = Trainer(recipe)
    trainer.setup()
    torch.manual_seed(recipe.train.seed)  # the base as build_model makes it (the new head from the seed)
    base = trainer.task.build_model(torch.float32)
    scores = dt.fisher_scores(base, trainer._calibration_batches(2), ["re:.*\\.(query|value)\\.weight"])
    chosen = dt.make_config("fish_mask", density=0.002, scores=scores).chosen()
    layers = dict(trainer.model.layers())
    assert len(chosen) == 12
    for name, index in chosen.items():
        delta = layers[name.rsplit(".", 1)[0]].deltas["default"]
        assert torch.equal(delta.index("weight"), index.sort().values), name
    assert trainer.model.trainable_parameters() == math.ceil(0.002 * 12 * 384 * 384) + 770  # + the new head
    result = trainer.train()
    assert math.isfinite(result.after["loss"])
    loaded = dt.load(trainer.task.build_model(torch.float32), result.adapter_dir)  # the saved adapter, no data
    assert loaded.trainable_parameters() == trainer.model.trainable_parameters()
