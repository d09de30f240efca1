"""Every registered method against the properties the engine promises (STYLE.md §2.8: one test walks the registry).

One table gives each method its smallest valid config, its trainable-parameter formula (from MethodSpec.formula
and the method's docstring), whether it starts at the base model and which other layer kinds it adapts. On a
small model of Linear layers, in float32 and on a bf16 base:
parameter count, output at init, gradients reaching only the delta, merge == unmerged and an exact unmerge,
a bitwise save/load round trip, mixed-adapter batches, and fp32 adapters on the bf16 base.
`full` is left out: it copies whole modules (train_modules), tested in test_engine.py and test_io.py.
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

import deltatune as dt
from deltatune.engine.registry import list_methods

Layers = dict[str, tuple[int, int]]  # adapted path -> (d_out, d_in) of its matrix view


def each(f: Callable[[int, int, Any], int]) -> Callable[[Layers, Any], int]:
    """A per-layer formula f(d_out, d_in, config), summed over the adapted layers."""
    return lambda layers, c: sum(f(o, i, c) for o, i in layers.values())


def tt(modes: list[int], rank: int) -> int:
    """Parameters of a tensor train over `modes` with inner ranks `rank`: sum_k t_(k-1) n_k t_k, t_0 = t_K = 1."""
    t = [1] + [rank] * (len(modes) - 1) + [1]
    return sum(t[k] * n * t[k + 1] for k, n in enumerate(modes))


def pow2_modes(n: int, max_mode: int) -> list[int]:
    """LoRETTA's reshape modes of a power of two: its factors 2 packed greedily into modes <= max_mode."""
    modes = []
    while n > 1:
        modes.append(min(max_mode, n))
        n //= modes[-1]
    return modes


def near_sqrt_pair(n: int) -> tuple[int, int]:
    """(m, n/m), m <= n/m, the divisor pair closest to sqrt(n) (LoKr's factorization with factor -1)."""
    m = max(k for k in range(1, math.isqrt(n) + 1) if n % k == 0)
    return m, n // m


def lokr_count(o: int, i: int, c: Any) -> int:
    (a1, b1), (a2, b2) = near_sqrt_pair(o), near_sqrt_pair(i)
    low_rank_b = c.r < max(b1, b2) / 2  # B = B1 B2 of rank r, else dense
    return a1 * a2 + (c.r * (b1 + b2) if low_rank_b else b1 * b2)


def sharelora_count(layers: Layers, c: Any) -> int:
    """share='A': one A (r x d_in) per projection type (the path's leaf name), a B (d_out x r) per layer."""
    types = {path.rsplit(".", 1)[-1]: dims for path, dims in layers.items()}
    return sum(c.r * i for o, i in types.values()) + sum(c.r * o for o, i in layers.values())


@dataclass(frozen=True)
class Case:
    options: dict[str, Any]
    count: Callable[[Layers, Any], int]
    at_base: str | None = "exact"  # output at init: "exact", "close" (float rounding) or None (see why)
    kinds: tuple[str, ...] = ("embedding", "conv")  # other layer kinds the method adapts
    why: str = ""
    # Unmerge by a solve with M or a division (multiplicative, DoRA): W0 comes back to this tolerance relative
    # to max|W0| (the merged weight's rounding, amplified by M's conditioning). None: one ulp, elementwise.
    unmerge_rtol: float | None = None


SOLVED = 4e-6  # measured up to 1.3e-6 (ETHER+ on the conv, whose H+ is not orthogonal)
CASES: dict[str, Case] = {
    "adalora": Case({"init_r": 3, "target_r": 2}, each(lambda o, i, c: c.init_r * (i + o + 1))),
    "increlora": Case({"r": 1, "target_r": 2}, each(lambda o, i, c: c.capacity * (i + o + 1))),
    "capaboost": Case({"r": 2}, each(lambda o, i, c: c.r * (i + o))),
    "dora": Case({"r": 2}, each(lambda o, i, c: c.r * (i + o) + o), kinds=("conv",), unmerge_rtol=SOLVED),
    "dylora": Case({"r": 2}, each(lambda o, i, c: c.r * (i + o))),
    "edora": Case({"r": 2}, each(lambda o, i, c: c.r ** 2 + o), at_base=None, kinds=("conv",),
                  why="R ~ N(0, 1e-5) as the official code (LoRA-XS's init)", unmerge_rtol=SOLVED),
    "lamda": Case({"r": 2}, each(lambda o, i, c: c.r ** 2 + c.r * o)),
    "lora": Case({"r": 2}, each(lambda o, i, c: c.r * (i + o))),
    "lora_mini": Case({"r": 2, "a": 4, "b": 4}, each(lambda o, i, c: c.r * (c.a + c.b))),
    "lora_xs": Case({"r": 2}, each(lambda o, i, c: c.r ** 2), at_base=None, why="R ~ N(0, 1e-5) as the official code"),
    "masked_lora": Case({"r": 2}, each(lambda o, i, c: c.r * (i + o))),
    "monteclora": Case({"r": 2, "num_samples": 4}, each(lambda o, i, c: c.r * (i + o) + c.r + c.num_samples)),
    "mos": Case({"r": 2, "pool_r": 2, "private_r": 1, "shards": 2}, each(lambda o, i, c: c.pool_r * (i + o))),
    "nola": Case({"r": 2, "k": 4, "l": 4}, each(lambda o, i, c: c.k + c.l)),
    "sharelora": Case({"r": 2}, sharelora_count),
    "sorsa": Case({"r": 2}, each(lambda o, i, c: c.r * (i + o + 1))),
    "vblora": Case({"r": 2, "num_vectors": 8, "vector_length": 8},
                   lambda layers, c: each(lambda o, i, c: c.r * (i + o) // c.vector_length * c.num_vectors)(layers, c)
                   + c.num_vectors * c.vector_length,
                   at_base=None, kinds=("conv",), why="the bank and logits start random, as PEFT and the paper"),
    "vera": Case({"r": 4}, each(lambda o, i, c: c.r + o)),
    # Capacity off: with it, which tokens an expert takes depends on the whole call, so rows are not independent.
    "sira": Case({"experts": 2, "top_k": 1, "r": 2, "capacity_factor": None},
                 each(lambda o, i, c: c.experts * c.r * (i + o) + c.experts * i), kinds=()),
    "boft": Case({"block_size": 4}, each(lambda o, i, c: c.n_butterfly_factor * i * c.block_size + o),
                 kinds=("conv",), unmerge_rtol=SOLVED),
    "ether": Case({}, each(lambda o, i, c: i), at_base=None, kinds=("conv",),
                  why="a Householder reflection is never the identity (||H - I||_F = 2)", unmerge_rtol=SOLVED),
    "ether_plus": Case({}, each(lambda o, i, c: 2 * i), at_base="close", kinds=("conv",), unmerge_rtol=SOLVED),
    "goft": Case({}, each(lambda o, i, c: i - 1), kinds=("conv",), unmerge_rtol=SOLVED),
    "ia3": Case({"feedforward": ["down"]}, lambda layers, c: sum(i if p.endswith("down") else o
                                                                 for p, (o, i) in layers.items()), kinds=("conv",)),
    "oft": Case({"block_size": 4}, each(lambda o, i, c: i * (c.block_size - 1) // 2), kinds=("conv",),
                unmerge_rtol=SOLVED),
    "qgoft": Case({}, each(lambda o, i, c: 4 * (i - 1)), kinds=("conv",), unmerge_rtol=SOLVED),
    "ssf": Case({}, each(lambda o, i, c: 2 * o), kinds=("conv",)),  # no merge into a bias-free Embedding
    "circulant": Case({}, each(lambda o, i, c: o * i // math.gcd(o, i))),  # block n = gcd(d_out, d_in)
    "flora": Case({"r": 2, "r_kernel": 1}, each(lambda o, i, c: c.r * c.r + c.r * o + c.r * i)),
    "loha": Case({"r": 2}, each(lambda o, i, c: 2 * c.r * (i + o)), kinds=("conv",)),
    "lokr": Case({"r": 2}, each(lokr_count), kinds=("conv",)),
    "loretta_adp": Case({"bottleneck": 4, "tensor_rank": 2, "max_mode": 4}, each(
        lambda o, i, c: tt(pow2_modes(o, c.max_mode) + pow2_modes(c.bottleneck, c.max_mode), c.tensor_rank)
        + tt(pow2_modes(c.bottleneck, c.max_mode) + pow2_modes(o, c.max_mode), c.tensor_rank) + c.bottleneck + o)),
    "loretta_rep": Case({"r": 2, "tensor_rank": 2, "max_mode": 4}, each(
        lambda o, i, c: tt(pow2_modes(i, c.max_mode) + pow2_modes(c.r, c.max_mode), c.tensor_rank)
        + tt(pow2_modes(c.r, c.max_mode) + pow2_modes(o, c.max_mode), c.tensor_rank))),
    "toeplitz": Case({}, each(lambda o, i, c: (o // (n := math.gcd(o, i))) * (i // n) * (2 * n - 1))),
    "intrinsic": Case({"d": 6}, lambda layers, c: c.d),  # one θ_d for the whole adapter
    "said": Case({"d": 6}, lambda layers, c: c.d + len(layers)),  # plus one λ per layer
}
SKIPPED = {"full"}  # module copies, not deltas (see the module docstring)
# activation deltas (family "adapters") act on whole sublayers and cannot merge: tests/test_activation_adapters.py walks
# them; model-level deltas (family "prompt") change the inputs, not layers: tests/test_prompt.py; adaption prompts in tests/methods/test_adaption_prompt.py;
# selections of existing parameters (family "selective") target parameters: tests/test_selection.py
METHODS = [s.name for s in list_methods() if s.name not in SKIPPED and s.family not in ("adapters", "prompt", "selective")]


def test_the_table_covers_every_registered_method():
    assert sorted(CASES) == sorted(METHODS)


class Block(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """Two residual blocks of rectangular Linears: layers of one type repeat (ShareLoRA, MoS pools, VeRA bases)."""

    def __init__(self, dtype=torch.float32, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.to(dtype)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Kinds(nn.Module):
    """An Embedding then a Conv2d over the token axis."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.conv = nn.Embedding(16, 16), nn.Conv2d(16, 8, 3, padding=1)
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)[..., None].expand(-1, -1, -1, 3)  # (batch, 16, tokens, 3)
        return self.conv(h.contiguous())


def build(method: str, kind: str = "linear", dtype=torch.float32):
    """(model, config, input): the method's table config on Net's Linears, or on the other kinds it adapts."""
    case = CASES[method]
    if kind == "linear":
        model, targets = Net(dtype), ["up", "down"]
        x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    else:
        model, targets = Kinds(dtype), list(case.kinds)
        x = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(1))
        targets = ["emb" if k == "embedding" else k for k in targets]
    config = dt.get_method(method).config(targets=targets, **case.options)
    return model, config, x


def kinds_params():
    return [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS for k in ["linear", "kinds"]
            if k == "linear" or CASES[m].kinds]


def _trainable(dm):
    return {n: p for n, p in dm.named_parameters() if p.requires_grad}


def _base_params(dm):
    return {n: p for n, p in dm.named_parameters() if ".base_layer." in n or not any(
        s in n for s in (".deltas.", "shared."))}


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count_is_the_method_formula(method):
    model, config, x = build(method)
    dm = dt.inject(model, config)
    layers = {path: tuple(layer.matrix().shape) for path, layer in dm.layers()}
    assert len(layers) == 4
    assert dm.trainable_parameters() == CASES[method].count(layers, config)


@pytest.mark.parametrize("method,kind", kinds_params())
def test_init_gradients_merge_and_round_trip(method, kind, tmp_path):
    case = CASES[method]
    model, config, x = build(method, kind)
    with torch.no_grad():
        base = model(x)
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    dm = dt.inject(model, config)
    dm.eval()
    with torch.no_grad():
        init = dm(x)
    if case.at_base == "exact":
        assert torch.equal(init, base)
    elif case.at_base == "close":
        assert_close(init, base)
    else:
        assert not torch.equal(init, base), f"{method} is marked as not starting at the base ({case.why})"

    # Gradients reach only the delta, and every trainable tensor of it.
    perturb(dm, std=0.1)
    dm.train()
    dm.on_train_step(0)
    out = dm(x)
    (out.square().mean() + dm.regularization_loss()).backward()
    trainable = _trainable(dm)
    assert trainable
    for name, p in _base_params(dm).items():
        assert not p.requires_grad and p.grad is None, name
    for name, p in trainable.items():
        assert ".deltas." in name or name.startswith("shared."), name
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    dm.zero_grad()
    dm.eval()

    # Save/load: bitwise the same outputs.
    fresh = (Net if kind == "linear" else Kinds)().eval()
    assert_round_trip(dm, fresh, x, tmp_path / "adapter")

    # Merge equals the unmerged forward; unmerge restores W0 (to one ulp, or the solve's tolerance).
    spec = dt.get_method(method)
    if not spec.delta.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            dm.merge()
        return

    def base_weights():
        return {n.replace(".base_layer.", "."): p.clone() for n, p in model.named_parameters() if ".deltas." not in n}

    with torch.no_grad():
        unmerged = dm(x)
        dm.merge()
        assert_close(model(x), unmerged, msg="merged")
        merged = base_weights()
        dm.unmerge()
        assert_close(dm(x), unmerged, msg="unmerged again")
    after = base_weights()
    assert after.keys() == w0.keys()
    for name, w in after.items():
        if case.unmerge_rtol is not None:
            assert_close(w, w0[name], rtol=case.unmerge_rtol, atol=0, msg=name)
            continue
        # In place, W0 + ΔW is rounded once, so unmerge gives W0 back to one ulp of the merged weight.
        big = torch.maximum(w0[name].abs(), merged[name].abs())
        ulp = torch.nextafter(big, torch.tensor(math.inf)) - big
        assert ((w - w0[name]).abs() <= ulp).all(), (name, ((w - w0[name]).abs() / ulp).max().item())


@pytest.mark.parametrize("method,kind", kinds_params())
def test_mixed_adapter_batch_equals_each_row_alone(method, kind):
    model, config, x = build(method, kind)
    dm = dt.inject(model, config, name="a")
    # The second adapter differs where the config allows: another seed (other random bases or masks) and
    # rank (the fused mixed path pads ranks).
    other = {"seed": 1} if "seed" in type(config).model_fields else {}
    if "r" in CASES[method].options and method != "mos":  # MoS: a larger r needs more shards than one layer pools
        other["r"] = config.r + 1
    dm.add_adapter("b", type(config)(**{**config.model_dump(), **other}))
    perturb(dm, std=0.1)
    dm.eval()
    names = ["a", dt.BASE, "b", "a"]
    with torch.no_grad():
        scale = dm(x).abs().max().item()
    assert_rows_match_each_adapter(dm, x, names, atol=1e-5 + 1e-4 * scale, rows_alone=True)


@pytest.mark.parametrize("method", METHODS)
def test_on_a_bf16_base_adapters_stay_fp32_start_at_base_and_merge(method):
    case = CASES[method]
    model, config, x = build(method, dtype=torch.bfloat16)
    with torch.no_grad():
        base = model(x)
    dm = dt.inject(model, config)
    dm.eval()
    trainable = _trainable(dm)
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    with torch.no_grad():
        init = dm(x)
    assert init.dtype == torch.bfloat16
    if case.at_base == "exact":
        assert torch.equal(init, base)
    elif case.at_base == "close":
        assert_close(init, base, rtol=1e-2)
    perturb(dm, std=0.02)  # deltas comparable to W0: large ones compound bf16 rounding through the blocks
    if dt.get_method(method).delta.mergeable:
        with torch.no_grad():
            unmerged = dm(x)
            dm.merge()
            assert_close(model(x), unmerged, rtol=2e-2, msg="merged")
    assert all(p.dtype == torch.float32 for p in _trainable(dm).values())
