"""Exact adapter merging: merge the deltas s B A (not A and B), re-compress by truncated SVD, match real PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import assert_close, max_diff, perturb

import deltatune as dt
from deltatune.merging import MERGE_METHODS
from deltatune.merging.adapters import merge_adapters, read_adapter_deltas, truncated_svd
from deltatune.merging.sparsify import Sparsify, magnitude

peft = pytest.importorskip("peft")

R = 4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def lora(make_minilm, targets=("query", "value"), name="default", seed=0, **options):
    """A LoRA adapter on real MiniLM whose B (and A) were moved off their init, so its delta is not zero."""
    torch.manual_seed(seed)
    dm = dt.inject(make_minilm(), dt.make_config("lora", r=R, alpha=2 * R, targets=list(targets), **options), name)
    perturb(dm, 0.05, seed=100 + seed)
    return dm


@pytest.fixture(scope="module")
def saved(make_minilm, tmp_path_factory):
    """Adapter a on query+value of layers 0-2, b on their query only (b lacks the value layers), both formats."""
    root = tmp_path_factory.mktemp("adapters")
    for name, targets, seed in (("a", (r"re:.*layer\.[0-2]\..*\.(query|value)",), 0), ("b", (r"re:.*layer\.[0-2]\..*\.query",), 1)):
        dm = lora(make_minilm, targets, name, seed)
        dm.save(root / name)
        dm.export_peft(root / f"peft_{name}")
    return root


def file_deltas(path) -> dict[str, torch.Tensor]:
    return {p: f.delta() for p, f in read_adapter_deltas(path).layers.items()}


@pytest.mark.parametrize("options", [{}, {"rslora": True}, {"init": "pissa_niter_4"}, {"bias": "lora_only"}],
                         ids=["lora", "rslora", "pissa", "lora_only_bias"])
def test_one_adapter_with_weight_one_is_reproduced(options, make_minilm, minilm_batch, tmp_path):
    dm = lora(make_minilm, **options)
    dm.save(tmp_path / "in")
    report = merge_adapters([tmp_path / "in"], [1.0], out=tmp_path / "out")
    assert report.format == "deltatune" and report.energy == pytest.approx(1.0, abs=1e-9)
    assert report.rank == (2 * R if "init" in options else R)  # PiSSA's delta is s(BA - B0 A0): rank 2r
    merged = dt.load(make_minilm(), tmp_path / "out")
    ours, expected = logits(merged, minilm_batch), logits(dm, minilm_batch)
    assert max_diff(expected, logits(make_minilm(), minilm_batch)) > 1e-3  # the adapter does something
    assert_close(ours, expected)


def test_one_peft_adapter_is_reproduced_in_peft_format(saved, make_minilm, minilm_batch, tmp_path):
    report = merge_adapters([saved / "peft_a"], [1.0], out=tmp_path / "out")
    assert report.format == "peft"  # "auto": PEFT inputs give PEFT output
    ours = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "out")
    original = peft.PeftModel.from_pretrained(make_minilm(), saved / "peft_a")
    assert_close(logits(ours, minilm_batch), logits(original, minilm_batch))


def test_linear_merge_equals_stacking_and_not_averaging_factors(saved, make_minilm, minilm_batch, tmp_path):
    stacked = dt.load(make_minilm(), saved / "a")
    stacked.load_adapter(saved / "b")
    stacked.set_active(["a", "b"])  # W0 + dW_a + dW_b; b has no value layers
    report = merge_adapters([saved / "a", saved / "b"], [1.0, 1.0], out=tmp_path / "out")
    assert report.rank == 2 * R and report.rel_error < 1e-6
    assert {r.rank for r in report.layers if r.path.endswith("value")} == {R}  # only a adapts value
    merged = dt.load(make_minilm(), tmp_path / "out")
    assert_close(logits(merged, minilm_batch), logits(stacked, minilm_batch))

    # The wrong way: average A and B separately, (B_a + B_b)/2 (A_a + A_b)/2 has cross terms B_a A_b.
    merge_adapters([saved / "a", saved / "b"], [0.5, 0.5], out=tmp_path / "half")
    half = file_deltas(tmp_path / "half")
    a, b = read_adapter_deltas(saved / "a").layers, read_adapter_deltas(saved / "b").layers
    p = "bert.encoder.layer.0.attention.self.query"
    right = 0.5 * (a[p].delta() + b[p].delta())
    wrong = a[p].scale * ((a[p].B + b[p].B) / 2) @ ((a[p].A + b[p].A) / 2)
    assert_close(half[p], right, rtol=1e-4, atol=1e-6)
    assert max_diff(wrong, right) > 100 * max_diff(half[p], right)


def test_full_rank_svd_is_exact():
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low = truncated_svd(W, rank=12)
    assert low.energy == pytest.approx(1.0, abs=1e-12) and low.rel_error < 1e-6
    assert_close(low.B.double() @ low.A.double(), W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_truncated_energy_is_the_kept_share_of_squared_singular_values(k):
    W = torch.randn(15, 9, generator=torch.Generator().manual_seed(k))
    s = torch.linalg.svdvals(W.double())
    low = truncated_svd(W, rank=k)
    energy = float(s[:k].square().sum() / s.square().sum())
    assert low.rank == k and low.energy == pytest.approx(energy, rel=1e-6)  # a float32 SVD of float32 data
    assert low.rel_error == pytest.approx((1 - energy) ** 0.5, rel=1e-5)  # Eckart-Young: the dropped s^2
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    assert_close(low.B.double() @ low.A.double(), (U[:, :k] * S[:k]) @ Vh[:k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99, 1.0])
def test_energy_picks_the_smallest_rank_that_keeps_it(target):
    W = torch.randn(12, 10, generator=torch.Generator().manual_seed(3))
    s2 = torch.linalg.svdvals(W.double()).square()
    share = (s2.cumsum(0) / s2.sum()).tolist()
    low = truncated_svd(W, energy=target)
    assert share[low.rank - 1] >= target - 1e-12
    assert low.rank == 1 or share[low.rank - 2] < target


def test_reported_energy_matches_the_exact_merged_deltas(saved, tmp_path):
    weights = [0.7, -0.4]
    a, b = file_deltas(saved / "a"), file_deltas(saved / "b")
    report = merge_adapters([saved / "a", saved / "b"], weights, rank=2, out=tmp_path / "out")
    stored = file_deltas(tmp_path / "out")
    for row in report.layers:
        exact = weights[0] * a[row.path] + (weights[1] * b[row.path] if row.path in b else 0)
        s2 = torch.linalg.svdvals(exact.double()).square()
        assert row.rank == 2 and row.energy == pytest.approx(float(s2[:2].sum() / s2.sum()), rel=1e-6)
        rel = float(torch.linalg.matrix_norm(stored[row.path] - exact) / torch.linalg.matrix_norm(exact))
        assert row.rel_error == pytest.approx(rel, rel=1e-3, abs=1e-6)
    by_energy = merge_adapters([saved / "a", saved / "b"], weights, energy=0.9, out=tmp_path / "energy")
    assert all(r.energy >= 0.9 for r in by_energy.layers)
    assert by_energy.rank == max(r.rank for r in by_energy.layers) < 2 * R


def test_svd_merge_matches_peft_add_weighted_adapter(saved, make_minilm, tmp_path):
    weights = [0.7, -0.4]
    pm = peft.PeftModel.from_pretrained(make_minilm(), saved / "peft_a", adapter_name="a")
    pm.load_adapter(saved / "peft_b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type="svd", svd_rank=R)
    merge_adapters([saved / "peft_a", saved / "peft_b"], weights, rank=R, out=tmp_path / "out", format="peft")
    ours = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "out")  # our file loads in real PEFT
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == R
    layers = [n for n, m in ours.named_modules() if hasattr(m, "get_delta_weight") and "default" in m.lora_A]
    assert len(layers) == 6
    for name in layers:
        theirs = pm.get_submodule(name).get_delta_weight("m")
        mine = ours.get_submodule(name).get_delta_weight("default")
        assert_close(mine, theirs, rtol=1e-4, atol=0)


def test_ties_runs_on_the_exact_deltas(saved, tmp_path):
    weights = [0.6, 0.8]
    a, b = file_deltas(saved / "a"), file_deltas(saved / "b")
    report = merge_adapters([saved / "a", saved / "b"], weights, "ties", rank=384, out=tmp_path / "out")
    stored = file_deltas(tmp_path / "out")
    for p in a:
        expected = MERGE_METHODS["ties"].merge_tensor(torch.zeros_like(a[p]), [a[p], b.get(p, torch.zeros_like(a[p]))],
                                                      weights)
        assert_close(stored[p], expected, rtol=1e-4, atol=1e-6, msg=p)
    assert report.method == "ties" and report.rel_error < 1e-5
    # Trimming makes the merged delta full rank, so the default rank (2r) would be lossy here.
    assert torch.linalg.matrix_rank(stored[p]) > 2 * R


def test_refuses_dora_and_full_modules_with_the_way_out(make_minilm, tmp_path):
    dora = dt.inject(make_minilm(), dt.make_config("dora", r=R, targets=["query"]))
    dora.save(tmp_path / "dora")
    dora.export_peft(tmp_path / "peft_dora")
    head = dt.inject(make_minilm(), dt.make_config("lora", r=R, targets=["query"]), train_modules=["classifier"])
    head.save(tmp_path / "head")
    for folder in ("dora", "peft_dora", "head"):
        with pytest.raises(ValueError, match="W0.*merge-adapter"):
            merge_adapters([tmp_path / folder], [1.0], out=tmp_path / f"out_{folder}")


def test_bad_arguments_are_refused(saved, tmp_path):
    a = saved / "a"
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        merge_adapters([a], [1.0], "tie", out=tmp_path / "o")
    with pytest.raises(ValueError, match="one weight per adapter"):
        merge_adapters([a, a], [1.0], out=tmp_path / "o")
    with pytest.raises(ValueError, match="not both"):
        merge_adapters([a], [1.0], rank=2, energy=0.9, out=tmp_path / "o")
    with pytest.raises(ValueError, match="did you mean 'peft'"):
        merge_adapters([a], [1.0], out=tmp_path / "o", format="pef")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        merge_adapters([a], [1.0], out=tmp_path / "full")


def test_overwrite_replaces_an_adapter_of_the_other_format(saved, tmp_path):
    out = tmp_path / "out"
    merge_adapters([saved / "peft_a"], [1.0], out=out)
    merge_adapters([saved / "a"], [1.0], out=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "deltatune_config.json"]


def test_every_layer_kind_round_trips_in_both_formats(make_synthetic, synthetic_input, tmp_path):
    """Embedding, Linear, GPT-2 Conv1D and Conv2d: matrix views in deltatune files, PEFT's own layouts in PEFT's."""
    dm = dt.inject(make_synthetic(), dt.make_config("lora", r=2, alpha=4, targets=["emb", "lin", "c1", "conv"]))
    perturb(dm, 0.1)
    with torch.no_grad():
        expected = dm(synthetic_input)
    dm.save(tmp_path / "native")
    dm.export_peft(tmp_path / "peft")
    merge_adapters([tmp_path / "native"], [1.0], out=tmp_path / "from_native")
    merge_adapters([tmp_path / "peft"], [1.0], out=tmp_path / "peft_out")
    merge_adapters([tmp_path / "peft"], [1.0], out=tmp_path / "peft_to_native", format="deltatune")
    with torch.no_grad():
        outputs = [dt.load(make_synthetic(), tmp_path / "from_native")(synthetic_input),
                   peft.PeftModel.from_pretrained(make_synthetic(), tmp_path / "peft_out")(synthetic_input),
                   dt.load(make_synthetic(), tmp_path / "peft_to_native")(synthetic_input)]
    assert max_diff(expected, make_synthetic()(synthetic_input)) > 1e-3
    for out in outputs:
        assert_close(out, expected)


def test_each_layer_keeps_its_own_rank_in_both_formats(saved, make_minilm, minilm_batch, tmp_path):
    """a + b: the query layers have rank 2R, the value layers (a only) rank R. Each is stored at its own rank
    (rank_pattern, no zero padding) with the exact merged delta; PEFT loads its file with equal outputs."""
    stacked = dt.load(make_minilm(), saved / "a")
    stacked.load_adapter(saved / "b")
    stacked.set_active(["a", "b"])
    a, b = file_deltas(saved / "a"), file_deltas(saved / "b")
    expected_ranks = {p: 2 * R if p in b else R for p in a}
    for fmt in ("deltatune", "peft"):
        inputs = [saved / "a", saved / "b"] if fmt == "deltatune" else [saved / "peft_a", saved / "peft_b"]
        report = merge_adapters(inputs, [1.0, 1.0], out=tmp_path / fmt, format=fmt)
        stored = read_adapter_deltas(tmp_path / fmt).layers
        assert {p: f.rank for p, f in stored.items()} == expected_ranks == {r.path: r.rank for r in report.layers}
        for p, f in stored.items():
            assert_close(f.delta(), a[p] + b[p] if p in b else a[p], rtol=1e-4, atol=0, msg=p)
        assert report.parameters == sum(f.rank * (f.shape[0] + f.shape[1]) for f in stored.values())
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 * R  # the most common rank (a tie: the larger)
    assert config["rank_pattern"] == config["alpha_pattern"] == {p: R for p in a if p not in b}
    theirs = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "peft")
    assert {p: theirs.get_submodule(p).lora_A["default"].weight.shape[0] for p in a} == expected_ranks
    want = logits(stacked, minilm_batch)
    assert_close(logits(theirs, minilm_batch), want)
    assert_close(logits(dt.load(make_minilm(), tmp_path / "deltatune"), minilm_batch), want)


def test_energy_merge_stores_per_layer_ranks_that_merge_again(saved, make_minilm, minilm_batch, tmp_path):
    """energy= keeps a different rank per layer; the file holds exactly those truncated SVDs, and merging it
    again (re-compressing an adapter whose layers have different ranks) is exact."""
    weights = [0.7, -0.4]
    a, b = file_deltas(saved / "a"), file_deltas(saved / "b")
    first = merge_adapters([saved / "a", saved / "b"], weights, energy=0.8, out=tmp_path / "energy")
    ranks = {r.path: r.rank for r in first.layers}
    assert len(set(ranks.values())) > 1  # the case this is about
    stored = read_adapter_deltas(tmp_path / "energy").layers
    assert {p: f.rank for p, f in stored.items()} == ranks
    for p, f in stored.items():
        exact = weights[0] * a[p] + (weights[1] * b[p] if p in b else 0)
        low = truncated_svd(exact, rank=ranks[p])
        assert_close(f.delta(), low.B @ low.A, rtol=1e-4, atol=0, msg=p)
    again = merge_adapters([tmp_path / "energy", saved / "a"], [1.0, 0.5], out=tmp_path / "again")
    merged = file_deltas(tmp_path / "again")
    for p, f in stored.items():
        assert_close(merged[p], f.delta() + 0.5 * a[p], rtol=1e-4, atol=0, msg=p)
    assert {r.path: r.rank for r in again.layers} == {p: ranks[p] + R for p in ranks}  # the default: sum of ranks
    dm = dt.load(make_minilm(), tmp_path / "again")  # deltatune's own loader builds every layer at its rank
    assert {p: dm.model.get_submodule(p).deltas["merged"].lora_A.shape[0] for p in ranks} == \
        {r.path: r.rank for r in again.layers}


def test_layers_that_cancel_are_stored_as_one_zero_pair(saved, make_minilm, minilm_batch, tmp_path):
    report = merge_adapters([saved / "a", saved / "a"], [1.0, -1.0], out=tmp_path / "zero", format="peft")
    assert {r.rank for r in report.layers} == {0} and report.rank == 1
    theirs = peft.PeftModel.from_pretrained(make_minilm(), tmp_path / "zero")
    assert_close(logits(theirs, minilm_batch), logits(make_minilm(), minilm_batch))


def test_lora_rank_pattern_sets_each_layers_rank_and_alpha(make_minilm, minilm_batch, tmp_path):
    """The option merges write: an exact path wins over a pattern, then the first matching pattern; it saves
    and loads (deltatune's files) with equal outputs; methods built on LoRA refuse it."""
    q0 = "bert.encoder.layer.0.attention.self.query"
    config = dt.make_config("lora", r=R, alpha=8.0, targets=["query", "value"], init="gaussian",
                            rank_pattern={"re:.*query": 2, q0: 6, "value": 3}, alpha_pattern={"value": 1.5})
    dm = dt.inject(make_minilm(), config)
    got = {p: (d.lora_A.shape[0], d.scale) for p, d in
           ((p, dm.model.get_submodule(p).deltas["default"]) for p in dm.adapters["default"].paths)}
    assert got[q0] == (6, 8.0 / 6)
    assert got["bert.encoder.layer.1.attention.self.query"] == (2, 8.0 / 2)
    assert got["bert.encoder.layer.1.attention.self.value"] == (3, 1.5 / 3)
    perturb(dm, 0.05)
    dm.save(tmp_path / "a")
    assert_close(logits(dt.load(make_minilm(), tmp_path / "a"), minilm_batch), logits(dm, minilm_batch))
    with pytest.raises(ValueError, match="dora does not take rank_pattern"):
        dt.inject(make_minilm(), dt.make_config("dora", r=R, targets=["query"], rank_pattern={"query": 2}))
    with pytest.raises(ValueError, match="must be > 0"):
        dt.make_config("lora", rank_pattern={"query": 0})


def test_per_model_parameters_sparsify_each_adapters_delta_with_its_own_density(saved, tmp_path):
    weights, own = [0.6, 0.8], [{"density": 0.1}, {"density": 0.6}]
    a, b = file_deltas(saved / "a"), file_deltas(saved / "b")
    merge_adapters([saved / "a", saved / "b"], weights, "ties", rank=384, out=tmp_path / "out", model_parameters=own)
    stored = file_deltas(tmp_path / "out")
    ties = MERGE_METHODS["ties"]
    for p in a:
        zero = torch.zeros_like(a[p])
        by_hand = [magnitude(a[p], 0.1), magnitude(b.get(p, zero), 0.6)]  # each delta at its own density
        expected = ties.model_copy(update={"sparsify": Sparsify.none}).merge_tensor(zero, by_hand, weights)
        assert_close(stored[p], expected, rtol=1e-4, atol=0, msg=p)
    with pytest.raises(ValueError, match="did you mean 'density'"):
        merge_adapters([saved / "a"], [1.0], "ties", out=tmp_path / "bad", model_parameters=[{"dens": 0.1}])


def test_per_layer_keys_resolve_exactly_when_one_path_ends_another():
    """'a.b' as a key would also match 'x.a.b' (PEFT's and deltatune's suffix rules): such layers get keys too."""
    from peft.utils.other import get_pattern_key

    from deltatune.engine.peft_format import layer_patterns, peft_pattern

    ranks = {"a.b": 2, "x.a.b": 4, "y.x.a.b": 6, "c": 4, "q.c": 3, "d": 4}
    pattern = layer_patterns(ranks, 4)
    assert set(pattern) == {"a.b", "x.a.b", "y.x.a.b", "q.c"}  # x.a.b has the common rank but a.b would claim it
    config = dt.make_config("lora", r=4, rank_pattern=pattern)
    for path, rank in ranks.items():
        assert pattern.get(get_pattern_key(list(pattern), path), 4) == rank, path  # PEFT's own lookup
        assert peft_pattern(pattern, path, 4) == rank, path
        assert config.for_layer(path)[0] == rank, path  # deltatune's LoRA
