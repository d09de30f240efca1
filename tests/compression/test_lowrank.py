"""Truncated-SVD factorisation and LASER: exactness at full rank, rank choice, hand counts, search."""

from __future__ import annotations

import pytest
import torch
from helpers import Holder, assert_close
from torch import nn

from deltatune.compression.lowrank import (
    LowRankLinear,
    factorize,
    laser,
    laser_search,
    max_useful_rank,
    rank_for_energy,
)
from deltatune.compression.report import count_parameters, flops_per_token, size_on_disk
from deltatune.compression.structured import load_pruned


def with_singular_values(s: list[float], d_out: int = 6, d_in: int = 8, seed: int = 0) -> torch.Tensor:
    """A (d_out, d_in) matrix U diag(s) V^T with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, len(s), generator=g))
    V, _ = torch.linalg.qr(torch.randn(d_in, len(s), generator=g))
    return U @ torch.diag(torch.tensor(s)) @ V.T


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


# --- the factorised layer -----------------------------------------------------------------------------
def test_full_rank_factors_reproduce_every_linear_of_a_model(tiny_llama):
    linears = [(p, m) for p, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per block, and the LM head
    for path, module in linears:
        x = torch.randn(3, 5, module.in_features)
        full = LowRankLinear.from_linear(module, min(module.weight.shape))
        assert_close(full(x), module(x), msg=path)


def test_low_rank_linear_is_two_thin_matmuls_plus_bias():
    US, Vt, b = torch.randn(5, 2), torch.randn(2, 7), torch.randn(5)
    layer = LowRankLinear(US, Vt, b)
    x = torch.randn(4, 7)
    assert_close(layer(x), x @ Vt.T @ US.T + b, rtol=1e-5, atol=1e-6)
    assert (layer.in_features, layer.out_features, layer.rank) == (7, 5, 2)
    with pytest.raises(ValueError, match="share a rank"):
        LowRankLinear(torch.randn(5, 2), torch.randn(3, 7))


def test_factorize_recovers_an_exactly_low_rank_layer(tiny_llama):
    W = with_singular_values([3.0, 2.0, 1.0], d_out=16, d_in=20)
    model = Holder(linear_with(W))
    x = torch.randn(4, 20)
    reference = model(x)
    report = factorize(model, ["layer"], energy=0.999999)
    assert isinstance(model.layer, LowRankLinear) and model.layer.rank == 3
    assert_close(model(x), reference)
    assert report.layers[0].rank == 3 and report.layers[0].skipped is None


# --- choosing the rank ---------------------------------------------------------------------------------
def test_energy_picks_the_smallest_rank_that_reaches_it():
    S = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energy kept by k = 1..4: 16/30, 25/30, 29/30, 30/30
    assert [rank_for_energy(S, e) for e in (0.5, 16 / 30 + 1e-6, 0.8, 0.84, 0.96, 0.97, 1.0)] == [1, 2, 2, 3, 3, 4, 4]
    model = Holder(linear_with(with_singular_values([4.0, 3.0, 2.0, 1.0], d_out=16, d_in=20)))
    assert factorize(model, ["layer"], energy=0.8).layers[0].rank == 2


def test_parameter_and_flop_report_equals_a_hand_count():
    model = Holder(linear_with(torch.randn(16, 20)))
    params, flops = count_parameters(model), flops_per_token(model)
    assert flops == 2 * 16 * 20
    report = factorize(model, ["layer"], rank=2)
    assert (report.params_before, report.params_after) == (320, 2 * (16 + 20))
    assert (report.flops_before, report.flops_after) == (640, 144)
    assert count_parameters(model) == params - 320 + 72  # the bias (16) is kept as it was
    assert flops_per_token(model) == 144
    assert "320 -> 72" in report.to_markdown() and report.to_dict()["layers"][0]["rank"] == 2


def test_a_rank_that_saves_nothing_keeps_the_layer_dense_and_says_why():
    model = Holder(linear_with(torch.randn(16, 20)))
    assert max_useful_rank(16, 20) == 8  # 8 * 36 = 288 < 320, 9 * 36 = 324 >= 320
    report = factorize(model, ["layer"], rank=9)
    assert type(model.layer) is nn.Linear and "saves nothing" in report.layers[0].skipped
    assert report.params_after == report.params_before == 320
    conv = Holder(nn.Conv1d(4, 4, 1))
    assert "not an nn.Linear" in factorize(conv, ["layer"], rank=1).layers[0].skipped


def test_default_targets_are_the_block_linears_and_the_model_reloads(tiny_llama, tmp_path):
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    dense_bytes = size_on_disk(tiny_llama)
    report = factorize(tiny_llama, rank=4)
    paths = [layer.path for layer in report.factorized]
    assert len(paths) == 2 * 7 and all(p.startswith("model.layers.") for p in paths)
    assert type(tiny_llama.lm_head) is nn.Linear  # outside the blocks: dense
    tiny_llama.save_pretrained(tmp_path)
    assert size_on_disk(tiny_llama) == sum(f.stat().st_size for f in tmp_path.iterdir()) < dense_bytes
    reloaded = load_pruned(tmp_path)
    assert isinstance(reloaded.model.layers[1].mlp.up_proj, LowRankLinear)
    assert_close(reloaded(ids).logits, tiny_llama(ids).logits, rtol=1e-5, atol=1e-6)


def test_bad_options_are_refused():
    model = Holder(nn.Linear(4, 4))
    for kwargs in ({}, {"rank": 2, "energy": 0.9}, {"rank": 0}, {"energy": 1.5}, {"energy": 0.0}):
        with pytest.raises(ValueError):
            factorize(model, ["layer"], **kwargs)


# --- LASER ---------------------------------------------------------------------------------------------
def test_laser_keeps_the_shape_and_reduces_the_rank(tiny_gpt2):
    model = Holder(linear_with(torch.randn(12, 10)))
    assert laser(model, "layer", 0.3) == 3  # int(0.3 * 10)
    assert model.layer.weight.shape == (12, 10) and torch.linalg.matrix_rank(model.layer.weight) == 3
    # any layer kind with a weight matrix: GPT-2's Conv1D stores (d_in, d_out)
    c_fc = tiny_gpt2.transformer.h[0].mlp.c_fc
    other = tiny_gpt2.transformer.h[1].mlp.c_fc.weight.clone()
    assert laser(tiny_gpt2, "transformer.h.0.mlp.c_fc", 0.25) == 8
    assert c_fc.weight.shape == (32, 128) and torch.linalg.matrix_rank(c_fc.weight) == 8
    assert torch.equal(tiny_gpt2.transformer.h[1].mlp.c_fc.weight, other)


def test_laser_at_fraction_one_changes_nothing_and_bad_requests_fail():
    model = Holder(linear_with(torch.randn(6, 6)))
    before = model.layer.weight.clone()
    laser(model, "layer", 1.0)
    assert_close(model.layer.weight, before)
    with pytest.raises(ValueError, match="did you mean 'layer'"):
        laser(model, "layr", 0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        laser(model, "layer", 0.0)


def test_laser_search_keeps_the_candidate_that_denoises_best():
    clean = with_singular_values([5.0, 4.0], d_out=16, d_in=16)
    noisy = clean + 0.05 * torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    model = Holder(linear_with(noisy))

    def error(m: nn.Module) -> float:
        return (m.layer.weight - clean).norm().item()

    result = laser_search(model, [("layer", 0.5), ("layer", 0.125), ("layer", 0.0625)], error)
    assert result.best == ("layer", 0.125)  # rank 2: the clean matrix's rank
    assert result.best_score < result.scores[("layer", 0.5)] and result.best_score < result.baseline
    assert torch.linalg.matrix_rank(model.layer.weight) == 2 and error(model) == pytest.approx(result.best_score)


def test_laser_search_changes_nothing_when_no_candidate_helps():
    model = Holder(linear_with(torch.randn(8, 8)))
    before = model.layer.weight.clone()
    target = before.clone()
    result = laser_search(model, [("layer", 0.25), ("layer", 0.5)], lambda m: (m.layer.weight - target).norm().item())
    assert result.best is None and result.best_score == result.baseline
    assert torch.equal(model.layer.weight, before)
    accuracy_like = laser_search(model, [("layer", 0.5)], lambda m: -(m.layer.weight - target).norm().item(),
                                 goal="max")
    assert accuracy_like.best is None
