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
    with pytest.raises(ValueError, match="does not adapt nn.Embedding"):
        dt.inject(Holder(nn.Embedding(8, 4)), dt.make_config("oft", block_size=2, targets=["layer"]))


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
