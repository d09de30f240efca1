"""A causal LM's cross-entropy over chunks of the sequence, each chunk's output layer recomputed in backward.

The usual loss keeps (tokens x vocabulary) logits, their fp32 copy and the fp32 log-softmax that backward reads:
for Qwen2.5's 151,936 words and 512 tokens that is about 300 MiB saved and 600 MiB at the peak, more than all
the other activations of a checkpointed QLoRA step. Here the model runs without its output layer (it hands back
the last hidden states), and each chunk of positions goes through the output layer and the loss inside
`torch.utils.checkpoint`, so only one chunk's logits exist at any time (torchtune's chunked cross-entropy and
Liger's fused linear cross-entropy rest on the same idea). The loss and its gradients equal Hugging Face's
`ForCausalLMLoss` up to float summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deltatune.engine.checkpointing import CALL_STATE, replay_call_state, restored_call_state
from deltatune.engine.layer import DeltaLayer
from deltatune.engine.prompt import PromptDelta

IGNORE_INDEX = -100
# config attributes of architectures whose forward changes the logits after the output layer: the chunks would
# skip that step, so these models are refused rather than trained on a different loss
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face model with an output layer inside `model` (a DeltaModel, a PEFT model or the model)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            changed = [a for a in LOGIT_TRANSFORMS if getattr(module.config, a, None) not in (None, 1, 1.0)]
            if changed:
                raise ValueError(f"{type(module).__name__} changes its logits after the output layer "
                                 f"({', '.join(changed)}), which the chunked loss would skip: turn "
                                 "train.chunked_loss off for this model")
            return module
    raise ValueError(f"the chunked loss needs a Hugging Face causal LM with an output layer (lm_head); "
                     f"{type(model).__name__} has none: turn train.chunked_loss off for this model")


class _Passthrough:
    """Stands in for the output layer's forward during the model's: returns its input, and notes the per-call
    state the DeltaModel set on the layer's deltas (mixed-adapter rows), so the chunks run the layer as the call
    would. The layer itself stays in the model, where the DeltaModel finds it to set that state."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.state: list[tuple[DeltaLayer, list[Any]]] = []
        self.called = False

    def __call__(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.called = True
        self.state = [(layer, [getattr(layer, a) for a in CALL_STATE])
                      for layer in self.head.modules() if isinstance(layer, DeltaLayer)]
        return hidden


@contextlib.contextmanager
def _headless(lm: nn.Module) -> Iterator[tuple[_Passthrough, dict[str, Tensor]]]:
    """`lm` with its output layer passing its input through, and its `labels` taken out of each forward call
    (after a prompt adapter has extended them over its virtual tokens) into the yielded dict."""
    head = lm.get_output_embeddings()
    stand_in, taken = _Passthrough(head), {}

    def take_labels(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "labels" in kwargs:
            taken["labels"] = kwargs.pop("labels")
        return args, kwargs

    own_forward = head.__dict__.get("forward")  # an instance-level forward someone set (kept, put back after)
    hook = lm.register_forward_pre_hook(take_labels, with_kwargs=True)
    head.forward = stand_in
    try:
        yield stand_in, taken
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
        hook.remove()


def _chunk_loss(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    logits = head(hidden).float()  # fp32 like transformers' loss, for this chunk only
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(model: nn.Module, batch: dict[str, Any], chunk_tokens: int) -> Tensor:
    """The mean next-token cross-entropy of `model(**batch)` over the labelled tokens (label -100: not counted),
    as transformers computes it, with at most about `chunk_tokens` positions' logits alive at a time. A batch with
    no labelled token gives 0."""
    if batch.get("labels") is None:
        raise ValueError("the chunked loss needs the batch's labels (token ids, -100 where not counted)")
    if batch["labels"].dim() != 2:
        raise ValueError(f"the chunked loss is a causal LM's: labels of shape (batch, sequence), got "
                         f"{tuple(batch['labels'].shape)}; turn train.chunked_loss off for this task")
    own_loss = [d.method for d in getattr(model, "prompts", {}).values()
                if type(d).loss is not PromptDelta.loss]
    if own_loss:
        raise ValueError(f"{own_loss[0]} computes its own loss from the full logits, which the chunked loss never "
                         "forms: turn train.chunked_loss off with this method")
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    with _headless(lm) as (stand_in, taken):
        hidden = model(**batch).logits  # (B, T, hidden): what the output layer would have read
    labels = taken.get("labels", batch["labels"])
    if not stand_in.called or hidden.shape[:2] != labels.shape:
        raise ValueError(f"{type(lm).__name__}'s forward does not end in its output layer (get_output_embeddings) "
                         "as a causal LM's does: turn train.chunked_loss off for this model")
    if any(values[CALL_STATE.index("token_mask")] is not None for _, values in stand_in.state):
        raise ValueError("a token_mask on the output layer's delta cannot be split into chunks: turn "
                         "train.chunked_loss off, or keep the token mask off the lm_head")
    # position t predicts label t + 1; the last position predicts nothing (as transformers' ForCausalLMLoss)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)
    step = max(1, chunk_tokens // hidden.shape[0])  # whole rows stay together: mixed-adapter routes are per row
    total = hidden.sum().float() * 0  # keeps the graph when no chunk has a label
    with restored_call_state(stand_in.state):  # the chunks run after the call: its state on the head's deltas
        for start in range(0, hidden.shape[1], step):
            y = targets[:, start:start + step]
            if not (y != IGNORE_INDEX).any():
                continue
            # contiguous: a strided (B, t, H) slice sends a bf16 linear down a path ~60x slower on CPU
            chunk = hidden[:, start:start + step].contiguous()
            total = total + checkpoint(_chunk_loss, head, chunk, y, use_reentrant=False,
                                       context_fn=replay_call_state(head))
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

