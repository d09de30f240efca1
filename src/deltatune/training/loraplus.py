"""LoRA+ optimizer groups: a larger learning rate for LoRA's B matrices.

Hayou, Ghosh, Yu. "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354 (2024).
With W = W0 + B A, the paper shows that A and B should not share a learning rate in wide models and sets
lr_B = ratio * lr_A (Sec. 3, ratio about 2^4 in its experiments). Every other trainable parameter
(A, DoRA magnitudes, trained heads) keeps lr.
"""

from __future__ import annotations

from torch import nn

B_NAME = "lora_B"  # the engine's name for LoRA's B (d_out x r) parameter


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: trainable `lora_B` parameters at lr * ratio, the rest at lr."""
    b_params, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b_params if B_NAME in name.split(".") else other).append(p)
    if not b_params:
        raise ValueError(f"LoRA+ needs trainable {B_NAME!r} parameters, and this model has none")
    groups = [{"params": b_params, "lr": lr * ratio, "weight_decay": weight_decay}]
    if other:
        groups.insert(0, {"params": other, "lr": lr, "weight_decay": weight_decay})
    return groups
