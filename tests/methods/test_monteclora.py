"""MonteCLoRA: count, eval = plain LoRA, training noise, merge, save/load, and parity with HF peft's variant
(eval forward, training forward and gradients for the same draws, and the variational loss)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import Holder, assert_close, max_diff, perturb
from torch import nn

import deltatune as dt
import deltatune.methods.lowrank.monteclora  # noqa: F401
from deltatune.methods.lowrank.monteclora import MonteCLoRAConfig

R, ALPHA, N = 3, 6.0, 8


def make(kind="linear"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "conv2d":
        return nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 5, 5, generator=g)
    return nn.Linear(12, 10), torch.randn(4, 12, generator=g)


def inject(layer, **kw):
    return dt.inject(Holder(layer), MonteCLoRAConfig(r=R, alpha=ALPHA, targets=["layer"], **kw))


def delta(dm, path="layer", name="default"):
    return dm.model.get_submodule(path).deltas[name]


def lora_reference(layer, d, x):
    """W0 x + s B A x through the layer's own op: what eval and merge must give."""
    w = layer.weight + (d.scale * d.lora_B @ d.lora_A).reshape(layer.weight.shape)
    return torch.func.functional_call(layer, {"weight": w}, (x,))


@pytest.mark.parametrize("kind,d_in,d_out", [("linear", 12, 10), ("conv2d", 27, 6)])
def test_parameter_count_and_init(kind, d_in, d_out):
    layer, x = make(kind)
    base = layer(x).detach()
    dm = inject(layer)
    P = R * (d_in + d_out) + R + N
    assert dm.trainable_parameters() == P
    spec = dt.get_method("monteclora")
    assert eval(spec.formula, {}, {"r": R, "d_in": d_in, "d_out": d_out, "num_samples": N}) == P
    assert spec.family == "low-rank"
    assert max_diff(dm(x), base) == 0  # eval, B = 0
    dm.train()
    assert max_diff(dm(x), base) == 0  # the noise is on A only, so B = 0 still gives the base


def test_training_noise_is_stochastic_and_eval_is_plain_lora():
    layer, x = make()
    dm = inject(layer, sample_scaler=0.05)
    perturb(dm, std=0.3)
    d = delta(dm)
    ref = lora_reference(layer, d, x).detach()
    dm.eval()
    assert_close(dm(x), ref, rtol=1e-5, atol=1e-6)
    assert max_diff(dm(x), dm(x)) == 0
    dm.train()
    y1, y2 = dm(x), dm(x)
    assert max_diff(y1, y2) > 1e-4 and max_diff(y1, ref) > 1e-4
    with torch.no_grad():  # zero-mean noise: the average training output is the eval (mean) output
        mean = torch.stack([dm(x) for _ in range(200)]).mean(0)
    assert max_diff(mean, ref) < 0.1 < max_diff(y1, ref) * 2
    dm.eval()
    assert_close(dm(x), ref, rtol=1e-5, atol=1e-6)  # no noise left behind in A
    dm0 = inject(make()[0], sample_scaler=0.0)
    perturb(dm0, std=0.3)
    dm0.train()
    assert_close(dm0(x), lora_reference(layer, delta(dm0), x), rtol=1e-5, atol=1e-6)  # c = 0: plain LoRA in training too


def test_gradients_only_to_method_params():
    layer, x = make()
    dm = inject(layer, sample_scaler=0.1)
    perturb(dm, std=0.3)
    d = delta(dm)
    dm.train()
    dm(x).square().sum().backward()  # task loss alone: sigma and phi learn through the reparameterised noise
    for p in (d.lora_A, d.lora_B, d.std_prior, d.expert_weights_prior):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.weight.grad is None and layer.bias.grad is None


def test_merge_unmerge_and_save_load(tmp_path):
    layer, x = make()
    w0 = layer.weight.detach().clone()
    dm = inject(layer)
    perturb(dm, std=0.3)
    dm.eval()
    y = dm(x).detach()
    dm.merge()
    assert_close(layer(x), y)
    dm.unmerge()
    assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)
    dm.save(tmp_path)
    fresh, _ = make()
    loaded = dt.load(Holder(fresh), tmp_path).eval()
    assert max_diff(loaded(x), y) == 0
    for name in ("std_prior", "expert_weights_prior"):
        assert torch.equal(getattr(delta(loaded), name), getattr(delta(dm), name))


def test_regularizer_finite_differentiable_and_eval_free():
    layer, x = make()
    dm = inject(layer, use_entropy=True)
    d = delta(dm)
    dm.train()
    dm(x)
    reg = dm.regularization_loss()
    assert torch.isfinite(reg) and reg.requires_grad
    reg.backward()
    assert d.std_prior.grad.abs().sum() > 0 and d.expert_weights_prior.grad.abs().sum() > 0
    dm.eval()
    assert dm.regularization_loss().item() == 0  # PEFT's loss is 0 in eval


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def twins(**mc):
    """The same base model, one with deltatune MonteCLoRA, one with PEFT's, sharing every adapter tensor."""
    torch.manual_seed(0)
    base = Two()
    dm = dt.inject(copy.deepcopy(base), MonteCLoRAConfig(r=R, alpha=ALPHA, targets=["a", "b"], **mc))
    perturb(dm, std=0.3)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["a", "b"],
                                                   monteclora_config=peft.MontecloraConfig(**mc)))
    with torch.no_grad():
        for p in ("a", "b"):
            d, m = delta(dm, p), pm.base_model.model.get_submodule(p)
            m.lora_A["default"].weight.copy_(d.lora_A)
            m.lora_B["default"].weight.copy_(d.lora_B)
            sampler = m.lora_monteclora_sampler["default"]
            sampler.std_prior.copy_(d.std_prior)
            sampler.expert_weights_prior.copy_(d.expert_weights_prior)
    return dm, pm


def test_peft_parity_eval_training_and_loss():
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    dm, pm = twins(use_entropy=True, sample_scaler=0.05)
    dm.eval(), pm.eval()
    assert_close(dm(x), pm(x), rtol=1e-5, atol=1e-6)  # (a) eval: plain LoRA in both
    dm.train(), pm.train()
    # initial state (no draw yet): PEFT's buffers are I and 1/N, ours the same defaults
    assert_close(dm.regularization_loss(), pm.base_model._get_monteclora_loss(), rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    for p in ("a", "b"):  # the same standard draws into both samplers
        m = pm.base_model.model.get_submodule(p)
        d_in = m.in_features
        L = torch.randn(R, R, generator=g).tril()
        S = L @ L.t()  # a Wishart-like draw (PEFT reads only its diagonal)
        z, Z = torch.randn(N, generator=g), torch.randn(N, d_in, R, generator=g)  # PEFT's Z is (N, d_in, r)
        delta(dm, p).draws = lambda S=S, z=z, Z=Z: (S.diagonal(), z, Z.transpose(1, 2))
        m.lora_monteclora_sampler["default"].sampler.get = lambda S=S, z=z, Z=Z: {"z_mvn": Z, "z_wishart": S,
                                                                                  "z_dirichlet": z}
    y_dt, y_pm = dm(x), pm(x)
    assert_close(y_dt, y_pm, rtol=1e-5, atol=1e-6)
    reg_dt, reg_pm = dm.regularization_loss(), pm.base_model._get_monteclora_loss()
    assert_close(reg_dt, reg_pm, rtol=1e-5, atol=1e-6)  # (b) the same variational loss, averaged over layers
    (y_dt.square().sum() + reg_dt).backward()
    (y_pm.square().sum() + reg_pm).backward()
    for p in ("a", "b"):
        d, m = delta(dm, p), pm.base_model.model.get_submodule(p)
        s = m.lora_monteclora_sampler["default"]
        for ours, theirs in ((d.lora_A, m.lora_A["default"].weight), (d.lora_B, m.lora_B["default"].weight),
                             (d.std_prior, s.std_prior), (d.expert_weights_prior, s.expert_weights_prior)):
            assert max_diff(ours.grad, theirs.grad) < 1e-5 * (1 + theirs.grad.abs().max().item())
    dm.eval()
    assert max_diff(y_dt, dm(x)) > 1e-4  # the training forward really was perturbed


def test_grouped_conv_is_lora_in_eval_and_noisy_in_training():
    conv, x = nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.randn(2, 4, 5, 5)
    dm = dt.inject(Holder(conv), MonteCLoRAConfig(r=4, alpha=ALPHA, sample_scaler=0.5, targets=["layer"]))
    perturb(dm, 0.3)
    twin = dt.inject(Holder(copy.deepcopy(conv)), dt.LoRAConfig(r=4, alpha=ALPHA, targets=["layer"]))
    twin.load_adapter_state_dict({k: v for k, v in dm.adapter_state_dict().items() if "prior" not in k})
    dm.eval()
    assert_close(dm(x), twin(x))
    dm.train()
    y = dm(x)
    assert max_diff(y, twin(x)) > 1e-4
    y.square().sum().backward()
    assert delta(dm).std_prior.grad.abs().sum() > 0


def test_peft_files_both_ways(tmp_path):
    """PEFT-saved MonteCLoRA loads here with its options and tensors, ours loads in PEFT, in eval and training."""
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    mc = {"num_samples": 5, "sample_scaler": 0.05, "kl_loss_weight": 1e-3, "dirichlet_prior": 0.3, "use_entropy": True}
    torch.manual_seed(0)
    pm = peft.get_peft_model(Two(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["a", "b"],
                                                    monteclora_config=peft.MontecloraConfig(**mc)))
    perturb(pm, 0.3)  # A, B, sigma and phi all move
    pm.eval()
    theirs = pm(x).detach()
    pm.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    dm = dt.load_peft(Two(), tmp_path / "peft")
    cfg = dm.adapters["default"].config
    assert dm.adapters["default"].method == "monteclora"
    assert {k: getattr(cfg, k) for k in mc} == mc and (cfg.r, cfg.alpha) == (R, ALPHA)
    for p in ("a", "b"):
        d, s = delta(dm, p), pm.base_model.model.get_submodule(p).lora_monteclora_sampler["default"]
        assert torch.equal(d.std_prior, s.std_prior) and torch.equal(d.expert_weights_prior, s.expert_weights_prior)
    dm.eval()
    assert_close(dm(x), theirs)
    dm.train(), pm.train()  # the variational loss before any draw: the same from the same parameters
    assert_close(dm.regularization_loss(), pm.base_model._get_monteclora_loss())
    dm.export_peft(tmp_path / "again")
    torch.manual_seed(0)
    again = peft.PeftModel.from_pretrained(Two(), tmp_path / "again", is_trainable=True)
    assert again.peft_config["default"].monteclora_config.num_samples == 5
    again.eval()
    assert_close(again(x), theirs)
    again.train()
    assert_close(again.base_model._get_monteclora_loss(), pm.base_model._get_monteclora_loss())
    torch.manual_seed(0)
    assert_close(dt.load_peft(Two(), tmp_path / "again").eval()(x), theirs)


def test_peft_export_refuses_what_peft_lacks(tmp_path):
    dm = inject(make("conv2d")[0])
    with pytest.raises(ValueError, match="MonteCLoRA adapts linear layers.*Conv2d \\('layer'\\).*DeltaModel.save"):
        dm.export_peft(tmp_path)
    dm = inject(make()[0], init="pissa")
    with pytest.raises(ValueError, match="PiSSA init cannot be exported"):
        dm.export_peft(tmp_path)


def test_bad_options():
    with pytest.raises(ValueError, match="num_samples"):
        MonteCLoRAConfig(num_samples=0)
    with pytest.raises(ValueError, match="dirichlet_prior"):
        MonteCLoRAConfig(dirichlet_prior=0)
    with pytest.raises(ValueError, match="sample_scaler"):
        MonteCLoRAConfig(sample_scaler=-1e-4)
    with pytest.warns(UserWarning, match="rank r=20 is larger"):  # allowed, as PEFT: the math stays valid
        dm = dt.inject(Holder(nn.Linear(12, 10)), MonteCLoRAConfig(r=20, targets=["layer"]))
    dm.train()
    dm(torch.randn(2, 12)).sum().backward()
    assert delta(dm).std_prior.grad.shape == (20,)


def test_minilm_trains(make_minilm, minilm_batch):
    torch.manual_seed(0)
    dm = dt.inject(make_minilm(), MonteCLoRAConfig(r=4, targets=["query", "value"]), train_modules=["classifier"])
    assert dm.trainable_parameters() == 12 * (4 * (384 + 384) + 4 + 8) + 770
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=3e-3)
    labels = torch.tensor([1, 0, 1, 1])
    dm.train()
    losses = []
    for _ in range(5):
        loss = dm(**minilm_batch, labels=labels).loss + dm.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
