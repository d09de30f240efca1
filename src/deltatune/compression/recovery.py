"""Recover a pruned model with a tiny delta that keeps its sparsity: PERP.

*PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs* (Zimmer et al., https://arxiv.org/abs/2312.15230):
after pruning, retrain only a small expressive subset, the biases, the normalisation layers' parameters and a
mask-consistent LoRA (MaskLoRA, `masked_lora`) on the pruned layers, then merge; the merged weights keep
every pruned entry at exactly zero.

Checked against ZIB-IOL/PERP (main.py defaults, peft_methods.py SelectivePEFT, utilities.py): MaskLoRA with
alpha = 2r and no dropout on every pruned linear, every bias, LayerNorm / RMSNorm weights, AdamW without
weight decay and a linearly decaying learning rate. Departures: the LM head gets no LoRA (PERP adds a plain
one) because small LMs such as SmolLM2 tie it to the input embedding, so merging into it would change the
embedding too; biases are trained on the adapted layers (LoRA's bias="lora_only"), the only layers pruning
touches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deltatune.compression.calibration import Batch
from deltatune.compression.pruning import prune_targets
from deltatune.engine import inject, make_config
from deltatune.engine.targeting import named_layers


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the model-specific copies Hugging Face defines (LlamaRMSNorm...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    has_weight = isinstance(getattr(module, "weight", None), nn.Parameter)
    return type(module).__name__.endswith("Norm") and has_weight and not list(module.children())


def norm_layers(model: nn.Module) -> list[str]:
    """Paths of every normalisation layer with a weight (including the final norm)."""
    return [path for path, module in named_layers(model) if is_norm(module)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def perp_recover(model: nn.Module, batches: Iterable[Batch], *, steps: int = 100, lr: float = 2e-4, rank: int = 8,
                 targets: Any = None, train_biases_and_norms: bool = True, seed: int = 0) -> nn.Module:
    """Train masked LoRA (+ biases and norms) on `model(**batch).loss`, merge it, and return the plain model.

    Args:
        model: a pruned model (its zeros define the masks); changed in place and returned.
        batches: dicts with input_ids, attention_mask and labels (`calibration.text_batches`), cycled.
        steps: optimizer steps; 0 returns the model unchanged.
        lr: AdamW learning rate, decaying linearly to 0 over `steps`.
        rank: LoRA rank r (alpha = 2r, PERP's setting).
        targets: the layers to adapt; None = the layers `pruning.prune` targets by default.
        train_biases_and_norms: also train LayerNorm / RMSNorm parameters and the adapted layers' biases.
        seed: seeds the LoRA init and dropout (the global RNG is left as it was).
    """
    if steps < 0 or rank < 1 or lr <= 0:
        raise ValueError(f"need steps >= 0, rank >= 1 and lr > 0; got steps={steps}, rank={rank}, lr={lr}")
    batches = list(batches)
    if not batches:
        raise ValueError("perp_recover needs at least one batch (e.g. calibration.text_batches(tokenizer, texts))")
    if steps == 0:
        return model
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    config = make_config("masked_lora", r=rank, alpha=2.0 * rank, targets=prune_targets(model, targets),
                         bias="lora_only" if train_biases_and_norms else "none")
    device = _device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        norms = norm_layers(model) if train_biases_and_norms else []
        dm = inject(model, config, name="perp", train_modules=norms or None)
        try:
            _train(dm, batches, steps, lr, device)
        except BaseException:
            dm.delete_adapter("perp")  # leave the model as it came
            raise
        finally:
            model.train(was_training)
            for p, flag in flags.items():
                p.requires_grad_(flag)
    return dm.merge_and_unload()


def _train(model: nn.Module, batches: list[Batch], steps: int, lr: float, device: torch.device) -> None:
    """AdamW on the trainable parameters, linear decay to 0, cycling through `batches`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / steps)
    model.train()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        loss = getattr(model(**{k: v.to(device) for k, v in batch.items()}), "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss: recovery batches need labels (text_batches adds them)")
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
