"""Activation deltas (bottleneck adapters) and composition blocks: each method's and each block's definition.

The references are written out by hand from the papers' equations (and AdapterHub's placement options) on
the model's own submodules, independently of the engine's site code.
"""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import adapter_f, by_hand, fresh, outputs_alone, randomise
from helpers import assert_close
from torch import nn
from transformers import AutoTokenizer

import deltatune as dt
from deltatune import assets
from deltatune.engine.composition import (
    ALLOWED_NESTINGS,
    Average,
    BatchSplit,
    Block,
    Fuse,
    Parallel,
    Split,
    Stack,
    parse,
)
from deltatune.engine.registry import list_methods

BOTTLENECKS = ["houlsby", "pfeiffer", "parallel_adapter", "scaled_parallel_adapter"]


@pytest.mark.parametrize("method", BOTTLENECKS)
def test_bottleneck_adapters_on_minilm_match_their_definition(method, minilm):
    path, batch = minilm
    base = fresh(path)(**batch).last_hidden_state
    dm = dt.inject(fresh(path), dt.make_config(method), name=method)
    d, cfg = 384, dm.adapters[method].config
    m = cfg.bottleneck_size(d)
    n_sites = 12 if method == "houlsby" else 6  # Houlsby: after attention and after the FFN of 6 blocks
    assert dm.trainable_parameters() == n_sites * (2 * d * m + d + m)  # P = 2dm + d + m per adapter
    assert torch.equal(dm(**batch).last_hidden_state, base)  # up = 0: the identity at init
    randomise(dm)
    out = dm(**batch).last_hidden_state
    assert not torch.allclose(out, base, atol=1e-3)
    assert_close(out, by_hand(fresh(path), dm, method)(**batch).last_hidden_state)
    with dm.disabled():
        assert torch.equal(dm(**batch).last_hidden_state, base)


def test_gradients_reach_only_the_adapter_and_loss_goes_down_on_real_data(minilm):
    path, batch = minilm
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    dm = dt.inject(model, dt.make_config("houlsby", reduction_factor=8), train_modules=["classifier"])
    rows = assets.rotten_tomatoes()[:16]
    tok = AutoTokenizer.from_pretrained(path)
    b = dict(tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    b["labels"] = torch.tensor([r["label"] for r in rows])
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss = dm(**b).loss
        loss.backward()
        frozen = [n for n, p in dm.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all("deltas.default" in n or "classifier" in n for n, p in dm.named_parameters() if p.requires_grad)


class Block2(nn.Module):
    """A plain module with a tuple output, as decoder layers have (no residual site: the output is adapted)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return torch.tanh(self.fc(x)) * scale, "extra"


def test_serial_and_parallel_sites_on_any_module_change_the_hidden_element_only():
    torch.manual_seed(0)
    model = nn.Sequential(Block2())
    x = torch.randn(3, 5, 8)
    dm = dt.inject(model, dt.make_config("houlsby", bottleneck=2, targets=["0"]), name="serial")
    dm.add_adapter("par", dt.make_config("parallel_adapter", bottleneck=2, targets=["0"]))
    randomise(dm)
    dm.set_active("par")
    randomise(dm, seed=2)
    block = model[0].base_layer
    h = block(x)[0]
    dm.set_active("serial")
    out, extra = model[0](x)
    assert extra == "extra"
    assert_close(out, h + adapter_f(model[0].deltas["serial"], h))  # h + f(h)
    dm.set_active("par")
    assert_close(model[0](x)[0], h + adapter_f(model[0].deltas["par"], x))  # h + s f(x)
    dm.set_active(["serial", "par"])  # a Stack: the parallel adapter's change adds to the serial one's output
    s = h + adapter_f(model[0].deltas["serial"], h)
    assert_close(model[0](x)[0], s + adapter_f(model[0].deltas["par"], x))


def test_mixed_batch_rows_equal_each_adapter_alone_and_token_masks_keep_the_base(minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("houlsby"), name="a")
    dm.add_adapter("b", dt.make_config("pfeiffer"))
    dm.set_active(["a", "b"])
    randomise(dm)
    alone = outputs_alone(dm, ["a", "b"], batch)
    base = alone["__base__"]
    mixed = dm(**batch, adapter_names=["b", "__base__"]).last_hidden_state
    assert_close(mixed[0], alone["b"][0])
    assert_close(mixed[1], base[1])
    mixed = dm(**batch, adapter_names=["a", "b"]).last_hidden_state
    assert_close(mixed[0], alone["a"][0])
    assert_close(mixed[1], alone["b"][1])
    dm.set_active("a")
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # no token adapted: the base everywhere
    assert_close(dm(**batch, token_mask=mask).last_hidden_state, base)


def test_save_load_round_trip_and_merge_refused(minilm, tmp_path):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("pfeiffer", scaling="learned", ln_before=True), name="p")
    randomise(dm)
    out = dm(**batch).last_hidden_state
    dm.save(tmp_path / "p")
    again = dt.load(fresh(path), tmp_path / "p")
    assert torch.equal(again(**batch).last_hidden_state, out)
    saved, loaded = dm.adapter_state_dict("p"), again.adapter_state_dict("p")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(ValueError, match="changes activations and cannot be merged"):
        dm.merge()


def test_compiled_model_with_residual_site_adapters_has_no_graph_break(minilm):
    from torch._dynamo.testing import CompileCounter

    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("pfeiffer"), name="a")
    dm.add_adapter("b", dt.make_config("houlsby"))
    randomise(dm)
    dm.set_active(Average("a", "b"))
    eager = dm(**batch).last_hidden_state
    counter = CompileCounter()
    compiled = torch.compile(dm.model, backend=counter, fullgraph=True)
    assert_close(compiled(**batch).last_hidden_state, eager)
    compiled(**batch)
    assert counter.frame_count == 1


def test_generate_with_kv_cache_equals_greedy_without_cache():
    from transformers import AutoModelForCausalLM

    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    dm = dt.inject(model, dt.make_config("houlsby", reduction_factor=32, targets="re:model\\.layers\\.[0-3]\\.(self_attn|mlp)"))
    randomise(dm, std=0.02)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    cached = dm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    seq = ids
    for _ in range(6):  # greedy, each step recomputing the whole sequence without a cache
        nxt = dm(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


# --- composition blocks: definitions on one adapted layer -----------------------------------------
def one_layer(method, names, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    dm = None
    for i, n in enumerate(names):
        config = dt.make_config(method, targets=["0"], **options)
        dm = dt.inject(model, config, name=n) if dm is None else dm
        if i:
            dm.add_adapter(n, config)
        dm.set_active(n)
        randomise(dm, seed=i + 1)
    return dm, model


@pytest.mark.parametrize("method,options", [("houlsby", {"bottleneck": 3}), ("lora", {"r": 2})])
def test_blocks_follow_their_definitions(method, options):
    dm, model = one_layer(method, ["a", "b", "c"], **options)
    x = torch.randn(4, 5, 6)

    def run(setup):
        dm.set_active(setup)
        return dm(x)

    base = model[0].base_layer(x)
    A, B, C = run("a"), run("b"), run("c")
    if method == "lora":  # weight deltas: a Stack sums the changes, an Average averages the outputs
        assert_close(run(Stack("a", "b")), A + B - base)
    else:  # serial adapters: b reads a's output
        ha = A
        assert_close(run(Stack("a", "b")), ha + adapter_f(model[0].deltas["b"], ha))
    assert_close(run(Average("a", "b", weights=[1, 3])), 0.25 * A + 0.75 * B)
    assert_close(run(Parallel("a", "b")), torch.cat([A, B]))
    assert_close(run(BatchSplit("a", "b", batch_sizes=[1, 3])), torch.cat([A[:1], B[1:]]))
    assert_close(run(Split("a", "b", splits=[2, 3])), torch.cat([A[:, :2], B[:, 2:]], dim=1))
    if method == "lora":  # nested: the average of a and b, then c's change on top
        assert_close(run(Stack(Average("a", "b"), "c")), 0.5 * (A + B) + (C - base))


def test_fuse_is_attention_over_the_adapters_changes(minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("pfeiffer"), name="a")
    dm.add_adapter("b", dt.make_config("pfeiffer"))
    dm.set_active(["a", "b"])
    randomise(dm)
    fusion = dm.add_fusion("a", "b")
    assert fusion.name == "a,b"
    dm.set_active(Fuse("a", "b"))
    randomise(dm, std=0.02, seed=3)  # only the fusion trains now
    trainable = {n.split(".deltas.")[1].split(".")[0] for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable == {"a,b"}
    layer = dm.model.encoder.layer[0].output
    fu, da, db = layer.deltas["a,b"], layer.deltas["a"], layer.deltas["b"]
    seen = {}
    layer.base_layer.dropout.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    layer.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("r", a[1]))
    out = {}
    layer.register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
    dm(**batch)
    h, r, N = seen["h"], seen["r"], layer.base_layer.LayerNorm
    q = N(h + r)  # Pfeiffer reads N(h + r); its residual is h
    ups = torch.stack([adapter_f(da, q), adapter_f(db, q)], dim=-2)  # (b, t, 2, d)
    scores = torch.einsum("btd,btnd->btn", fu.query(q), fu.key(ups))
    fused = torch.einsum("btn,btnd->btd", scores.softmax(-1), fu.value(ups)) + h
    assert_close(out["y"], N(fused + r))
    assert dm.regularization_loss() > 0  # 0.01 ‖I - V‖² once V has moved


def test_nesting_table_and_dict_round_trip():
    setup = Stack("a", Fuse("b", Stack("c", "d")), Average("e", "f", weights=[2, 6]))
    assert Block.from_dict(setup.to_dict()) == setup
    assert setup.names() == ["a", "b", "c", "d", "e", "f"]
    assert Block.from_dict(Split("a", "b", splits=[3, 4]).to_dict()).splits == [3, 4]
    for parent, allowed in ALLOWED_NESTINGS.items():
        for child in (Fuse("x", "y"), Split("x", "y", splits=1), Parallel("x", "y"), Average("x", "y")):
            kwargs = {"splits": 1} if parent is Split else {"batch_sizes": 1} if parent is BatchSplit else {}
            if type(child) in allowed:
                parse(parent("z", child, **kwargs))
            else:
                with pytest.raises(ValueError, match=f"cannot nest {type(child).__name__} inside {parent.__name__}"):
                    parse(parent("z", child, **kwargs))


def test_bad_setups_and_options_get_clear_errors(minilm):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("pfeiffer"), name="a")
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        dm.set_active(Stack("a", "b"))
    dm.add_adapter("b", dt.make_config("pfeiffer"))
    with pytest.raises(ValueError, match=r"needs the fusion adapter 'a,b': dm.add_fusion\('a', 'b'\)"):
        dm.set_active(Fuse("a", "b"))
    with pytest.raises(ValueError, match="splits 3 tokens but this layer's input has"):
        dm.set_active(Split("a", "b", splits=[1, 2]))
        dm(**batch)
    with pytest.raises(ValueError, match="unknown option 'reduction' for PfeifferConfig; did you mean 'reduction_factor'"):
        dt.make_config("pfeiffer", reduction=8)
    with pytest.raises(ValueError, match=r"site branch='drop' is no submodule of BertSelfOutput \(children: dense, LayerNorm, dropout\)"):
        dm.add_adapter("c", dt.make_config("houlsby", site={"branch": "drop", "norm": "LayerNorm", "residual": 0}))
    dm.add_adapter("h", dt.make_config("houlsby"))  # also on the attention outputs: no common modules
    with pytest.raises(ValueError, match="a fusion needs its adapters at the same modules"):
        dm.add_fusion("a", "h")
    with pytest.raises(ValueError, match="Average has 2 children but 3 weights"):
        Average("a", "b", weights=[1, 2, 3])


def test_every_adapters_family_method_is_covered_here():
    covered = set(BOTTLENECKS) | {"adapter_fusion"}
    elsewhere = {"compacter", "compacter++", "mam_adapter"}  # tests/test_compacter.py, tests/test_mam.py
    assert {s.name for s in list_methods() if s.family == "adapters"} <= covered | elsewhere


def test_an_adapter_set_saves_and_loads_with_its_fuse_setup(minilm, tmp_path):
    path, batch = minilm
    dm = dt.inject(fresh(path), dt.make_config("pfeiffer"), name="a")
    dm.add_adapter("b", dt.make_config("pfeiffer", reduction_factor=8))
    dm.add_fusion("a", "b")
    dm.set_active(Fuse("a", "b"))
    dm.set_active(["a", "b", "a,b"])
    randomise(dm)
    dm.set_active(Fuse("a", "b"))
    out = dm(**batch).last_hidden_state
    dm.save_adapters(tmp_path / "set")
    again = dt.load_adapters(fresh(path), tmp_path / "set")
    assert again.setup == Fuse("a", "b")
    assert torch.equal(again(**batch).last_hidden_state, out)


def test_deleting_adapters_keeps_or_drops_the_setup_as_it_uses_them():
    dm, model = one_layer("houlsby", ["a", "b", "c"], bottleneck=2)
    dm.set_active(Average("a", "b"))
    dm.delete_adapter("c")  # not in the setup: the setup stays
    assert dm.setup == Average("a", "b")
    with pytest.warns(UserWarning, match="deleted adapter 'b' of the active setup"):
        dm.delete_adapter("b")
    assert dm.setup is None and dm.active == ("a",)
