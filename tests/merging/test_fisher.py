"""Fisher merging: the importance stage is the closed form; estimate_fisher matches hand-derived Fishers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close
from torch import nn

from deltatune import assets
from deltatune.merging.fisher import estimate_fisher, fisher_norm, load_fisher, save_fisher
from deltatune.merging.task_arithmetic import TaskVectorMerge, get_merge_method


def rand(*shape: int, seed: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 0.05 if positive else x


# --- the merge ---


def test_fisher_pipeline_equals_the_closed_form() -> None:
    base, thetas = rand(4, 6, seed=0), [rand(4, 6, seed=s) for s in (1, 2, 3)]
    fishers, weights = [rand(4, 6, seed=s, positive=True) for s in (4, 5, 6)], [0.5, 1.0, 2.0]
    out = get_merge_method("fisher").merge_tensor(base, thetas, weights, importance=fishers)
    num = sum(w * f * t for w, f, t in zip(weights, fishers, thetas))
    den = sum(w * f for w, f in zip(weights, fishers))
    torch.testing.assert_close(out, num / den)


def test_equal_fishers_give_the_weighted_mean_and_one_model_gives_itself() -> None:
    base, thetas, f = rand(5, seed=0), [rand(5, seed=1), rand(5, seed=2)], rand(5, seed=3, positive=True)
    method = get_merge_method("fisher")
    torch.testing.assert_close(method.merge_tensor(base, thetas, [1.0, 3.0], importance=[f, f]),
                               (thetas[0] + 3 * thetas[1]) / 4)
    torch.testing.assert_close(method.merge_tensor(base, thetas[:1], [0.7], importance=[f]), thetas[0])


def test_floor_turns_vanishing_fishers_into_plain_averaging() -> None:
    base, thetas = torch.zeros(2), [torch.tensor([2.0, 2.0]), torch.tensor([6.0, 6.0])]
    fishers = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])]
    out = get_merge_method("fisher").merge_tensor(base, thetas, [1.0, 1.0], importance=fishers)
    assert torch.allclose(out, torch.tensor([4.0, (2.0 + 3 * 6.0) / 4]))  # entry 0: both floored to 1e-6


def test_importance_in_a_non_normalised_method_scales_each_entry() -> None:
    base, thetas, imp = rand(3, seed=0), [rand(3, seed=1), rand(3, seed=2)], [torch.full((3,), 2.0), torch.ones(3)]
    out = TaskVectorMerge(lambda_=0.5).merge_tensor(base, thetas, [1.0, -1.0], importance=imp)
    torch.testing.assert_close(out, base + 0.5 * (2 * (thetas[0] - base) - (thetas[1] - base)))


def test_state_dicts_pass_importance_per_key_and_average_uncovered_tensors() -> None:
    base = {"w": rand(3, 2, seed=0), "b": rand(3, seed=1), "ids": torch.arange(3)}
    fts = [{k: v + rand(*v.shape, seed=s) if v.is_floating_point() else v for k, v in base.items()}
           for s in (2, 3)]
    fishers = [{"w": rand(3, 2, seed=4, positive=True)}, {"w": rand(3, 2, seed=5, positive=True)}]
    out = get_merge_method("fisher").merge_state_dicts(base, fts, [1.0, 1.0], importance=fishers)
    f0, f1 = fishers[0]["w"], fishers[1]["w"]
    torch.testing.assert_close(out["w"], (f0 * fts[0]["w"] + f1 * fts[1]["w"]) / (f0 + f1))
    torch.testing.assert_close(out["b"], (fts[0]["b"] + fts[1]["b"]) / 2)  # no Fisher: isotropic
    assert torch.equal(out["ids"], base["ids"])


def test_missing_or_bad_importance_says_how_to_fix_it() -> None:
    base, thetas = torch.zeros(3), [torch.ones(3)]
    method = get_merge_method("fisher")
    with pytest.raises(ValueError, match=r"estimate_fisher.*`fisher:` file"):
        method.merge_tensor(base, thetas, [1.0])
    with pytest.raises(ValueError, match="estimate_fisher"):
        method.merge_state_dicts({"w": base}, [{"w": thetas[0]}], [1.0])
    with pytest.raises(ValueError, match=r"importance 0 has shape \(2,\)"):
        method.merge_tensor(base, thetas, [1.0], importance=[torch.ones(2)])
    with pytest.raises(ValueError, match=">= 0"):
        method.merge_tensor(base, thetas, [1.0], importance=[-torch.ones(3)])
    with pytest.raises(ValueError, match="one importance tensor per"):
        method.merge_tensor(base, thetas, [1.0], importance=[torch.ones(3)] * 2)
    with pytest.raises(ValueError, match="did you mean 'lin.weight'"):
        method.merge_state_dicts({"lin.weight": base}, [{"lin.weight": thetas[0]}], [1.0],
                                 importance=[{"lin.weigth": torch.ones(3)}])
    two = {"a": base, "b": base}
    with pytest.raises(ValueError, match="cover different tensors"):
        method.merge_state_dicts(two, [two, two], [1.0, 1.0], importance=[{"a": base}, {"b": base}])


# --- estimating it ---


class BagOfWords(nn.Module):
    """Mean token embedding -> linear softmax classifier: the head's per-example gradient has a closed form."""

    def __init__(self, vocab: int = 12, dim: int = 5, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids).mean(1)  # (B, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.features(input_ids)))


@pytest.fixture
def bag() -> tuple[BagOfWords, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = BagOfWords()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 12, (6, 4), generator=g),
             "labels": torch.randint(0, 3, (6,), generator=g)}
    return model, batch


def test_empirical_fisher_of_the_head_is_the_closed_form(bag) -> None:
    model, batch = bag
    with torch.no_grad():
        h = model.features(batch["input_ids"])  # (B, dim)
        p = torch.softmax(model.head(h), -1)  # (B, C)
    residual = torch.nn.functional.one_hot(batch["labels"], 3).float() - p  # d log p_y / d logits
    expected_w = (residual[:, :, None] * h[:, None, :]).square().mean(0)  # (C, dim)
    fisher = estimate_fisher(model, [batch], empirical=True, targets=["head"])
    assert fisher.keys() == {"head.weight", "head.bias"}
    assert_close(fisher["head.weight"], expected_w)
    assert_close(fisher["head.bias"], residual.square().mean(0))
    split = estimate_fisher(model, [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}],
                            empirical=True, targets=["head"])
    assert_close(split["head.weight"], expected_w)  # batching does not change a per-example sum


def test_sampled_fisher_converges_to_the_exact_expectation(bag) -> None:
    model, batch = bag
    with torch.no_grad():
        h = model.features(batch["input_ids"])
        p = torch.softmax(model.head(h), -1)
    # E_y[(e_y - p)_c^2] = p_c (1 - p_c) for a softmax, so F_W[c, j] = mean_n p_c (1 - p_c) h_j^2
    exact = (p * (1 - p))[:, :, None].mul(h[:, None, :].square()).mean(0)
    repeats = 400
    fisher = estimate_fisher(model, [batch] * repeats, targets=["head"], seed=3)["head.weight"]
    assert fisher.shape == exact.shape
    assert (fisher - exact).abs().sum() / exact.sum() < 0.05
    again = estimate_fisher(model, [batch] * 3, targets=["head"], seed=3)["head.weight"]
    other = estimate_fisher(model, [batch] * 3, targets=["head"], seed=4)["head.weight"]
    assert torch.equal(again, estimate_fisher(model, [batch] * 3, targets=["head"], seed=3)["head.weight"])
    assert not torch.equal(again, other)


def test_causal_lm_fisher_matches_a_brute_force_loop_over_hf_losses(tiny_gpt2) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fisher = estimate_fisher(tiny_gpt2, batch, empirical=True)

    params = dict(tiny_gpt2.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(3):
        out = tiny_gpt2(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i : i + 1])
        n_predicted = int((labels[i, 1:] != -100).sum())
        log_p = -out.loss * n_predicted  # HF's loss is the mean next-token cross-entropy
        for name, grad in zip(params, torch.autograd.grad(log_p, list(params.values()))):
            expected[name] += grad.square() / 3
    sd = tiny_gpt2.state_dict(keep_vars=True)
    assert fisher.keys() == {k for k, v in sd.items() if isinstance(v, nn.Parameter)}
    assert "lm_head.weight" in fisher
    for name in expected:
        assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-9, msg=name)  # squared grads: scale by the largest
    # GPT-2 ties lm_head to wte: the Fisher is under both names, in separate memory (safetensors can save it)
    torch.testing.assert_close(fisher["lm_head.weight"], fisher["transformer.wte.weight"])
    assert fisher["lm_head.weight"].data_ptr() != fisher["transformer.wte.weight"].data_ptr()
    sampled = estimate_fisher(tiny_gpt2, batch, n_samples=2)
    assert all((f >= 0).all() for f in sampled.values())


def test_real_minilm_classifier_fisher(make_minilm, minilm_tokenizer) -> None:
    rows = assets.rotten_tomatoes()
    rows = [r for r in rows if r["label"] == 1][:3] + [r for r in rows if r["label"] == 0][:3]
    batch = dict(minilm_tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=48,
                                  return_tensors="pt"))
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    model = make_minilm()
    trainable = {k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    for empirical, n in ((False, None), (True, 2)):
        fisher = estimate_fisher(model, [batch], empirical=empirical, n_samples=n)
        assert fisher.keys() == trainable
        assert all(torch.isfinite(f).all() and (f >= 0).all() for f in fisher.values())
        assert fisher["classifier.weight"].sum() > 0
        assert fisher["bert.encoder.layer.0.attention.self.query.weight"].sum() > 0
    assert not model.training  # the mode is restored


def test_save_and_load_round_trip_atomically(tmp_path) -> None:
    shared = torch.rand(4, 3)
    fisher = {"a.weight": shared, "b.weight": shared, "c.bias": torch.rand(3)}  # tied: same storage twice
    path = tmp_path / "sub" / "fisher.safetensors"
    save_fisher(fisher, path)
    loaded = load_fisher(path)
    assert loaded.keys() == fisher.keys() and all(torch.equal(loaded[k], fisher[k]) for k in fisher)
    assert [p.name for p in path.parent.iterdir()] == ["fisher.safetensors"]  # no temp file left
    with pytest.raises(ValueError, match="save_fisher"):
        load_fisher(tmp_path / "missing.safetensors")
    assert fisher_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


def test_estimate_fisher_errors(bag) -> None:
    model, batch = bag
    with pytest.raises(ValueError, match="labels"):
        estimate_fisher(model, {"input_ids": batch["input_ids"]}, empirical=True)
    with pytest.raises(ValueError, match="no example"):
        estimate_fisher(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        estimate_fisher(model, [{"ids": batch["input_ids"]}])
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        estimate_fisher(model, batch, targets=["head"])
    assert estimate_fisher(model, batch, n_samples=2).keys() == {"emb.weight"}
