"""OFT and BOFT: parameter count, identity at init, orthogonality, merge/unmerge, save/load, mixed batches,
PEFT round trips and parity with the installed peft package (same parameters -> same outputs)."""

from __future__ import annotations

import peft
import pytest
import torch
from helpers import (
    Holder,
    assert_close,
    assert_round_trip,
    assert_rows_match_each_adapter,
    max_diff,
    perturb,
    train_losses,
)
from torch import nn

import deltatune as dt
import deltatune.methods.multiplicative.boft as boft_mod  # noqa: F401
import deltatune.methods.multiplicative.oft  # noqa: F401

CASES = {"oft": ("oft", {"block_size": 4}), "oft_r": ("oft", {"block_size": 0, "r": 2}),
         "oft_share": ("oft", {"block_size": 4, "block_share": True}),
         "oft_neumann": ("oft", {"block_size": 4, "neumann_terms": 5}),
         "boft": ("boft", {"block_size": 2, "n_butterfly_factor": 1}),
         "boft_m3": ("boft", {"block_size": 2, "n_butterfly_factor": 3})}


def make_layer(kind: str):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(16, 10), torch.randn(4, 16, generator=g)
    return nn.Conv2d(4, 6, 2, padding=1), torch.randn(2, 4, 5, 5, generator=g)  # d_in = 16


def inject(layer, case, **extra):
    method, opts = CASES[case]
    return dt.inject(Holder(layer), dt.make_config(method, targets=["layer"], **{**opts, **extra}))


def expected_count(case, d_out, d_in):
    method, o = CASES[case]
    if method == "oft":
        s = o["block_size"] or d_in // o["r"]
        return s * (s - 1) // 2 if o.get("block_share") else d_in * (s - 1) // 2
    return o["n_butterfly_factor"] * d_in * o["block_size"] + d_out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_count_init_grad_merge_orthogonality(case, kind):
    layer, x = make_layer(kind)
    W0, base = layer.weight.detach().clone(), layer(x).detach()
    dm = inject(layer, case)
    n = expected_count(case, 10 if kind == "linear" else 6, 16)
    assert dm.trainable_parameters() == n
    method, o = CASES[case]
    if not o.get("block_share"):
        formula = dt.get_method(method).formula
        b = o.get("block_size") or 16 // o["r"]
        assert eval(formula, {}, {"d_in": 16, "d_out": 10 if kind == "linear" else 6, "b": b,
                                  "m": o.get("n_butterfly_factor", 1)}) == n
    assert_close(dm(x), base, rtol=1e-5, atol=1e-6)  # R = I at init
    perturb(dm)
    delta = dm.model.layer.deltas["default"]
    M, _ = delta.matrices()
    tol = 2e-2 if "neumann" in case else 1e-5  # the truncated series is only approximately orthogonal
    assert max_diff(M.t() @ M, torch.eye(16)) < tol
    assert max_diff(dm(x), base) > 1e-3
    dm(x).square().sum().backward()
    assert layer.weight.grad is None and all(p.grad is not None for p in delta.parameters())
    y = dm(x).detach()
    # the unmerged forward equals the base layer with W0 M (and BOFT's row scale)
    W = delta.rotated_weight(dm.model.layer)
    ref = torch.func.functional_call(layer, {"weight": W.reshape(layer.weight.shape), "bias": layer.bias}, (x,))
    assert_close(y, ref)
    dm.merge()
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.weight, W0, rtol=1e-5, atol=1e-6)


def test_cayley_matches_the_paper_formula():
    """exact mode: R = (I - Q)(I + Q)^-1 with Q skew -> R orthogonal, det 1."""
    from deltatune.methods.multiplicative._orthogonal import cayley, skew

    Q = skew(torch.randn(3, 6, dtype=torch.float64), 4)
    assert torch.allclose(Q, -Q.transpose(1, 2))
    eye = torch.eye(4, dtype=torch.float64)
    R = cayley(Q)
    assert torch.allclose(R, (eye - Q) @ torch.linalg.inv(eye + Q))
    assert torch.allclose(R.transpose(1, 2) @ R, eye.expand(3, 4, 4)) and torch.allclose(torch.linalg.det(R), torch.ones(3, dtype=torch.float64))


def test_coft_keeps_q_in_the_eps_ball():
    layer, x = make_layer("linear")
    dm = inject(layer, "oft", coft=True, eps=1e-2)
    perturb(dm, std=1.0)
    dm(x)
    from deltatune.methods.multiplicative._orthogonal import skew
    delta = dm.model.layer.deltas["default"]
    assert torch.linalg.matrix_norm(skew(delta.oft_R, 4)).max() <= 1e-2 / 2 + 1e-7  # eps / sqrt(4 blocks)


def test_coft_with_block_share_projects_onto_eps():
    """One shared block: the radius is eps itself (PEFT divides by the stored block count, 1), not eps/sqrt(n)."""
    from deltatune.methods.multiplicative._orthogonal import skew

    layer, x = make_layer("linear")
    dm = inject(layer, "oft", coft=True, eps=1e-2, block_share=True)
    perturb(dm, std=1.0)
    dm(x)
    norm = torch.linalg.matrix_norm(skew(dm.model.layer.deltas["default"].oft_R, 4))
    assert_close(norm, torch.full_like(norm, 1e-2), rtol=1e-5, atol=0)  # projected onto the sphere of radius eps


def test_save_load_and_mixed_batch(tmp_path):
    layer, x = make_layer("linear")
    dm = inject(layer, "oft")
    dm.add_adapter("b", dt.make_config("boft", block_size=2, n_butterfly_factor=2, targets=["layer"]))
    perturb(dm)
    dm.set_active("b")
    perturb(dm, seed=7)
    assert_rows_match_each_adapter(dm, x, ["default", "b", dt.BASE, "b"], atol=1e-5)
    assert_round_trip(dm, Holder(make_layer("linear")[0]), x, tmp_path, name="b", atol=1e-6)


def test_bad_options():
    with pytest.raises(ValueError, match="d_in=16 does not split into blocks of size 5"):
        inject(nn.Linear(16, 4), "oft", block_size=5)
    with pytest.raises(ValueError, match="exactly one of block_size"):
        dt.inject(Holder(nn.Linear(16, 4)), dt.make_config("oft", r=4, targets=["layer"]))
    with pytest.raises(ValueError, match="n_butterfly_factor=5 needs"):
        inject(nn.Linear(16, 4), "boft", n_butterfly_factor=5)
    with pytest.raises(ValueError, match="boft does not adapt nn.Embedding"):
        dt.inject(Holder(nn.Embedding(8, 4)), dt.make_config("boft", block_size=2, targets=["layer"]))
    with pytest.raises(ValueError, match="embedding_dim=6 does not split into blocks of size 4"):
        dt.inject(Holder(nn.Embedding(16, 6)), dt.make_config("oft", block_size=4, targets=["layer"]))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(12, 8, padding_idx=0), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.emb(ids))


IDS = torch.tensor([[1, 5, 0, 11], [3, 3, 7, 2]])


def test_oft_on_embedding_rotates_output_features():
    net = EmbedNet()
    E0, base = net.emb.weight.detach().clone(), net(IDS).detach()
    dm = dt.inject(net, dt.make_config("oft", block_size=4, targets=["emb"]))
    assert dm.trainable_parameters() == 2 * 4 * 3 // 2  # 2 blocks over embedding_dim 8, s(s-1)/2 each
    assert_close(dm(IDS), base, rtol=0, atol=0)  # R = I at init
    perturb(dm, std=0.3)
    delta = dm.model.emb.deltas["default"]
    G = torch.block_diag(*delta.blocks())
    assert_close(dm.model.emb(IDS), E0[IDS] @ G)  # each embedding row rotated, block by block
    assert_close(G.t() @ G, torch.eye(8))
    y = dm(IDS).detach()
    dm.merge()
    assert_close(net.emb.base_layer.weight, E0 @ G)
    assert_close(dm(IDS), y)
    dm.unmerge()
    assert_close(net.emb.base_layer.weight, E0, rtol=0, atol=1e-6)
    dm.add_adapter("b", dt.make_config("oft", block_size=2, targets=["emb"]))
    dm.set_active("b")
    perturb(dm, seed=9)
    assert_rows_match_each_adapter(dm, IDS, ["b", "default"], atol=1e-5)


@pytest.mark.parametrize("neumann", [0, 5])
def test_oft_embedding_peft_parity_both_ways(neumann, tmp_path):
    theirs = {"oft_block_size": 4, "use_cayley_neumann": neumann > 0}
    pm = peft.get_peft_model(EmbedNet(), peft.OFTConfig(target_modules=["emb"], **theirs)).eval()
    perturb(pm, std=0.3)
    expected = pm(IDS).detach()
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(EmbedNet(), tmp_path / "peft")
    assert dm.adapters["default"].config == dt.make_config("oft", block_size=4, neumann_terms=neumann, targets=["emb"])
    assert_close(dm(IDS), expected)  # PEFT file -> deltatune
    dm.merge()
    pm.merge_adapter()
    assert_close(dm.model.emb.base_layer.weight, pm.base_model.model.emb.base_layer.weight)
    dm.unmerge()
    dm.export_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(EmbedNet(), tmp_path / "ours").eval()
    assert_close(back(IDS), expected)  # deltatune file -> PEFT


# --- PEFT -------------------------------------------------------------------------------------------


class FakeFBD:
    """PEFT's BOFT needs a CUDA extension for n_butterfly_factor > 1 (else it silently uses 1); this is the
    same block-diagonal assembly in torch, so PEFT's own butterfly code runs on CPU."""

    @staticmethod
    def apply(R):  # (m, n, b, b) -> (m, n b, n b)
        return torch.stack([torch.block_diag(*r) for r in R])


PEFT_CASES = {"oft": ("oft", {"block_size": 4}, {"oft_block_size": 4, "use_cayley_neumann": False}),
              "oft_neumann": ("oft", {"block_size": 4, "neumann_terms": 5}, {"oft_block_size": 4}),
              "oft_r_share": ("oft", {"block_size": 0, "r": 2, "block_share": True},
                              {"r": 2, "oft_block_size": 0, "block_share": True, "use_cayley_neumann": False}),
              # COFT's radius: eps / sqrt(stored blocks), i.e. eps itself when the blocks share one (regression)
              "oft_coft": ("oft", {"block_size": 4, "coft": True, "eps": 0.05},
                           {"oft_block_size": 4, "coft": True, "eps": 0.05, "use_cayley_neumann": False}),
              "oft_coft_share": ("oft", {"block_size": 4, "coft": True, "eps": 0.05, "block_share": True},
                                 {"oft_block_size": 4, "coft": True, "eps": 0.05, "block_share": True,
                                  "use_cayley_neumann": False}),
              "boft": ("boft", {"block_size": 2, "n_butterfly_factor": 1}, {"boft_block_size": 2}),
              "boft_m3": ("boft", {"block_size": 2, "n_butterfly_factor": 3},
                          {"boft_block_size": 2, "boft_n_butterfly_factor": 3})}


@pytest.fixture
def cpu_butterfly(monkeypatch):
    import peft.tuners.boft.layer as peft_boft

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(peft_boft, "FastBlockDiag", FakeFBD)


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_parity_both_ways(case, tmp_path, cpu_butterfly):
    method, ours, theirs = PEFT_CASES[case]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    peft_cfg = (peft.OFTConfig if method == "oft" else peft.BOFTConfig)(target_modules=["a", "b"], **theirs)
    pm = peft.get_peft_model(Two(), peft_cfg).eval()
    perturb(pm, std=0.3)  # non-trivial rotations (and BOFT scales)
    expected = pm(x).detach()
    pm.save_pretrained(tmp_path / "peft")
    dm = dt.load_peft(Two(), tmp_path / "peft")
    assert dm.adapters["default"].config == dt.make_config(method, targets=["a", "b"], **ours)
    assert_close(dm(x), expected)  # PEFT file -> deltatune: same outputs
    dm.merge()
    assert_close(dm(x), expected)
    pm.merge_adapter()
    assert_close(pm(x), expected)  # and both merges agree
    assert_close(dm.model.a.base_layer.weight, pm.base_model.model.a.base_layer.weight)
    dm.unmerge()
    dm.export_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(Two(), tmp_path / "ours").eval()
    assert_close(back(x), expected)  # deltatune -> PEFT file: same outputs


@pytest.mark.parametrize("m", [1, 3])
def test_boft_conv2d_peft_parity_both_ways(m, tmp_path, cpu_butterfly):
    """Regression: PEFT keeps a Conv2d's boft_s as (1, d_out); the export wrote (d_out, 1) and PEFT refused it."""
    layer, x = make_layer("conv2d")  # Conv2d(4, 6, 2): d_in = 16 = 8 blocks of 2
    dm = dt.inject(Holder(layer), dt.make_config("boft", block_size=2, n_butterfly_factor=m, targets=["layer"]))
    perturb(dm, std=0.3)
    expected = dm(x).detach()
    dm.export_peft(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(Holder(make_layer("conv2d")[0]), tmp_path / "ours").eval()
    assert pm.base_model.model.layer.boft_s["default"].shape == (1, 6)
    assert_close(pm(x), expected)  # deltatune file -> PEFT: same outputs
    perturb(pm, std=0.3, seed=5)
    theirs = pm(x).detach()
    pm.save_pretrained(tmp_path / "peft")
    back = dt.load_peft(Holder(make_layer("conv2d")[0]), tmp_path / "peft")
    assert_close(back(x), theirs)  # PEFT file -> deltatune: same outputs
    back.merge()
    assert_close(back(x), theirs)


def test_boft_export_refuses_layers_peft_lacks(tmp_path):
    for layer in (nn.Conv1d(4, 6, 2), nn.Conv2d(4, 6, (2, 1))):
        dm = dt.inject(Holder(layer), dt.make_config("boft", block_size=2, targets=["layer"]))
        with pytest.raises(ValueError, match="PEFT's boft cannot hold 'layer'"):
            dm.export_peft(tmp_path)


def test_butterfly_permutation_equals_peft():
    import peft.tuners.boft.layer as peft_boft

    layer = peft_boft.Linear(nn.Linear(32, 4), "x", peft.BOFTConfig(boft_block_size=4))
    for k in range(3):
        ref = layer.block_butterfly_perm(32, 8 // 2 ** k, 2, 2)
        assert torch.equal(boft_mod.butterfly_perm(32, 8 // 2 ** k, 2), ref)


def test_oft_minilm_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), dt.make_config("oft", block_size=32, targets=["query", "value"]),
                   train_modules=["classifier"])
    assert dm.trainable_parameters() == 6 * 2 * 384 * 31 // 2 + 770  # 6 layers x (q, v) x d_in(b-1)/2 + head
    losses = train_losses(dm, minilm_batch, lr=3e-3, labels=torch.tensor([1, 0, 1, 1]))
    assert losses[-1] < losses[0]


# --- several unmerged adapters active on one layer ----------------------------------------------------------

STACK = {"oft": ("oft", {"block_size": 4}), "oft2": ("oft", {"block_size": 2}),
         "boft": ("boft", {"block_size": 2, "n_butterfly_factor": 2}), "lora": ("lora", {"r": 2}),
         "ia3": ("ia3", {}), "ia3_ff": ("ia3", {"feedforward": ["layer"]})}


def stacked(kind, names, seed=0):
    layer, x = make_layer(kind)
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    dm = dt.DeltaModel(Holder(layer))
    for i, key in enumerate(names):
        method, opts = STACK[key]
        dm.add_adapter(f"a{i}", dt.make_config(method, targets=["layer"], **opts))
        dm.set_active(f"a{i}")
        perturb(dm, std=0.3, seed=seed + i)
    dm.set_active([f"a{i}" for i in range(len(names))])
    return dm, x, W0, b0


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("names", [["oft", "oft2"], ["oft", "boft"], ["boft", "oft"], ["boft", "boft"],
                                   ["lora", "oft"], ["oft", "lora"], ["lora", "boft", "oft"], ["ia3", "boft"],
                                   ["ia3_ff", "oft"], ["oft", "ia3_ff", "boft"], ["boft", "ia3"]])
def test_stacked_unmerged_equals_merging_in_turn(kind, names):
    """Active [a, b, ...] unmerged = W0 with a, then b, ... merged: y = N_b N_a W0 M_a M_b x (+ the bias so far)."""
    dm, x, W0, b0 = stacked(kind, names)
    y = dm(x).detach()
    layer = dm.model.layer
    W, b = layer.matrix().detach().clone(), layer.base_layer.bias.detach().clone()
    for n in dm.active:  # the composed map by hand: each delta merged onto the matrix so far
        d = layer.deltas[n]
        if d.method == "lora":
            W = W + d.delta_weight(layer)
        else:
            if d.method == "ia3" and not d.feedforward:
                b = b * d.ia3_l
            W = d.fold(layer, W)
    ref = torch.func.functional_call(layer.base_layer, {"weight": W.reshape(W0.shape), "bias": b}, (x,))
    assert_close(y, ref)
    dm.merge()
    assert layer.merged == tuple(dm.active)
    assert_close(dm(x), y)
    dm.unmerge()
    assert_close(layer.base_layer.weight, W0, rtol=1e-5, atol=1e-6)
    assert_close(layer.base_layer.bias, b0, rtol=0, atol=0)
    dm.train()
    dm(x).square().sum().backward()  # both adapters train together
    assert all(p.grad is not None for n in dm.active for p in layer.deltas[n].parameters())


def test_stacked_order_matters_and_mixed_batch_stays_per_adapter():
    dm, x, _, _ = stacked("linear", ["oft", "oft2"])
    ab = dm(x).detach()
    dm.set_active(["a1", "a0"])
    ba = dm(x).detach()
    assert max_diff(ba, ab) > 1e-3  # rotations do not commute: the order is the merge order
    assert_rows_match_each_adapter(dm, x, ["a0", "a1", dt.BASE, "a0"], atol=1e-5)  # rows see one adapter each
    dm.set_active(["a0", "a1"])
    dm.merge("a1")  # a merged adapter is part of the base, so the unmerged a0 applies on top: order [a1, a0]
    assert_close(dm(x), ba)


def test_oft_embedding_stack_equals_merge():
    net = EmbedNet()
    dm = dt.inject(net, dt.make_config("oft", block_size=4, targets=["emb"]))
    dm.add_adapter("b", dt.make_config("lora", r=2, targets=["emb"]))
    dm.add_adapter("c", dt.make_config("oft", block_size=2, targets=["emb"]))
    for n in ("default", "b", "c"):
        dm.set_active(n)
        perturb(dm, std=0.3)
    dm.set_active(["default", "b", "c"])
    y = dm(IDS).detach()
    dm.merge()
    assert_close(dm(IDS), y)


def test_stacking_with_a_non_composing_delta_is_refused():
    layer, x = make_layer("linear")
    dm = dt.inject(Holder(layer), dt.make_config("oft", block_size=4, targets=["layer"]))
    dm.add_adapter("dora", dt.make_config("dora", r=2, targets=["layer"]))
    dm.set_active(["default", "dora"])
    with pytest.raises(RuntimeError, match="cannot stack unmerged adapters"):
        dm(x)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_two_active_adapters_match_peft(method, tmp_path, cpu_butterfly):
    """PEFT's merge of [p, q] and its BOFT forward apply p then q as here; its OFT forward rotates x by p first
    (x G_p G_q: W0 M_q M_p), the reverse of its own merge, which equals deltatune's active [q, p]."""
    cls, opts = (peft.OFTConfig, {"oft_block_size": 4, "use_cayley_neumann": False}) if method == "oft" else \
        (peft.BOFTConfig, {"boft_block_size": 2, "boft_n_butterfly_factor": 2})
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    pm = peft.get_peft_model(Two(), cls(target_modules=["a", "b"], **opts), adapter_name="p").eval()
    pm.add_adapter("q", cls(target_modules=["a", "b"], **opts))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "oft_R" in name or "boft_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    # one folder per adapter, tmp_path/p and tmp_path/q (names unlike the layers': PEFT strips ".<name>" from keys)
    pm.save_pretrained(tmp_path)
    pm.base_model.set_adapter(["p", "q"])
    theirs = pm(x).detach()
    dm = dt.load_peft(Two(), tmp_path / "p", name="p")
    dm.load_peft(tmp_path / "q", name="q")
    dm.set_active(["q", "p"] if method == "oft" else ["p", "q"])
    assert_close(dm(x), theirs)
    dm.set_active(["p", "q"])
    pm.merge_adapter(["p", "q"])
    dm.merge()
    assert_close(dm.model.a.base_layer.weight, pm.base_model.model.a.base_layer.weight)
    assert_close(dm(x), pm(x))
