"""PEFT's files for model-level (prompt learning) methods, shared by their codecs (peft 0.21 PromptLearningConfig).

PEFT saves a prompt-learning adapter as the virtual tokens alone, `prompt_embeddings` (l, d) with no model
prefix (a reparameterisation such as P-tuning's encoder is run once and dropped), trained heads under
`base_model.<path>` (its PeftModel holds the transformers model directly), and an adapter_config.json with
the task type and the model's shape (token_dim, num_layers, num_attention_heads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from .prompt import PROMPT

if TYPE_CHECKING:
    from .model import Adapter, DeltaModel

EMBEDDINGS = "prompt_embeddings"
SEQ_CLS_HEADS = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS
TASK_TYPES = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS",
              "feature": "FEATURE_EXTRACTION"}


def prompt_learning_fields(dm: DeltaModel, adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json fields every prompt-learning method has, for this model and adapter."""
    site = dm.prompt_site
    return {"task_type": TASK_TYPES[site.task], "num_virtual_tokens": dm.prompts[adapter.name].num_virtual_tokens,
            "token_dim": site.hidden_size, "num_transformer_submodules": 1,
            "num_attention_heads": site.num_heads, "num_layers": site.num_layers}


def base_heads(dm: DeltaModel, adapter: Adapter) -> dict[str, Tensor]:
    """PEFT's sequence classifiers always load a trained copy of the head ('classifier' or 'score'); an adapter
    that left it frozen exports the base head's own tensors there (the same function)."""
    if dm.prompt_site.task != "seq_cls" or adapter.train_modules:
        return {}
    return {f"base_model.{path}.{k}": t for path, m in dm.model.named_modules()
            if path.split(".")[-1] in SEQ_CLS_HEADS for k, t in m.state_dict().items()}


def prompt_embeddings(tensors: dict[str, Tensor], path: Any) -> Tensor:
    """The file's `prompt_embeddings`, the only tensor a prompt-learning adapter has besides its heads."""
    extra = sorted(set(tensors) - {EMBEDDINGS})
    if extra:
        raise ValueError(f"unexpected tensors {extra} in PEFT prompt adapter '{path}' (it should hold only "
                         f"'{EMBEDDINGS}' and trained heads); save the adapter again")
    if EMBEDDINGS not in tensors:
        raise KeyError(f"'{EMBEDDINGS}'")  # read_peft names the missing tensor
    return tensors[EMBEDDINGS]


def prompt_state(**tensors: Tensor) -> dict[str, Tensor]:
    """A model-level delta's tensors as DeltaModel.add_adapter_from_state keys them."""
    return {f"{PROMPT}.{k}": v for k, v in tensors.items()}
