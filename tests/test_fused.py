"""The engine's fused low-rank paths (engine/fused.py) give the same outputs and gradients as the plain math."""

import peft
import pytest
import torch
from helpers import assert_close, max_diff, perturb
from torch import nn

import deltatune as dt
from deltatune.engine import fused
from deltatune.engine.fused import LowRank, lowrank_linear, mixed_lowrank
from deltatune.methods.lowrank._factored import Factored
from deltatune.methods.lowrank.lora import LoRA


def _reference(x, W, b, terms, masks=None):
    out = nn.functional.linear(x, W, b)
    for i, t in enumerate(terms):
        xd = x if masks is None else x * masks[i] / (1 - t.dropout)
        out = out + t.scale * (xd @ t.A.t()) @ t.B.t()
    return out


def _leaves(*shapes, dtype=torch.float64):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def test_lowrank_linear_matches_the_unfused_math_in_outputs_and_every_gradient():
    x, W, b, A1, B1, A2, B2 = _leaves((3, 5, 12), (7, 12), (7,), (4, 12), (7, 4), (2, 12), (7, 2))
    terms = [LowRank(A1, B1, 0.5), LowRank(A2, B2, 2.0)]
    out = lowrank_linear(x, W, b, terms)
    ref = _reference(x, W, b, terms)
    assert out.shape == (3, 5, 7)
    assert_close(out, ref, rtol=1e-11, atol=1e-12)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, W, b, A1, B1, A2, B2], g)
    theirs = torch.autograd.grad(ref, [x, W, b, A1, B1, A2, B2], g)
    for a, e in zip(ours, theirs):
        assert_close(a, e, rtol=1e-11, atol=1e-12)
    specs = ((0.5, 0.0), (2.0, 0.0))
    assert torch.autograd.gradcheck(lambda *t: fused._LowRankLinear.apply(t[0], t[1], t[2], specs, *t[3:]),
                                    (x, W, b, A1, B1, A2, B2))


def test_no_grad_path_equals_the_autograd_path():
    x = torch.randn(6, 12)
    W, A, B = torch.randn(7, 12), torch.randn(3, 12), torch.randn(7, 3, requires_grad=True)
    with_grad = lowrank_linear(x, W, None, [LowRank(A, B, 0.7)])
    with torch.no_grad():
        assert_close(lowrank_linear(x, W, None, [LowRank(A, B, 0.7)]), with_grad, rtol=1e-5, atol=1e-6)


def test_dropout_mask_is_shared_by_forward_and_backward_and_keeps_one_minus_p():
    x, W, A, B = _leaves((64, 40), (9, 40), (4, 40), (9, 4), dtype=torch.float32)
    p = 0.3
    torch.manual_seed(5)
    out = lowrank_linear(x, W, None, [LowRank(A, B, 1.5, p)])
    torch.manual_seed(5)
    mask = fused._keep_mask(x, p)  # the forward's mask: same generator state, same draw
    ref = _reference(x, W, None, [LowRank(A, B, 1.5, p)], [mask])
    assert_close(out, ref)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, [x, A, B], g), torch.autograd.grad(ref, [x, A, B], g)):
        assert_close(a, e)  # scaled by the gradient's magnitude
    many = fused._keep_mask(torch.empty(200_000), p).float().mean().item()
    assert abs(many - (1 - p)) < 0.005
    assert not torch.equal(fused._keep_mask(x, p), fused._keep_mask(x, p))  # fresh draws each call


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_dropout_saves_a_one_byte_mask_per_adapter_not_a_dropped_copy():
    """Two layers reading one input (query and value): one saved input plus two 1-byte masks."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": nn.Linear(256, 256), "v": nn.Linear(256, 256)})
    dm = dt.inject(model, dt.LoRAConfig(r=4, dropout=0.1, targets=["q", "v"]))
    dm.train()
    x = torch.randn(512, 256, requires_grad=True)
    n = x.numel()
    ours = _saved_bytes(lambda: model["q"](x) + model["v"](x))
    weights = 2 * (256 * 256 + 2 * 4 * 256) * 4
    assert ours <= 4 * n + 2 * n + weights + 2 * 512 * 4 * 4  # x once, two bool masks, W, A, B, thin h
    plain = nn.Dropout(0.1)
    A, B = torch.randn(4, 256, requires_grad=True), torch.randn(256, 4, requires_grad=True)
    unfused = _saved_bytes(lambda: [plain(x) @ A.t() @ B.t() for _ in range(2)])  # PEFT's form, per layer
    assert unfused >= 2 * 5 * n  # a dropped copy (4 bytes) and a mask (1 byte) for each layer


FAST_METHODS = {
    "lora": dt.LoRAConfig(r=4, targets=["query", "value"]),
    "pissa": dt.LoRAConfig(r=4, init="pissa_niter_2", targets=["query", "value"]),
    "nola": dt.get_method("nola").config(targets=["query", "value"]),
    "dylora": dt.get_method("dylora").config(r=4, targets=["query", "value"]),
    "vera": dt.get_method("vera").config(r=32, targets=["query", "value"]),
}


@pytest.mark.parametrize("method", list(FAST_METHODS))
def test_engine_fast_path_equals_the_method_forward_on_minilm(method, make_minilm, minilm_batch, monkeypatch):
    """Logits and every adapter gradient, with two adapters stacked, fused vs each method's own forward."""
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), FAST_METHODS[method])
    dm.add_adapter("second", dt.LoRAConfig(r=2, alpha=4, targets=["value", "key"]))
    dm.set_active(["default", "second"])
    perturb(dm, std=0.02)
    dm.eval()  # the model's own dropout off; gradients still flow

    def run():
        dm.zero_grad()
        logits = dm(**minilm_batch).logits
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in dm.named_parameters() if p.requires_grad}

    calls = []
    real = lowrank_linear
    monkeypatch.setattr("deltatune.engine.layer.lowrank_linear", lambda *a: calls.append(1) or real(*a))
    fast_logits, fast_grads = run()
    assert len(calls) == 12 + 6  # query, value and key of 6 layers all took the fused path
    monkeypatch.setattr(LoRA, "low_rank", lambda self: None)
    monkeypatch.setattr(Factored, "low_rank", lambda self: None)
    for name in ("dylora", "vera"):
        monkeypatch.setattr(dt.get_method(name).delta, "low_rank", lambda self: None)
    slow_logits, slow_grads = run()
    assert_close(fast_logits, slow_logits)
    assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) > 0
    for name, g in fast_grads.items():
        assert max_diff(g, slow_grads[name]) < 1e-5 * max(1.0, slow_grads[name].abs().max().item()), name


def test_sixteen_adapter_mixed_batch_by_batched_matmul_equals_each_row_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8))
    dm = dt.inject(model, dt.LoRAConfig(r=2, targets=["0", "2"]), name="a0")
    names = [f"a{i}" for i in range(16)]
    for i, name in enumerate(names[1:], start=1):
        dm.add_adapter(name, dt.LoRAConfig(r=1 + i % 5, alpha=2.0 + i, targets=["0"] if i % 3 else ["0", "2"]))
    dm.set_active(names)
    perturb(dm, std=0.2)
    rows = names + [dt.BASE, "a3", "a0", dt.BASE]
    x = torch.randn(len(rows), 5, 32)
    with torch.no_grad():
        mixed = dm(x, adapter_names=rows)
        for i, name in enumerate(rows):
            if name == dt.BASE:
                with dm.disabled():
                    alone = dm(x[i:i + 1])
            else:
                dm.set_active(name)
                alone = dm(x[i:i + 1])
            assert_close(mixed[i], alone[0], msg=name)
    # training on a mixed batch: each adapter's gradient is that of its own rows
    dm.set_active(names)
    g = torch.randn_like(mixed)
    (dm(x, adapter_names=rows) * g).sum().backward()
    fast = {n: p.grad.clone() for n, p in dm.named_parameters() if p.requires_grad}
    dm.zero_grad()
    for i, name in enumerate(rows):
        if name != dt.BASE:
            dm.set_active(name)
            (dm(x[i:i + 1]) * g[i:i + 1]).sum().backward()
    for n, p in dm.named_parameters():
        if p.requires_grad:
            assert_close(fast[n], p.grad, msg=n)


def test_mixed_lowrank_pads_ranks_and_leaves_other_rows_alone():
    x, out = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
    t1 = LowRank(torch.randn(2, 6), torch.randn(5, 2), 0.5)
    t2 = LowRank(torch.randn(3, 6), torch.randn(5, 3), 2.0)
    y = mixed_lowrank(x, out.clone(), torch.tensor([1, 2, 0]), [t1, t2])
    assert_close(y[0], out[0] + 2.0 * x[0] @ t2.A.t() @ t2.B.t())
    assert torch.equal(y[1], out[1])
    assert_close(y[2], out[2] + 0.5 * x[2] @ t1.A.t() @ t1.B.t())


def test_dora_training_gradients_equal_peft_dora(tmp_path, make_minilm, minilm_batch):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True)
    pm = peft.get_peft_model(make_minilm(), cfg)
    perturb(pm, 0.02)
    pm.save_pretrained(tmp_path)
    dm = dt.load_peft(make_minilm(), tmp_path)
    pm.eval()
    dm.eval()
    theirs, ours = pm(**minilm_batch), dm(**minilm_batch)
    assert_close(ours.logits, theirs.logits)
    theirs.logits.square().sum().backward()
    ours.logits.square().sum().backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad and "classifier" not in n}
    paths = dm.adapters["default"].paths
    assert len(paths) == 12
    for path, layer in dm.layers():
        if path not in paths:
            continue  # the classifier head, a full copy
        delta = layer.deltas["default"]
        prefix = f"base_model.model.{path}."
        for ours_name, peft_name in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                                     ("lora_magnitude", "lora_magnitude_vector.default.weight")):
            assert_close(getattr(delta, ours_name).grad, peft_grads[prefix + peft_name], msg=str((path, ours_name)))


class _Doubling(nn.Linear):
    """A user subclass with its own forward: the fused paths must not assume x Aᵀ."""

    def forward(self, x):
        return super().forward(2 * x)


def test_custom_linear_forward_keeps_its_own_arithmetic_alone_and_in_mixed_batches():
    from helpers import Holder, assert_rows_match_each_adapter

    torch.manual_seed(0)
    layer = _Doubling(6, 4)
    dm = dt.inject(Holder(layer), dt.LoRAConfig(r=2, targets=["layer"]), name="a")
    dm.add_adapter("b", dt.LoRAConfig(r=3, targets=["layer"]))
    perturb(dm, std=0.3)
    x = torch.randn(5, 6)
    dm.set_active("a")
    d = dm.model.layer.deltas["a"]
    expected = layer(x) + d.scale * (2 * x) @ d.lora_A.t() @ d.lora_B.t()  # the layer's own map, twice x
    assert_close(dm(x), expected)
    dm.set_active(["a", "b"])
    assert_rows_match_each_adapter(dm, x, ["b", "a", dt.BASE, "a", "b"])
