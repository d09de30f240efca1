"""Hot-swapping adapters into a torch.compile'd model: the new adapter's outputs, and no recompilation.

A CompileCounter backend counts the graphs dynamo compiles: it stays at one across swaps exactly when
no guard failed (test_the_counter_sees_a_recompile shows that it does count one)."""

import copy

import pytest
import torch
from helpers import assert_close, perturb
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import deltatune as dt

X = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # graphs cached by earlier tests would count against the recompile limit
    yield
    torch._dynamo.reset()


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12)).eval()


BASE = _base()


def adapted(config, seed: int) -> dt.DeltaModel:
    """The shared base with adapter `config` whose weights are drawn from `seed` (as if trained)."""
    dm = dt.inject(copy.deepcopy(BASE), config)
    perturb(dm, std=0.3, seed=seed)
    return dm


def saved(config, seed: int, path, peft: bool = False):
    dm = adapted(config, seed)
    (dm.export_peft if peft else dm.save)(path)
    return path


def fresh_output(path, peft: bool = False) -> torch.Tensor:
    """What a model freshly loaded with the adapter at `path` computes on X."""
    loader = dt.load_peft if peft else dt.load
    with torch.no_grad():
        return loader(copy.deepcopy(BASE), path)(X)


def compiled(dm: dt.DeltaModel) -> tuple[nn.Module, CompileCounter]:
    counter = CompileCounter()
    return torch.compile(dm, backend=counter, fullgraph=True), counter


LORA = dict(targets=["0", "2"])


@pytest.mark.parametrize("peft", [False, True], ids=["native", "peft"])
def test_swapping_an_adapter_of_the_same_shape_gives_its_outputs_without_recompiling(tmp_path, peft):
    dm = adapted(dt.LoRAConfig(r=4, alpha=8, **LORA), seed=1)
    params = {n: p for n, p in dm.named_parameters() if p.requires_grad}
    model, counter = compiled(dm)
    with torch.no_grad():
        first = model(X)
        path = saved(dt.LoRAConfig(r=4, alpha=8, **LORA), seed=2, path=tmp_path / "two", peft=peft)
        dm.hotswap_adapter(path)
        second = model(X)
    expected = fresh_output(path, peft)
    assert_close(second, expected)
    assert (first - expected).abs().max() > 0.1  # the swap changed the outputs, so the check above means something
    assert counter.frame_count == 1
    assert all(p is params[n] for n, p in dm.named_parameters() if p.requires_grad)  # the same tensors, new values


def test_the_counter_sees_a_recompile_from_a_python_float_scale():
    """Why prepare_for_hotswap holds the scale as a tensor: a changed float is a failed guard."""
    dm = adapted(dt.LoRAConfig(r=4, alpha=8, **LORA), seed=1)
    model, counter = compiled(dm)
    with torch.no_grad():
        model(X)
        dm.model[0].deltas["default"].scale = 3.0
        model(X)
    assert counter.frame_count == 2


def test_prepare_pads_to_the_target_rank_without_changing_outputs(tmp_path):
    dm = adapted(dt.LoRAConfig(r=3, alpha=5, **LORA), seed=1)
    with torch.no_grad():
        before = dm(X)
        dm.prepare_for_hotswap(target_rank=8)
        after = dm(X)
    delta = dm.model[0].deltas["default"]
    assert delta.lora_A.shape == (8, 8) and delta.lora_B.shape == (16, 8)
    assert isinstance(delta.scale, torch.Tensor) and float(delta.scale) == pytest.approx(5 / 3)
    assert_close(after, before)  # zero rows of A meet zero columns of B (only the summation order changes)
    dm.save(tmp_path / "padded")  # the record describes the padded tensors, so the save loads back
    assert dm.adapters["default"].config.r == 8
    assert_close(fresh_output(tmp_path / "padded"), before)


@pytest.mark.parametrize("method", [dt.LoRAConfig, dt.DoRAConfig], ids=["lora", "dora"])
def test_prepared_model_swaps_lower_ranks_and_other_alphas_without_recompiling(tmp_path, method):
    dm = adapted(method(r=8, alpha=16, **LORA), seed=1)
    dm.prepare_for_hotswap(target_rank=8)
    model, counter = compiled(dm)
    swaps = [method(r=8, alpha=16, **LORA), method(r=4, alpha=3, **LORA), method(r=2, alpha=32, rslora=True, **LORA)]
    with torch.no_grad():
        model(X)
        for i, config in enumerate(swaps):
            path = saved(config, seed=10 + i, path=tmp_path / str(i))
            dm.hotswap_adapter(path)
            assert_close(model(X), fresh_output(path), msg=f"swap {i}")
    assert counter.frame_count == 1
    dm.save(tmp_path / "again")  # after a swap, too, the adapter's record fits the padded tensors it holds
    dm.export_peft(tmp_path / "again-peft")
    assert_close(fresh_output(tmp_path / "again"), fresh_output(tmp_path / "2"))
    assert_close(fresh_output(tmp_path / "again-peft", peft=True), fresh_output(tmp_path / "2"))


def test_per_layer_ranks_swap_in_and_save_back(tmp_path):
    dm = adapted(dt.LoRAConfig(r=6, **LORA), seed=1)
    dm.prepare_for_hotswap(target_rank=6)
    model, counter = compiled(dm)
    path = saved(dt.LoRAConfig(r=2, alpha=4, rank_pattern={"2": 5}, alpha_pattern={"0": 7.0}, **LORA), 3,
                 tmp_path / "patterned")
    with torch.no_grad():
        model(X)
        dm.hotswap_adapter(path)
        assert_close(model(X), fresh_output(path))
    assert counter.frame_count == 1
    dm.save(tmp_path / "again")
    assert_close(fresh_output(tmp_path / "again"), fresh_output(path))


def test_compiled_training_after_a_swap_matches_a_fresh_model(tmp_path):
    """Forward and backward through the fused LoRA node with a tensor scale (aot_eager traces backward too)."""
    dm = adapted(dt.LoRAConfig(r=4, alpha=8, **LORA), seed=1)
    dm.prepare_for_hotswap(target_rank=4)
    counter = CompileCounterWithBackend("aot_eager")
    model = torch.compile(dm, backend=counter, fullgraph=True)
    model(X).sum().backward()
    path = saved(dt.LoRAConfig(r=2, alpha=6, **LORA), seed=4, path=tmp_path / "two")
    dm.hotswap_adapter(path)
    dm.zero_grad()
    model(X).square().sum().backward()
    fresh = dt.load(copy.deepcopy(BASE), path)
    fresh(X).square().sum().backward()
    A, A_fresh = dm.model[0].deltas["default"].lora_A, fresh.model[0].deltas["default"].lora_A
    assert_close(A.grad[:2], A_fresh.grad)
    assert A.grad[2:].abs().max() == 0  # the padded rows meet zero columns of B: no gradient reaches them
    assert counter.frame_count == 1


def test_a_state_dict_swaps_in_too():
    dm = adapted(dt.LoRAConfig(r=4, **LORA), seed=1)
    other = adapted(dt.LoRAConfig(r=4, **LORA), seed=2)
    dm.hotswap_adapter(other.adapter_state_dict())
    with torch.no_grad():
        assert_close(dm(X), other(X))


# --- refusals: each names what differs and the fix, and changes nothing --------------------------
def _refused(dm: dt.DeltaModel, source, match: str) -> None:
    state = {k: v.clone() for k, v in dm.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=match):
        dm.hotswap_adapter(source)
    assert all(torch.equal(v, state[k]) for k, v in dm.adapter_state_dict().items())


def test_refuses_another_method(tmp_path):
    dm = adapted(dt.LoRAConfig(r=4, **LORA), seed=1)
    _refused(dm, saved(dt.DoRAConfig(r=4, **LORA), 2, tmp_path / "d"), "is a dora adapter but 'default' is lora")


def test_refuses_other_layers(tmp_path):
    dm = adapted(dt.LoRAConfig(r=4, **LORA), seed=1)
    _refused(dm, saved(dt.LoRAConfig(r=4, targets=["0"]), 2, tmp_path / "one"), r"other layers .*it lacks \['2'\]")


def test_refuses_a_rank_above_the_prepared_one(tmp_path):
    dm = adapted(dt.LoRAConfig(r=4, **LORA), seed=1)
    dm.prepare_for_hotswap(target_rank=4)
    _refused(dm, saved(dt.LoRAConfig(r=6, **LORA), 2, tmp_path / "big"), r"holds at most 4: call dm.prepare_for_hotswap\(target_rank=6\)")


def test_unprepared_refuses_another_rank_or_alpha(tmp_path):
    dm = adapted(dt.LoRAConfig(r=4, alpha=8, **LORA), seed=1)
    _refused(dm, saved(dt.LoRAConfig(r=2, alpha=4, **LORA), 2, tmp_path / "r2"),
             r"rank 2 .* holds 4: call dm.prepare_for_hotswap\(target_rank=4\)")
    _refused(dm, saved(dt.LoRAConfig(r=4, alpha=16, **LORA), 3, tmp_path / "a16"),
             r"by 4 \(alpha/r\).* holds 2 as a Python float.*prepare_for_hotswap")


def test_refuses_other_options_and_merged_adapters(tmp_path):
    dm = adapted(dt.LoRAConfig(r=4, **LORA), seed=1)
    _refused(dm, saved(dt.LoRAConfig(r=4, dropout=0.1, **LORA), 2, tmp_path / "drop"),
             r"other options .*dropout=0\.0 here, 0\.1 there")
    dm.merge()
    _refused(dm, saved(dt.LoRAConfig(r=4, **LORA), 3, tmp_path / "same"), r"merged into .*unmerge\(\)")


def test_prepare_refuses_methods_without_rank_and_scale_and_a_lower_target():
    dm = adapted(dt.make_config("ia3", targets=["0", "2"]), seed=1)
    with pytest.raises(ValueError, match=r"'default' is ia3, .*hot-swap ia3 adapters with identical options"):
        dm.prepare_for_hotswap()
    dm = adapted(dt.LoRAConfig(r=4, **LORA), seed=1)
    with pytest.raises(ValueError, match=r"target_rank=2 is below the rank 4 .*use target_rank >= 4"):
        dm.prepare_for_hotswap(target_rank=2)
    delta = dm.model[0].deltas["default"]
    assert delta.lora_A.shape[0] == 4 and isinstance(delta.scale, float)  # nothing was prepared


def test_minilm_hotswap_in_a_compiled_model(make_minilm, minilm_batch, tmp_path):
    """The real path: MiniLM with LoRA on query/value and a fully trained classifier head, compiled; a rank-4
    adapter with another alpha swaps in for the rank-8 one."""
    def trained(r: int, alpha: float, seed: int) -> dt.DeltaModel:
        dm = dt.inject(make_minilm(), dt.LoRAConfig(r=r, alpha=alpha, targets=["query", "value"]),
                       train_modules=["classifier"])
        perturb(dm, std=0.05, seed=seed)
        return dm

    trained(4, 32, seed=2).save(tmp_path / "two")
    dm = trained(8, 16, seed=1)
    dm.prepare_for_hotswap(target_rank=8)
    counter = CompileCounter()
    model = torch.compile(dm, backend=counter, fullgraph=True)
    with torch.no_grad():
        first = model(**minilm_batch).logits
        graphs = counter.frame_count
        dm.hotswap_adapter(tmp_path / "two")
        second = model(**minilm_batch).logits
        expected = dt.load(make_minilm(), tmp_path / "two")(**minilm_batch).logits
    assert_close(second, expected)
    assert (first - expected).abs().max() > 1e-3
    assert counter.frame_count == graphs


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_parts_are_padded_and_swapped(tmp_path):
    """On nn.MultiheadAttention a LoRA adapter is two deltas (in_proj and out_proj): both pad and swap."""
    torch.manual_seed(0)
    base, x = _Attention().eval(), torch.randn(2, 3, 8)

    def made(r: int, alpha: float, seed: int) -> dt.DeltaModel:
        dm = dt.inject(copy.deepcopy(base), dt.LoRAConfig(r=r, alpha=alpha, targets=["attn"]))
        perturb(dm, std=0.3, seed=seed)
        return dm

    made(2, 5, seed=2).save(tmp_path / "two")
    dm = made(4, 8, seed=1)
    with torch.no_grad():
        before = dm(x)
        dm.prepare_for_hotswap(target_rank=6)
        assert_close(dm(x), before)
        model, counter = compiled(dm)
        model(x)
        dm.hotswap_adapter(tmp_path / "two")
        assert_close(model(x), dt.load(copy.deepcopy(base), tmp_path / "two")(x))
    parts = dm.model.attn.deltas["default"]
    assert parts.main.lora_A.shape[0] == parts.parts["out_proj"].lora_A.shape[0] == 6
    assert counter.frame_count == 1
