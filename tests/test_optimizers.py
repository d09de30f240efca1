"""Memory-lean optimizers: GaLore (against the official galore_torch, and by its defining properties), MeZO
(seeded SPSA: exact on a quadratic, parameters restored, forward passes only), LoRA-FA (A frozen, x not kept),
transformers' Adafactor; each resumes exactly through the trainer's checkpoints, and the recipe checks their keys."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file
from test_training import TINY, metric_rows, run_recipe
from torch import nn

import deltatune as dt
from deltatune.training import checkpoint
from deltatune.training.galore import GaLoreAdamW, projection
from deltatune.training.loop import Trainer
from deltatune.training.mezo import MeZO
from deltatune.training.optimizers import freeze_lora_a, moment_tensors
from deltatune.training.recipe import load_recipe, validate


def params_and_grads(seed: int = 0) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    """A wide and a tall matrix (projected at rank 4), a thin one and a bias (plain Adam), and 7 steps of gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 20), (20, 12), (3, 20), (20,)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(7)]
    return params, grads


def run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    trace = []
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
        trace.append([p.detach().clone() for p in params])
    return trace


# --- GaLore --------------------------------------------------------------------------------------
def test_galore_matches_the_official_galore_torch_step_for_step():
    import galore_torch  # a dev dependency (pyproject), installed beside the pinned CPU torch
    ours_p, grads = params_and_grads()
    theirs_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    options = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
    ours = GaLoreAdamW(ours_p, rank=4, update_proj_gap=3, scale=0.25, **options)
    theirs = galore_torch.GaLoreAdamW(
        [{"params": theirs_p[:2], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"},
         {"params": theirs_p[2:]}], no_deprecation_warning=True, **options)
    for step, (a, b) in enumerate(zip(run(ours, ours_p, grads), run(theirs, theirs_p, grads))):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"step {step}, parameter {i}")


def test_galore_state_is_low_rank_and_the_update_stays_in_the_gradients_top_subspace():
    params, grads = params_and_grads()
    opt = GaLoreAdamW(params, lr=1e-2, rank=4, update_proj_gap=3, scale=0.25)
    before = [p.detach().clone() for p in params]
    run(opt, params, grads[:1])
    wide, tall, thin, bias = (opt.state[p] for p in params)
    assert wide["galore_exp_avg"].shape == (4, 20) and wide["galore_projection"].shape == (12, 4)  # U_r, left
    assert tall["galore_exp_avg"].shape == (20, 4) and tall["galore_projection"].shape == (4, 12)  # V_r^T, right
    assert thin["exp_avg"].shape == (3, 20) and bias["exp_avg"].shape == (20,)  # min(m, n) <= r: plain Adam
    U = torch.linalg.svd(grads[0][0]).U[:, :4]
    delta = params[0].detach() - before[0]
    assert_close(delta - U @ (U.t() @ delta), torch.zeros_like(delta), atol=1e-6)  # ΔW in span(U_r)
    assert delta.abs().max() > 1e-4


def test_galore_recomputes_the_projection_every_T_steps_only():
    params, grads = params_and_grads()
    opt = GaLoreAdamW(params, lr=1e-2, rank=4, update_proj_gap=3)
    seen = []
    for step in range(7):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        seen.append(opt.state[params[0]]["galore_projection"].clone())
        expected = projection(grads[step - step % 3][0], 4)  # the gradient of the step that refreshed it
        assert_close(seen[-1], expected, msg=f"step {step}")
    assert not torch.equal(seen[2], seen[3])


def test_galore_resumes_from_its_state_dict_exactly():
    params, grads = params_and_grads()
    whole = run(GaLoreAdamW(params, lr=1e-2, rank=4, update_proj_gap=3), params, grads)[-1]
    params, grads = params_and_grads()
    opt = GaLoreAdamW(params, lr=1e-2, rank=4, update_proj_gap=3)
    run(opt, params, grads[:4])
    saved, values = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    fresh = [nn.Parameter(v) for v in values]
    resumed = GaLoreAdamW(fresh, lr=1e-2, rank=4, update_proj_gap=3)
    resumed.load_state_dict(saved)
    for x, y in zip(run(resumed, fresh, grads[4:])[-1], whole):
        assert torch.equal(x, y)


# --- MeZO ----------------------------------------------------------------------------------------
def quadratic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A, b = M @ M.t() + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x, y = (nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64)) for n in (4, 2))

    def loss() -> torch.Tensor:
        theta = torch.cat([x, y])
        return 0.5 * theta @ A @ theta + b @ theta

    return [x, y], loss, (lambda: A @ torch.cat([x, y]).detach() + b)


def test_mezo_estimate_is_the_directional_derivative_on_a_quadratic():
    params, loss, grad = quadratic()
    opt = MeZO(params, lr=1e-2, eps=1e-3, seed=3)
    z = torch.cat([z for _, _, z in opt._z(opt.current_seed())])  # the z it will draw, redrawn from the seed
    assert z.abs().min() > 0
    g_hat, _, _ = opt.estimate(loss)
    # central differences are exact on a quadratic: (L(θ+εz) - L(θ-εz)) / 2ε = ∇L(θ)·z
    assert_close(torch.tensor(g_hat, dtype=torch.float64), grad() @ z, rtol=1e-6, atol=1e-9)


def test_mezo_step_is_theta_minus_lr_g_z_and_restores_the_parameters_after_its_probes():
    params, loss, grad = quadratic()
    start = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-2, eps=1e-3, seed=3)
    z = [z.clone() for _, _, z in opt._z(opt.current_seed())]
    seen = []

    def probe() -> torch.Tensor:
        seen.append([p.detach().clone() for p in params])
        assert not torch.is_grad_enabled()  # forward passes only
        return loss()

    g_hat, _, _ = opt.estimate(probe)
    for p, p0 in zip(params, start):  # restored up to one rounding of θ + εz
        assert_close(p.detach(), p0, rtol=1e-12, atol=1e-15)
    assert len(seen) == 2
    for i, (zi, p0) in enumerate(zip(z, start)):  # the probes were θ + εz and θ - εz
        assert_close(seen[0][i], p0 + 1e-3 * zi, rtol=1e-12)
        assert_close(seen[1][i], p0 - 1e-3 * zi, rtol=1e-12)
    opt.step(loss)
    for p, p0, zi in zip(params, start, z):
        assert_close(p.detach(), p0 - 1e-2 * g_hat * zi, rtol=1e-10, atol=1e-12)
        assert p.grad is None
    assert opt.param_groups[0]["mezo_step"] == 1


def test_mezo_draws_are_a_function_of_the_seed_and_step_and_leave_the_global_rng_alone():
    def trained(seed: int) -> list[torch.Tensor]:
        params, loss, _ = quadratic()
        opt = MeZO(params, lr=1e-2, seed=seed)
        for _ in range(3):
            opt.step(loss)
        return [p.detach() for p in params]

    rng = torch.get_rng_state()
    a, b, c = trained(0), trained(0), trained(1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.slow  # 150 steps of two MiniLM forwards: ~1-3 min
def test_mezo_lowers_the_loss_of_a_real_model_with_forward_passes_only(tmp_path, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("MeZO's trainer step ran a backward pass")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    trainer = run_recipe(["data.max_train=16", "data.max_eval=16", "train.batch_size=16", "train.max_length=24",
                          "train.steps=150", "optimizer.name=mezo", "optimizer.lr=2e-3", "schedule.warmup_ratio=0",
                          "method.r=2", f"train.output_dir={tmp_path}"])
    from deltatune.training.loop import to_device
    batch = to_device(trainer.task.collate(trainer.train_set), trainer.device)

    def loss() -> float:
        trainer.model.eval()
        with torch.no_grad():
            return trainer.model(**batch).loss.item()

    before = loss()
    trainer.train()
    assert loss() < before - 0.02, (before, loss())
    assert all(p.grad is None for p in trainer.model.parameters())


# --- LoRA-FA -------------------------------------------------------------------------------------
def test_lora_fa_trains_b_only_and_the_fused_path_keeps_no_layer_input_for_a():
    torch.manual_seed(0)
    model = dt.inject(nn.Sequential(nn.Linear(64, 64)), dt.make_config("lora", r=2, targets=["0"]))
    A, B = (p for n, p in model.named_parameters() if "lora_" in n)
    trainable = model.trainable_parameters()
    assert freeze_lora_a(model) == 1 and not A.requires_grad and B.requires_grad
    assert model.trainable_parameters() == trainable - A.numel()

    def saved_shapes(x: torch.Tensor) -> list[tuple[int, ...]]:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            model(x).sum().backward()
        return shapes

    x = torch.randn(32, 64)
    assert (32, 64) not in saved_shapes(x)  # only the thin h = x Aᵀ (32 x 2) for B's gradient
    A.requires_grad_(True)
    assert (32, 64) in saved_shapes(x)  # plain LoRA keeps x for A's gradient


def test_lora_fa_keeps_a_at_its_init_through_training(tmp_path):
    trainer = run_recipe([*TINY, "optimizer.name=lora_fa", f"train.output_dir={tmp_path}"])
    start = {k: v.clone() for k, v in trainer.model.adapter_state_dict().items()}
    trainer.train()
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    a_keys = [k for k in saved if "lora_A" in k]
    assert a_keys and all(torch.equal(saved[k], start[k]) for k in a_keys)
    assert all(not torch.equal(saved[k], start[k]) for k in saved if "lora_B" in k)


def test_lora_fa_without_lora_matrices_names_the_fix():
    model = dt.inject(nn.Sequential(nn.Linear(8, 8)), dt.make_config("ia3", targets=["0"]))
    with pytest.raises(ValueError, match="no trainable 'lora_A' parameters: use a LoRA-family method"):
        freeze_lora_a(model)


# --- every optimizer through the trainer: exact resume --------------------------------------------
class Killed(Exception):
    pass


RESUMABLE = {
    "galore": ["optimizer.name=galore", "optimizer.galore={rank: 4, update_proj_gap: 2}"],  # LoRA's 8 x 384 projected
    # full fine-tuning of MiniLM's query matrices (384 x 384, projected at r=16), GaLore's own use
    "galore_full": ["method={name: full, targets: [query]}", "optimizer.name=galore",
                    "optimizer.galore={rank: 16, update_proj_gap: 2}", "optimizer.lr=1e-4"],
    "mezo": ["optimizer.name=mezo", "optimizer.lr=1e-3"],
    "adafactor": ["optimizer.name=adafactor", "optimizer.adafactor={beta1: 0.9}"],
    "lora_fa": ["optimizer.name=lora_fa"],
}


@pytest.mark.parametrize("name", [n if n == "galore" else pytest.param(n, marks=pytest.mark.slow) for n in RESUMABLE])
def test_a_killed_run_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch):
    recipe = [*(t for t in TINY if "method.dropout" not in t or name != "galore_full"), *RESUMABLE[name]]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_recipe([*recipe, f"train.output_dir={whole}"]).train()
    original = Trainer.train_step

    def killed_in_step_6(self):
        if self.step == 5:
            raise Killed
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed_in_step_6)
    with pytest.raises(Killed):
        run_recipe([*recipe, f"train.output_dir={parts}"]).train()
    monkeypatch.undo()
    ckpt = checkpoint.load_checkpoint(parts / "checkpoints" / "ckpt-3")
    names = {n for moments in ckpt.torch_state["optimizer"]["state"].values() for n, _, _ in moment_tensors(moments)}
    expected = {"galore": "galore_projection", "galore_full": "galore_projection", "adafactor": "exp_avg_sq_row", "lora_fa": "exp_avg"}.get(name)
    assert expected is None or expected in names, names
    resumed = run_recipe([*recipe, f"train.output_dir={parts}"], resume=True)
    assert resumed.step == 3
    resumed.train()
    assert metric_rows(parts) == metric_rows(whole)
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(parts / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- recipe keys ---------------------------------------------------------------------------------
def test_recipe_options_reach_the_optimizers():
    r = load_recipe(None, ["optimizer.name=galore", "optimizer.galore.rank=16", "optimizer.galore.scale=0.5"])
    assert r.optimizer.extra_options() == {"rank": 16, "update_proj_gap": 200, "scale": 0.5}
    assert load_recipe(None, ["optimizer.name=mezo"]).optimizer.extra_options() == {"eps": 1e-3}
    assert load_recipe(None, ["optimizer.name=adamw"]).optimizer.extra_options() == {}
    again = load_recipe(None, ["optimizer.name=adafactor", "optimizer.adafactor.clip_threshold=2"])
    assert validate(again.model_dump(mode="json")) == again  # the resolved recipe (null sections included) reloads


@pytest.mark.parametrize("override,message", [
    (["optimizer.name=galore", "optimizer.galore.rnak=4"], "unknown key 'optimizer.galore.rnak'; did you mean 'optimizer.galore.rank'?"),
    (["optimizer.name=galore", "optimizer.galore.rank=0"], "'optimizer.galore.rank'"),
    (["optimizer.name=mezo", "optimizer.mezo.eps=-1"], "'optimizer.mezo.eps'"),
    (["optimizer.galore.rank=4"], "optimizer.galore holds the options of optimizer.name=galore, and this recipe has "
     "optimizer.name=adamw: set optimizer.name=galore, or remove optimizer.galore"),
    (["optimizer.name=galor"], "did you mean 'galore'?"),
])
def test_bad_optimizer_options_are_refused_with_the_fix(override, message):
    with pytest.raises(ValueError) as e:
        load_recipe(None, override)
    assert message in str(e.value)
