"""Compacter / Compacter++ (PHM bottleneck adapters) and AdapterDrop, on MiniLM.

The PHM reference is the paper's H = Σ_i kron(A_i, W_i) written with torch.kron; the whole-model reference is
test_activation_adapters.by_hand (the adapted sublayers written from the placement definitions).
"""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import by_hand, fresh, outputs_alone, randomise
from helpers import assert_close
from torch import nn

import deltatune as dt
from deltatune.engine.activation import dropped_below

COMPACTERS = ["compacter", "compacter++"]
PLACEMENT = ("placement", "original_ln_before", "original_ln_after", "residual_before_ln")


def deltas(dm, name):
    return [(p, dm.model.get_submodule(p).deltas[name]) for p in dm.adapters[name].paths]


@pytest.mark.parametrize("method,options", [("compacter", {}), ("compacter++", {}),
                                            ("compacter", {"phm_rank": 2, "phm_dim": 3, "reduction_factor": 16}),
                                            ("compacter", {"factorized_phm_W": False, "phm_bias": False})])
def test_parameter_count_is_the_formula(method, options, minilm):
    path, _ = minilm
    dm = dt.inject(fresh(path), dt.make_config(method, **options), name="c")
    cfg, d = dm.adapters["c"].config, 384
    m, n, k = cfg.bottleneck_size(d), cfg.phm_dim, cfg.phm_rank
    if cfg.factorized_phm_W:  # W_left (n, d_in/n, k) and W_right (n, k, d_out/n) of down (d -> m) and up (m -> d)
        per_layer = k * (d + m) + k * (m + d)
    else:  # W (n, d_in/n, d_out/n) of each
        per_layer = 2 * d * m // n
    per_layer += (d + m) if cfg.phm_bias else 0
    sites = 12 if method == "compacter" else 6
    assert dm.trainable_parameters() == sites * per_layer + n**3  # the rule once per adapter
    rows = [r for r in dm.parameter_table() if r["layer"] == "__shared__"]
    assert [(r["adapter"], r["parameters"]) for r in rows] == [("c", n**3)]


def test_compacter_plus_plus_has_pfeiffer_placement_and_compacter_houlsbys():
    for method, peer in (("compacter", "houlsby"), ("compacter++", "pfeiffer")):
        cfg, ref = dt.make_config(method), dt.make_config(peer)
        assert {f: getattr(cfg, f) for f in PLACEMENT} == {f: getattr(ref, f) for f in PLACEMENT}
        assert type(cfg).default_targets == type(ref).default_targets
        assert (cfg.reduction_factor, cfg.non_linearity, cfg.phm_dim, cfg.phm_rank) == (32, "gelu", 4, 1)


@pytest.mark.parametrize("method", COMPACTERS)
def test_identity_at_init_then_the_definition_on_minilm(method, minilm):
    path, batch = minilm
    base = fresh(path)(**batch).last_hidden_state
    dm = dt.inject(fresh(path), dt.make_config(method), name=method)
    assert torch.equal(dm(**batch).last_hidden_state, base)  # up's W_right = 0: f = 0
    dm(**batch).last_hidden_state.pow(2).sum().backward()  # ... yet W_right trains from step 0
    assert all(delta.up.W_right.grad.abs().sum() > 0 for _, delta in deltas(dm, method))
    randomise(dm)
    out = dm(**batch).last_hidden_state
    assert not torch.allclose(out, base, atol=1e-3)
    assert_close(out, by_hand(fresh(path), dm, method)(**batch).last_hidden_state)


def test_adapterhub_init_starts_near_but_not_at_the_identity(minilm):
    path, batch = minilm
    base = fresh(path)(**batch).last_hidden_state
    dm = dt.inject(fresh(path), dt.make_config("compacter", init="adapterhub"), name="c")
    out = dm(**batch).last_hidden_state
    assert not torch.equal(out, base)
    assert_close(out, base, rtol=1e-3, atol=1e-3)
    rule = dm.shared["c"].phm_rule
    assert 0.3e-4 < rule.std() < 3e-4  # N(0, phm_init_range = 1e-4)
    assert all(d.up.b.abs().sum() == 0 and d.up.W_right.abs().sum() > 0 for _, d in deltas(dm, "c"))


@pytest.mark.parametrize("factorized", [True, False])
def test_phm_layer_is_the_kron_sum(factorized, minilm):
    path, _ = minilm
    dm = dt.inject(fresh(path), dt.make_config("compacter", factorized_phm_W=factorized, phm_rank=2), name="c")
    randomise(dm, std=0.3)
    A = dm.shared["c"].phm_rule  # (n, n, n)
    x = torch.randn(2, 5, 384)
    for _, delta in deltas(dm, "c")[:2]:
        for phm, (d_in, d_out) in ((delta.down, (384, 12)), (delta.up, (12, 384))):
            W = phm.W_left @ phm.W_right if factorized else phm.W  # (n, d_in/n, d_out/n)
            H = sum(torch.kron(A[i], W[i]) for i in range(4))
            assert H.shape == (d_in, d_out)
            z = x if d_in == 384 else x[..., :12]
            assert_close(phm(z), z @ H + phm.b)  # y = x H + b (H is in x out)


def test_the_rule_is_one_tensor_every_layer_uses_and_trains(minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("compacter"), name="c")
    randomise(dm)
    shared = dm.shared["c"]
    assert all(d.down.rule is shared and d.up.rule is shared for _, d in deltas(dm, "c"))
    assert sum(p is shared.phm_rule for p in dm.parameters()) == 1
    outs = {}
    hooks = [dm.model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: outs.__setitem__(p, o))
             for p, _ in deltas(dm, "c")]
    dm(**batch).last_hidden_state.pow(2).sum().backward()
    assert shared.phm_rule.grad is not None and shared.phm_rule.grad.abs().sum() > 0
    before = dict(outs)
    with torch.no_grad():
        shared.phm_rule.mul_(1.5)
    dm(**batch)
    for h in hooks:
        h.remove()
    assert all(not torch.allclose(before[p], outs[p]) for p in before)  # every sublayer reads the rule
    assert len(before) == 12


@pytest.mark.parametrize("learn_phm", [True, False])
def test_save_load_round_trip_keeps_one_rule(learn_phm, minilm, tmp_path):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("compacter++", learn_phm=learn_phm, scaling="learned"), name="c")
    randomise(dm)
    with torch.no_grad():
        dm.shared["c"].phm_rule.normal_(0.0, 0.5)  # a frozen buffer too: its value must survive
    out = dm(**batch).last_hidden_state
    state = dm.adapter_state_dict("c")
    assert [k for k in state if "phm_rule" in k] == ["__shared__.phm_rule"]
    assert dm.shared["c"].phm_rule.requires_grad == learn_phm
    dm.save(tmp_path / "c")
    again = dt.load(fresh(path), tmp_path / "c")
    assert torch.equal(again(**batch).last_hidden_state, out)
    loaded = again.adapter_state_dict("c")
    assert loaded.keys() == state.keys() and all(torch.equal(state[k], loaded[k]) for k in state)


def test_mixed_batch_rows_equal_each_adapter_alone(minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("compacter"), name="a")
    dm.add_adapter("b", dt.make_config("compacter++", phm_dim=2))
    dm.set_active(["a", "b"])
    randomise(dm)
    alone = outputs_alone(dm, ["a", "b"], batch)
    base = alone["__base__"]
    mixed = dm(**batch, adapter_names=["b", "a"]).last_hidden_state
    assert_close(mixed[0], alone["b"][0])
    assert_close(mixed[1], alone["a"][1])
    assert_close(dm(**batch, adapter_names=["__base__", "b"]).last_hidden_state[0], base[0])


def test_bad_options_get_clear_errors(minilm):
    path, _ = minilm
    with pytest.raises(ValueError, match=r"phm_dim=5 must divide both widths of its PHM layer, 384 -> 12 .*"
                                         r"use phm_dim=4, or set bottleneck="):
        dt.inject(fresh(path), dt.make_config("compacter", phm_dim=5))
    with pytest.raises(ValueError, match=r"phm_dim=4 must divide both widths of its PHM layer, 384 -> 6 .*"
                                         r"use phm_dim=3"):
        dt.inject(fresh(path), dt.make_config("compacter++", reduction_factor=64))
    with pytest.raises(ValueError, match="'pooler' holds no integer: exclude it from the targets"):
        dt.inject(fresh(path), dt.make_config("compacter", targets=["pooler"], skip_layers=[1], hidden_size=384))
    with pytest.raises(ValueError, match="unknown option 'phm_dims' for CompacterConfig; did you mean 'phm_dim'"):
        dt.make_config("compacter", phm_dims=4)


# --- AdapterDrop (engine/activation.py, every activation method) ------------------------------------
def sublayer_calls(dm, name, batch):
    """Each adapted sublayer's (args, output) in one forward of the model."""
    seen = {}
    hooks = [dm.model.get_submodule(p).register_forward_hook(
        lambda m, args, out, p=p: seen.__setitem__(p, (args, out))) for p in dm.adapters[name].paths]
    dm(**batch)
    for h in hooks:
        h.remove()
    return seen


def twin(dm, src, name, **drop):
    """Adapter `name`: `src`'s config and tensors plus AdapterDrop options."""
    cfg = dm.adapters[src].config.model_copy(update=drop)
    dm.add_adapter(name, cfg)
    for _, layer in dm.layers():
        layer.deltas[name].load_state_dict(layer.deltas[src].state_dict())
    if src in dm.shared:
        dm.shared[name].load_state_dict(dm.shared[src].state_dict())


def check_drops(dm, batch, dropped_blocks):
    """With 'drop' active: a dropped block's sublayers are the base on their inputs; the others are 'full'."""
    dm.set_active("drop")
    calls = sublayer_calls(dm, "drop", batch)
    for p, (args, out) in calls.items():
        layer = dm.model.get_submodule(p)
        block = int(p.split(".")[2])  # encoder.layer.<i>....
        if block in dropped_blocks:
            assert torch.equal(out, layer.base_layer(*args))
        else:
            dm.set_active("full")
            assert torch.equal(out, layer(*args))
            dm.set_active("drop")
    return calls


@pytest.mark.parametrize("method", ["compacter", "houlsby", "parallel_adapter"])
def test_adapterdrop_skip_layers_run_the_base_there_and_the_rest_unchanged(method, minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config(method), name="full")
    randomise(dm)
    twin(dm, "full", "drop", skip_layers=[0, 2])
    calls = check_drops(dm, batch, {0, 2})
    assert len(calls) == (12 if method in ("compacter", "houlsby") else 6)
    dm.set_active("full")
    full = dm(**batch).last_hidden_state
    dm.set_active("drop")
    assert not torch.allclose(dm(**batch).last_hidden_state, full, atol=1e-4)
    mixed = dm(**batch, adapter_names=["drop", "full"]).last_hidden_state  # the drop also holds in mixed batches
    assert_close(mixed[1], full[1])
    assert_close(mixed[0], dm(**batch).last_hidden_state[0])


def test_adapterdrop_in_training_drops_the_lowest_n_blocks_drawn_per_step(minilm):
    path, batch = minilm
    model = fresh(path)
    for m in model.modules():  # the model's own dropout off, so forwards compare exactly
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    dm = dt.inject(model, dt.make_config("compacter"), name="full")
    randomise(dm)
    twin(dm, "full", "drop", drop_lowest=4, drop_seed=3)
    cfg = dm.adapters["drop"].config
    draws = [dropped_below(cfg, s) for s in range(40)]
    assert set(draws) == set(range(5))  # uniform on 0..drop_lowest
    assert draws == [dropped_below(cfg, s) for s in range(40)]  # a function of the step: resume replays it
    step = next(s for s, n in enumerate(draws) if n == 3)
    dm.model.train()
    dm.on_train_step(step)
    check_drops(dm, batch, {0, 1, 2})
    dm.model.eval()  # inference keeps every block
    assert all(not d.skipped for _, d in deltas(dm, "drop"))
    check_drops(dm, batch, set())
