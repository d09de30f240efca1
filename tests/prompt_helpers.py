"""Shared by the prompt-method tests (P-tuning, DePT, CPT): real models, PEFT twins, keyword forwards."""

from __future__ import annotations

import copy

import torch

import deltatune as dt


def smollm2():
    """(SmolLM2-135M-Instruct in eval mode, its tokenizer) from deltatune.assets (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune import assets

    path = assets.smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def out(dm, batch: dict, names: list[str] | None = None) -> torch.Tensor:
    """The logits of dm on a keyword batch (rows routed by names when given)."""
    kw = {} if names is None else {"adapter_names": names}
    return dm(**batch, **kw).logits.detach()


def grads_only_in(dm, batch: dict, name: str) -> None:
    """After one backward, the adapter's parameters have gradients and no base parameter has one."""
    dm(**batch).logits.float().pow(2).mean().backward()
    own = {id(p) for p in dm.prompts[name].parameters()}
    trained = [p for p in dm.prompts[name].parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    for n, p in dm.model.named_parameters():
        if id(p) not in own and "classifier" not in n:
            assert p.grad is None, n


def save_load(dm, fresh, batch: dict, tmp_path) -> dt.DeltaModel:
    """dm.save then dt.load into `fresh` reproduces dm's logits exactly."""
    expected = out(dm, batch)
    dm.save(tmp_path)
    loaded = dt.load(fresh, tmp_path)
    assert torch.equal(out(loaded, batch), expected)
    return loaded


def rows_match_alone(dm, batch: dict, names: list[str], atol: float = 1e-5) -> None:
    """Row i of a mixed batch equals row i run alone with adapter names[i] (dt.BASE: disabled)."""
    from helpers import assert_close

    mixed = out(dm, batch, names)
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if n == dt.BASE:
            with dm.disabled():
                ref = out(dm, row)
        else:
            dm.set_active(n)
            ref = out(dm, row)
        T = int(batch["attention_mask"][i].sum()) if "attention_mask" in batch else None
        got = mixed[i:i + 1]
        if ref.dim() == 3:  # token outputs: compare the row's own positions (its prompt + its tokens)
            got = got[:, : ref.shape[1]]
            keep = ref.shape[1] - (batch["attention_mask"].shape[1] - T) if T is not None else ref.shape[1]
            got, ref = got[:, :keep], ref[:, :keep]
        assert_close(got, ref, atol=atol, msg=f"row {i} ({n})")


def fresh_copy(model):
    return copy.deepcopy(model)
