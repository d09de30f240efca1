"""Unstructured and N:M pruning: exact sparsity per scope (ties included), a shared global threshold, exact N:M
groups, Wanda and GBLM scores against hand-computed / directly transcribed values, calibration data, and a real
SmolLM2 pruned with Wanda that saves and reloads with its zeros."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from torch import nn

from deltatune import assets
from deltatune.compression import calibration, pruning
from deltatune.compression.calibration import gradient_norms, input_norms, text_batches
from deltatune.compression.pruning import kth_smallest, nm_mask, nm_ok, prune, sparsity


class Two(nn.Module):
    """Embedding -> a (Linear 8 -> 6) -> b (Linear 6 -> 4), for the mask math on hand-set weights."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.b(torch.tanh(self.a(self.emb(input_ids))))


def tied_weights(model: Two, seed: int = 0) -> None:
    """Magnitudes 1, 2 or 3 with random signs: many ties, no zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, scale in ((model.a, 1.0), (model.b, 3.0)):
            w = torch.randint(1, 4, layer.weight.shape, generator=g).float() * scale
            layer.weight.copy_(w * (torch.randint(0, 2, w.shape, generator=g) * 2 - 1))


def pruned_and_kept(weight: torch.Tensor, original: torch.Tensor, keep: torch.Tensor):
    assert torch.equal(weight == 0, ~keep), "zeros must sit exactly where the mask says"
    return original.abs()[~keep], original.abs()[keep]


@pytest.mark.parametrize("s", [0.5, 0.25, 0.7])
def test_row_scope_prunes_exactly_the_fraction_of_every_row_and_the_smallest(s):
    model = Two()
    tied_weights(model)
    original = model.a.weight.detach().clone()
    masks = prune(model, "magnitude", s, targets=["a", "b"], scope="row")
    k = round(8 * s)
    assert ((~masks["a"]).sum(1) == k).all()
    for row in range(6):
        pruned, kept = pruned_and_kept(model.a.weight[row], original[row], masks["a"][row])
        assert pruned.max() <= kept.min()


def test_layer_scope_prunes_exactly_the_fraction_of_the_layer_with_ties():
    model = Two()
    tied_weights(model)
    original = model.b.weight.detach().clone()
    masks = prune(model, "magnitude", 0.5, targets=["a", "b"], scope="layer")
    assert (~masks["b"]).sum() == 12 and (~masks["a"]).sum() == 24
    pruned, kept = pruned_and_kept(model.b.weight, original, masks["b"])
    assert pruned.max() <= kept.min()
    assert ((~masks["b"]).sum(1) != 3).any(), "layer scope is not per row on this example"


def test_global_scope_shares_one_threshold_and_prunes_exactly_the_fraction():
    model = Two()
    tied_weights(model)  # b is 3x larger than a, so a global threshold prunes a much more
    originals = {name: getattr(model, name).weight.detach().clone() for name in "ab"}
    masks = prune(model, "magnitude", 0.5, targets=["a", "b"], scope="global")
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * (48 + 24))
    pruned = torch.cat([originals[n].abs()[~masks[n]] for n in "ab"])
    kept = torch.cat([originals[n].abs()[masks[n]] for n in "ab"])
    assert pruned.max() <= kept.min()
    per_layer = sparsity(model, ["a", "b"])
    assert per_layer["a"] > 0.5 > per_layer["b"]


def test_pruning_keeps_dtype_and_writes_exact_zeros_in_half_precision():
    model = Two().to(torch.bfloat16)
    masks = prune(model, "magnitude", 0.5, targets=["a", "b"], scope="layer")
    assert model.a.weight.dtype == torch.bfloat16 and masks["a"].dtype == torch.bool
    assert int((model.a.weight == 0).sum()) == 24 and torch.equal(model.a.weight != 0, masks["a"])


def test_global_ties_at_the_threshold_go_in_layer_order_by_hand():
    holder = nn.Module()
    holder.a, holder.b = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        holder.a.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        holder.b.weight.copy_(torch.tensor([[0.5, 5.0], [2.0, -2.0]]))
    masks = prune(holder, "magnitude", 0.5, targets=["a", "b"], scope="global")
    # |w| sorted: 0.5, 1, 2 (a), 2 (b[1, 0]), 2 (b[1, 1]), 3, 4, 5: four go; of the tied 2s, a's goes first
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [[False, True], [False, True]]


@pytest.mark.parametrize("k", [1, 7, 50, 199, 200])
def test_kth_smallest_matches_kthvalue_of_the_concatenation(k):
    g = torch.Generator().manual_seed(k)
    sets = [torch.randint(0, 5, (10, 7), generator=g).float() * 0.37, torch.rand(13, 10, generator=g)]
    sets.append(torch.tensor([0.0, 1e-30, 3e30]))
    everything = torch.cat([s.flatten() for s in sets])
    k = min(k, everything.numel())
    value, ties = kth_smallest(lambda: iter(sets), k)
    assert value == everything.kthvalue(k).values
    assert ties == k - int((everything < value).sum())


# --- N:M ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_exactly_n_per_group_of_m_the_largest(n, m):
    torch.manual_seed(0)
    model = nn.Module()
    model.lin = nn.Linear(16, 8)
    original = model.lin.weight.detach().clone()
    assert not nm_ok(model.lin, n, m)
    masks = prune(model, "magnitude", 0.9, targets=["lin"], n_m=(n, m))  # sparsity is ignored with n_m
    groups = (model.lin.weight != 0).reshape(8, 16 // m, m)
    assert (groups.sum(-1) == n).all()
    assert nm_ok(model.lin, n, m) and nm_ok(model.lin.weight, n, m)
    g = original.abs().reshape(8, -1, m)
    kept = masks["lin"].reshape(8, -1, m)
    assert (g.masked_fill(~kept, math.inf).amin(-1) >= g.masked_fill(kept, -math.inf).amax(-1)).all()


def test_nm_mask_on_a_hand_example():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 2.0, 0.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, True, False, True, False, True, False]]
    assert nm_mask(scores, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]


def test_nm_rejects_indivisible_inputs_before_changing_anything():
    model = Two()  # b has 6 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="divisible by 4, but 'b' has 6"):
        prune(model, "magnitude", targets=["a", "b"], n_m=(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="scope='row'"):
        prune(model, "magnitude", targets=["a"], n_m=(2, 4), scope="layer")
    with pytest.raises(ValueError, match="0 < N < M"):
        prune(model, "magnitude", targets=["a"], n_m=(4, 2))


def test_bad_arguments_name_the_fix():
    model = Two()
    with pytest.raises(ValueError, match="did you mean 'wanda'"):
        prune(model, "wandaa", targets=["a"])
    with pytest.raises(ValueError, match="did you mean 'row'"):
        prune(model, scope="rows", targets=["a"])
    with pytest.raises(ValueError, match="calibration=text_batches"):
        prune(model, "wanda", targets=["a"])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        prune(model, sparsity=1.0, targets=["a"])
    conv = nn.Module()
    conv.c = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="needs linear layers"):
        prune(conv, "wanda", targets=["c"], calibration=[{"input_ids": torch.zeros(1, 1, dtype=torch.long)}])


# --- Wanda: hand-computed ------------------------------------------------------------------------
PAD = 3


class Lookup(nn.Module):
    """Embedding -> lin (Linear 4 -> 2, no bias)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 4)
        self.lin = nn.Linear(4, 2, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def wanda_example() -> tuple[Lookup, dict]:
    """lin: W = [[1, 4, -2, 3], [-2, 1, 1, -6]]; tokens 0, 1, 2 embed so that ||X_j|| = (5, 0.5, 2, 1);
    token 3 (huge) only appears as padding."""
    model = Lookup()
    with torch.no_grad():
        model.emb.weight.copy_(torch.tensor([[3.0, 0, 2, 0], [4, 0, 0, 1], [0, 0.5, 0, 0], [100, 100, 100, 100]]))
        model.lin.weight.copy_(torch.tensor([[1.0, 4, -2, 3], [-2, 1, 1, -6]]))
    batch = {"input_ids": torch.tensor([[0, 1, 2, PAD]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    return model, batch


def test_input_norms_by_hand_and_padding_is_ignored():
    model, batch = wanda_example()
    norms = input_norms(model, [batch], ["lin"])["lin"]
    assert torch.allclose(norms, torch.tensor([5.0, 0.5, 2.0, 1.0]))
    with_padding = input_norms(model, [{"input_ids": batch["input_ids"]}], ["lin"])["lin"]
    assert with_padding[0] == pytest.approx(math.sqrt(25 + 100**2))
    split = [{k: v[:, :2] for k, v in batch.items()}, {k: v[:, 2:] for k, v in batch.items()}]
    assert torch.allclose(input_norms(model, split, ["lin"])["lin"], norms)  # sums over batches


def test_wanda_picks_the_hand_computed_entries_and_differs_from_magnitude():
    # scores |W| * (5, .5, 2, 1): row 0 = (5, 2, 4, 3), row 1 = (10, .5, 2, 6); half of each row goes
    model, batch = wanda_example()
    keep = prune(model, "wanda", 0.5, targets=["lin"], calibration=[batch])["lin"]
    assert keep.tolist() == [[True, False, True, False], [True, False, False, True]]
    assert model.lin.weight.tolist() == [[1.0, 0, -2, 0], [-2, 0, 0, -6]]
    model, _ = wanda_example()
    by_magnitude = prune(model, "magnitude", 0.5, targets=["lin"])["lin"]
    assert by_magnitude.tolist() == [[False, True, False, True], [True, False, False, True]]


# --- GBLM and the sequential order on a tiny Llama ---------------------------------------------------
def random_batches(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, width in ((3, 12), (2, 9)):
        ids = torch.randint(0, 100, (rows, width), generator=g)
        mask = torch.ones_like(ids)
        mask[0, width - 4:] = 0  # one padded row per batch
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


MLP0 = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_gblm_matches_a_direct_transcription_of_its_formula(tiny_llama):
    batches = random_batches()
    layers = {p: tiny_llama.get_submodule(p) for p in MLP0}
    W = {p: m.weight.detach().clone() for p, m in layers.items()}
    # ||X_j||_2 over the real tokens, from the layers' inputs
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in MLP0}
    handles = [m.register_forward_hook(lambda mod, args, out, p=p: inputs[p].append(args[0])) for p, m in layers.items()]
    with torch.no_grad():
        for b in batches:
            tiny_llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    real = [b["attention_mask"].bool() for b in batches]
    sq = {p: sum(x[keep].square().sum(0) for x, keep in zip(inputs[p], real)) for p in MLP0}
    # ||G_ij||_2 over sequences: one backward per sequence, padding cut off
    g2 = {p: torch.zeros_like(w) for p, w in W.items()}
    n = 0
    for b in batches:
        for row, mask in zip(b["input_ids"], b["attention_mask"].bool()):
            ids = row[mask][None]
            loss = tiny_llama(input_ids=ids, labels=ids).loss
            for p, g in zip(MLP0, torch.autograd.grad(loss, [layers[p].weight for p in MLP0])):
                g2[p] += g.square()
            n += 1
    grads = gradient_norms(tiny_llama, batches, MLP0)
    for p in MLP0:
        assert_close(grads[p], g2[p].sqrt(), rtol=1e-4, atol=1e-7, msg=p)
    expected = {}
    for p in MLP0:
        score = W[p].abs() * sq[p].sqrt()[None, :] / math.sqrt(n) + 100 * W[p].abs() * g2[p].sqrt()
        keep = torch.ones_like(score, dtype=torch.bool)
        expected[p] = keep.scatter_(1, score.argsort(1)[:, : score.shape[1] // 2], False)
    masks = prune(tiny_llama, "gblm", 0.5, targets=MLP0, calibration=batches)
    for p in MLP0:
        assert torch.equal(masks[p], expected[p]), p


def test_gblm_differs_from_wanda(tiny_llama):
    import copy

    other = copy.deepcopy(tiny_llama)
    wanda = prune(tiny_llama, "wanda", 0.5, targets=MLP0, calibration=random_batches())
    gblm = prune(other, "gblm", 0.5, targets=MLP0, calibration=random_batches())
    assert any(not torch.equal(wanda[p], gblm[p]) for p in MLP0)


def test_sequential_wanda_measures_each_block_after_the_blocks_before_it_are_pruned(tiny_llama):
    import copy

    batches = random_batches(1)
    both = ["re:model\\.layers\\.[01]\\.mlp\\..*"]
    block1 = ["re:model\\.layers\\.1\\.mlp\\..*"]
    one_by_one, dense = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    joint = prune(tiny_llama, "wanda", 0.5, targets=both, calibration=batches)
    prune(one_by_one, "wanda", 0.5, targets=MLP0, calibration=batches)
    after_block0 = prune(one_by_one, "wanda", 0.5, targets=block1, calibration=batches)
    on_dense = prune(copy.deepcopy(dense), "wanda", 0.5, targets=block1, calibration=batches)
    in_one_pass = prune(dense, "wanda", 0.5, targets=both, calibration=batches, sequential=False)
    for p in after_block0:
        assert torch.equal(joint[p], after_block0[p])
        assert torch.equal(in_one_pass[p], on_dense[p])
    assert any(not torch.equal(after_block0[p], on_dense[p]) for p in after_block0)


def test_default_targets_are_the_linears_inside_the_blocks(tiny_llama, tiny_gpt2):
    paths = pruning.prune_targets(tiny_llama)
    assert len(paths) == 2 * 7 and all(p.startswith("model.layers.") for p in paths)
    assert set(pruning.prune_targets(tiny_gpt2)) == {f"transformer.h.{i}.{n}" for i in range(2)
                                                    for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    masks = prune(tiny_gpt2, "wanda", 0.5, calibration=random_batches(), scope="row")
    w = tiny_gpt2.transformer.h[0].attn.c_attn.weight  # Conv1D: (d_in, d_out), rows of the matrix are columns here
    assert masks["transformer.h.0.attn.c_attn"].shape == w.shape
    assert ((w == 0).sum(0) == w.shape[0] // 2).all()


# --- calibration data ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def chat_texts(n: int = 200) -> list[str]:
    return [f"{r['prompt']}\n{r['response']}" for r in assets.chatterbot()[:n]]


def test_text_batches_fill_windows_pad_and_label(smollm2):
    _, tokenizer = smollm2
    batches = text_batches(tokenizer, chat_texts(), n_samples=6, seq_len=24, batch_size=4, seed=0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    for b in batches:
        assert b["input_ids"].shape[1] <= 24
        assert torch.equal(b["labels"] == -100, b["attention_mask"] == 0)
        assert torch.equal(b["labels"][b["attention_mask"] == 1], b["input_ids"][b["attention_mask"] == 1])
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 6 * 24  # short texts are joined to fill windows
    again = text_batches(tokenizer, chat_texts(), n_samples=6, seq_len=24, batch_size=4, seed=0)
    other = text_batches(tokenizer, chat_texts(), n_samples=6, seq_len=24, batch_size=4, seed=1)
    assert torch.equal(again[0]["input_ids"], batches[0]["input_ids"])
    assert not torch.equal(other[0]["input_ids"], batches[0]["input_ids"])
    short = text_batches(tokenizer, ["Hello there.", "", "Fine, thanks."], n_samples=8, seq_len=64)
    assert len(short) == 1 and short[0]["input_ids"].shape[0] == 1  # texts ran out: one shorter window
    with pytest.raises(ValueError, match="texts must be strings"):
        text_batches(tokenizer, [{"text": "x"}])
    assert calibration.n_sequences(batches) == 6


def test_wanda_on_smollm2_keeps_exact_sparsity_and_reloads_with_zeros(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    batches = text_batches(tokenizer, chat_texts(), n_samples=4, seq_len=32, batch_size=4)
    targets = ["re:model\\.layers\\.[01]\\.mlp\\..*"]
    attention = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    masks = prune(model, "wanda", 0.5, targets=targets, calibration=batches)
    assert len(masks) == 6
    for path, keep in masks.items():
        w = model.get_submodule(path).weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all() and torch.equal(w != 0, keep)
    assert set(sparsity(model, targets).values()) == {0.5}
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, attention)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for path, keep in masks.items():
        assert torch.equal(reloaded.get_submodule(path).weight != 0, keep)
    with torch.no_grad():
        assert math.isfinite(reloaded(**batches[0]).loss.item())
