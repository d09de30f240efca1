"""Selection deltas (engine/selection.py): chosen entries of existing parameters, ΔW = M ⊙ V.

One table gives each selection method its config and its trainable-parameter formula over the parameters it
selects; on a small model with every kind of parameter owner (Linear, LayerNorm, Embedding, Conv2d and a Linear
subclass with its own forward) each method is checked for: the count, output at init, the definition written by
hand (the model run with p + scatter(index, values)), gradients only in the values, merge == unmerged and a
bit-exact unmerge, a save/load round trip, mixed batches, stacking with LoRA, and a bf16 base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import assert_close, assert_round_trip, assert_rows_match_each_adapter, perturb
from torch import nn
from torch.func import functional_call

import deltatune as dt
from deltatune.engine.registry import list_methods
from deltatune.engine.selection import SelectionDelta, resolve_parameters


class Scaled(nn.Linear):
    """A Linear subclass with its own forward: the engine must not assume x Wᵀ + b."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class Owners(nn.Module):
    """Ids -> Embedding -> Linear -> LayerNorm -> Scaled -> Conv2d over (tokens, 1): every kind of owner."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.up = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.custom = Scaled(16, 8)
        self.conv = nn.Conv2d(8, 6, (3, 1), padding=(1, 0))
        self.to(dtype)

    def forward(self, ids):
        h = self.custom(self.norm(torch.tanh(self.up(self.emb(ids)))))  # (b, t, 8)
        return self.conv(h.transpose(1, 2)[..., None]).squeeze(-1)  # (b, 6, t)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(seed))


Params = dict[str, torch.Size]  # selected parameter name -> its shape


@dataclass(frozen=True)
class Case:
    options: dict[str, Any]
    count: Callable[[Params, Any], int]  # trainable parameters from the selected parameters' shapes
    targets: Any = ("*.weight", "*.bias")
    rests: bool = False  # some selected parameters get no gradient this step (HFT's frozen half)


def ceil_density(params: Params, c: Any) -> int:
    return sum(max(1, math.ceil(c.density * s.numel())) for s in params.values())


def owners_fisher() -> dict[str, torch.Tensor]:
    """Fisher scores of every Owners parameter on two batches (its output as 6-way logits per token)."""
    labels = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(5))
    return dt.fisher_scores(Owners(), [ids(1), ids(2)], ["*.weight", "*.bias"],
                            loss=lambda m, x: nn.functional.cross_entropy(m(x), labels))


CASES: dict[str, Case] = {
    "bitfit": Case({}, lambda ps, c: sum(s.numel() for s in ps.values()), targets=None),
    "random_sparse": Case({"density": 0.2}, ceil_density),
    "ln_tuning": Case({}, lambda ps, c: sum(s.numel() for s in ps.values()), targets=None),  # the LayerNorm
    "trainable_tokens": Case({"token_indices": [7, 2, 11]}, lambda ps, c: len(c.token_indices) * ps["emb.weight"][1],
                             targets=("emb.weight",)),
    "diff_pruning": Case({"l0_lambda": 1e-3}, lambda ps, c: 2 * sum(s.numel() for s in ps.values())),  # w, log α
    "fish_mask": Case({"density": 0.2, "scores": owners_fisher()},
                      lambda ps, c: math.ceil(c.density * sum(s.numel() for s in ps.values()))),
    "sara": Case({"density": 0.2, "nuclear_lambda": 1e-2, "reselect_every": 5}, ceil_density),
    "shira": Case({"r": 1}, lambda ps, c: sum(c.r * (s[0] + s[1]) for s in ps.values()), targets=("up", "custom")),
    "paca": Case({"r": 3}, lambda ps, c: sum(c.r * s[0] for s in ps.values()), targets=("up", "custom")),
    "spiel": Case({"density": 0.2}, ceil_density),
    "hft": Case({"round_steps": 2}, lambda ps, c: sum(s.numel() for s in ps.values()), rests=True),
}
METHODS = [s.name for s in list_methods() if s.family == "selective" and s.name != "full"]


def test_the_table_covers_every_selection_method():
    assert sorted(CASES) == sorted(METHODS)


def build(method: str, dtype=torch.float32, **extra):
    case = CASES[method]
    targets = None if case.targets is None else list(case.targets)
    config = dt.get_method(method).config(**({} if targets is None else {"targets": targets}), **case.options,
                                          **extra)
    return Owners(dtype), config


def selected(dm, name: str = "default") -> dict[str, tuple[SelectionDelta, str]]:
    """Full parameter name -> (delta, its name in the module) for every parameter the adapter updates."""
    out = {}
    for path, layer in dm.layers():
        delta = layer.deltas[name] if name in layer.deltas else None
        if isinstance(delta, SelectionDelta):
            out.update({f"{path}.{n}": (delta, n) for n in delta.names})
    return out


def by_hand(dm, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """The definition: the original model (Owners is seeded) run with p + scatter(index, values) per parameter."""
    plain = Owners()
    own = dict(plain.named_parameters())
    changed = {}
    for full, (delta, n) in selected(dm, name).items():
        p, idx, v = own[full], delta.index(n), delta.value(n).detach()
        update = v.reshape(p.shape) if idx is None else torch.zeros(p.numel()).index_put((idx,), v).reshape(p.shape)
        changed[full] = p.detach() + update
    return functional_call(plain, changed, (x,))


@pytest.mark.parametrize("method", METHODS)
def test_count_init_definition_gradients_merge_and_round_trip(method, tmp_path):
    model, config = build(method)
    x = ids()
    with torch.no_grad():
        base = model(x)
    dm = dt.inject(model, config)
    sel = selected(dm)
    shapes = {f: dict(dm.named_parameters())[f"model.{f.rsplit('.', 1)[0]}.base_layer.{n}"].shape
              for f, (d, n) in sel.items()}
    assert dm.trainable_parameters() == CASES[method].count(shapes, config)
    dm.eval()
    with torch.no_grad():
        assert torch.equal(dm(x), base)

    perturb(dm, std=0.1)
    with torch.no_grad():
        out = dm(x)
    assert_close(out, by_hand(dm, x))
    assert not torch.equal(out, base)

    dm.train()
    dm.on_train_step(0)
    (dm(x).square().mean() + dm.regularization_loss()).backward()
    for n, p in dm.named_parameters():
        if ".deltas." in n:  # (a data-chosen selection may give a parameter no entries: nothing to check)
            if CASES[method].rests and p.grad is None:
                continue
            assert p.requires_grad and p.grad is not None and (p.grad.abs().sum() > 0 or not p.numel()), n
        else:
            assert not p.requires_grad and p.grad is None, n
    dm.zero_grad()
    dm.eval()

    assert_round_trip(dm, Owners().eval(), x, tmp_path / "adapter")

    w0 = {n: p.clone() for n, p in model.named_parameters() if ".deltas." not in n}
    dm.merge()
    with torch.no_grad():
        assert_close(dm(x), out, msg="merged")
    dm.unmerge()
    for n, p in model.named_parameters():
        if ".deltas." not in n:
            assert torch.equal(p, w0[n]), f"unmerge changed {n}"


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_rows_equal_each_adapter_alone(method):
    model, config = build(method)
    dm = dt.inject(model, config, name="a")
    other = {"seed": 1} if "seed" in type(config).model_fields else {}
    dm.add_adapter("b", config.model_copy(update=other))  # a copy keeps options that are never saved (scores)
    perturb(dm, std=0.1)
    dm.eval()
    x = ids()
    with torch.no_grad():
        scale = dm(x).abs().max().item()
    assert_rows_match_each_adapter(dm, x, ["a", dt.BASE, "b", "a"], atol=1e-5 + 1e-4 * scale, rows_alone=True)


@pytest.mark.parametrize("method", METHODS)
def test_on_a_bf16_base_values_stay_fp32_and_start_at_base(method):
    model, config = build(method, dtype=torch.bfloat16)
    x = ids()
    with torch.no_grad():
        base = model(x)
    dm = dt.inject(model, config).eval()
    trainable = [p for p in dm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    with torch.no_grad():
        assert torch.equal(dm(x), base)
        perturb(dm, std=0.02)
        unmerged = dm(x)
        dm.merge()
        assert_close(dm(x), unmerged, rtol=2e-2)


# --- the engine, on BitFit and random subsets --------------------------------------------------
def test_parameter_targets_by_glob_regex_name_module_type_and_predicate():
    model = Owners()
    assert resolve_parameters(model, ["*.bias"]) == {p: ["bias"] for p in ["up", "norm", "custom", "conv"]}
    assert resolve_parameters(model, "re:norm\\.(weight|bias)") == {"norm": ["weight", "bias"]}
    assert resolve_parameters(model, ["up.weight", "bias"], exclude=["conv"]) == {
        "up": ["weight", "bias"], "norm": ["bias"], "custom": ["bias"]}
    assert resolve_parameters(model, [nn.LayerNorm]) == {"norm": ["weight", "bias"]}
    assert resolve_parameters(model, ["emb"]) == {"emb": ["weight"]}
    assert resolve_parameters(model, lambda name, p: p.dim() == 4) == {"conv": ["weight"]}


def test_a_target_that_matches_nothing_names_close_parameters():
    with pytest.raises(ValueError, match=r"'norm\.wieght' matches no parameter.*did you mean 'norm\.weight'"):
        resolve_parameters(Owners(), ["norm.wieght"])
    with pytest.raises(ValueError, match="leave no parameter"):
        resolve_parameters(Owners(), ["*.bias"], exclude=["*.bias"])


def test_bitfit_updates_only_biases_and_the_optimizer_sees_d_out_per_layer():
    dm = dt.inject(Owners(), dt.make_config("bitfit"))
    names = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert names == {f"model.{m}.deltas.default.values.bias" for m in ["up", "norm", "custom", "conv"]}
    assert dm.trainable_parameters() == 16 + 16 + 8 + 6


def test_sparse_paths_equal_the_dense_update_and_never_form_it_on_linear_and_embedding():
    model = Owners()
    dm = dt.inject(model, dt.make_config("random_sparse", density=0.1, targets=["up.weight", "emb.weight"]))
    perturb(dm, std=0.5)
    x = ids()
    for path in ["up", "emb"]:
        layer = dict(dm.layers())[path]
        delta = layer.deltas["default"]
        h = dm.model.emb.base_layer(x) if path == "up" else x
        sparse = delta.change(layer, h)
        dense = layer.apply_matrix(h, delta.delta_weight(layer))
        assert_close(sparse, dense)
    with torch.no_grad():
        assert_close(dm(x), by_hand(dm, x))


def test_a_selection_stacks_with_lora_on_the_same_linear_and_both_merge():
    model = Owners()
    x = ids()
    dm = dt.inject(model, dt.make_config("bitfit", targets=["up.bias"]), name="bias")
    dm.add_adapter("lora", dt.LoRAConfig(r=2, targets=["up"]))
    dm.set_active(["bias", "lora"])
    perturb(dm, std=0.1)
    dm.eval()
    with torch.no_grad():
        both = dm(x)
        dm.merge()
        assert_close(dm(x), both)
    assert not torch.equal(model.up.base_layer.bias, Owners().up.bias)
    dm.unmerge()
    assert torch.equal(model.up.base_layer.bias, Owners().up.bias)  # the selection's undo is exact
    with dm.disabled(), torch.no_grad():
        assert_close(dm(x), Owners()(x))  # LoRA's W0 comes back to rounding


def test_set_selection_moves_entries_and_keeps_the_parameter_tensor():
    dm = dt.inject(Owners(), dt.make_config("random_sparse", density=0.25, targets=["up.weight"]))
    delta = dict(dm.layers())["up"].deltas["default"]
    before, values = delta.index("weight").clone(), delta.value("weight")
    new = torch.randperm(16 * 12)[: before.numel()]
    delta.set_selection("weight", new, torch.arange(before.numel(), dtype=torch.float32))
    assert delta.value("weight") is values
    assert torch.equal(delta.index("weight"), new.sort().values)
    assert torch.equal(delta.value("weight"), torch.arange(new.numel()).float()[torch.argsort(new)])
    with pytest.raises(ValueError, match="keeps the number of entries"):
        delta.set_selection("weight", new[:3])


def test_saved_sparse_adapters_hold_only_the_chosen_entries(tmp_path):
    from safetensors.torch import load_file

    dm = dt.inject(Owners(), dt.make_config("random_sparse", density=0.05, targets=["up.weight", "custom.weight"]))
    dm.save(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert sorted(tensors) == ["custom.index_weight", "custom.values.weight", "up.index_weight", "up.values.weight"]
    assert tensors["up.values.weight"].numel() == math.ceil(0.05 * 16 * 12)
    assert tensors["up.index_weight"].dtype == torch.int64


def test_selection_on_a_quantized_base_merges_and_unmerges_the_packed_bytes():
    pytest.importorskip("bitsandbytes")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = dt.quantize(Two(), "nf4", compute_dtype=torch.float32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(x)
    packed = model.a.weight.data.clone()
    dm = dt.inject(model, dt.make_config("random_sparse", density=0.1, targets=["*.weight", "*.bias"]))
    with torch.no_grad():
        assert torch.equal(dm(x), base)
    perturb(dm, std=0.05)
    dm.merge()
    assert not torch.equal(dm.model.a.base_layer.weight.data, packed)
    dm.unmerge()
    assert torch.equal(dm.model.a.base_layer.weight.data, packed)


class TiedLM(nn.Module):
    """An embedding and an output head that share one weight tensor (tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.head = nn.Linear(12, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_a_tied_parameter_is_updated_on_every_owner_held_once_and_merged_once(tmp_path):
    model = TiedLM()
    dm = dt.inject(model, dt.make_config("random_sparse", density=0.1, targets=["emb.weight"]))
    assert sorted(dm.adapters["default"].paths) == ["emb", "head"]
    assert dm.trainable_parameters() == math.ceil(0.1 * 240)  # one set of values for the one tensor
    perturb(dm, std=0.5)
    x = ids()
    with torch.no_grad():
        out = dm(x)
        plain = TiedLM()
        delta = dict(dm.layers())["emb"].deltas["default"]
        plain.emb.weight.view(-1)[delta.index("weight")] += delta.value("weight")  # the definition, p + Δp
        assert_close(out, plain(x))
        w0 = model.emb.base_layer.weight.clone()
        dm.merge()
        assert_close(dm(x), out)
        dm.unmerge()
        assert torch.equal(model.emb.base_layer.weight, w0)
    assert_round_trip(dm, TiedLM().eval(), x, tmp_path / "tied")
