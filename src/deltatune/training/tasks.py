"""Tasks: how records become batches, which model to build, and what to measure."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from deltatune import assets
from deltatune.engine.model import DeltaModel
from deltatune.engine.prompt import assemble

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that Hugging Face losses skip
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"minilm": assets.minilm_path, "smollm2": assets.smollm2_path}


def resolve_model_path(name_or_path: str) -> Path:
    """Folder of a built-in model name, or the given Hugging Face model folder."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a Hugging Face model folder (with config.json) "
            f"nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    return path


def pad(rows: list[list[int]], value: int) -> Tensor:
    """Right-pad int lists to the longest one: (B, T)."""
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


class Task(ABC):
    """A kind of supervised example: its fields, tokenisation, model class and metrics.

    `label_names` are the classes of a classification task (index = label id); other tasks ignore them.
    """

    fields: ClassVar[tuple[str, ...]]  # record fields, read from data.<field>_column
    auto_class: ClassVar[type]  # the transformers Auto class of the model this task trains

    def __init__(self, model_path: Path, max_length: int, label_names: list[str] | None = None,
                 length_key: str = "train.max_length"):
        self.model_path = model_path
        self.max_length = max_length
        self.length_key = length_key
        self.label_names = label_names
        # a prompt adapter's virtual tokens before the real ones: p in the inputs, k in the attention cache
        self.prompt_tokens = self.prefix_tokens = 0
        self.check_length()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # padding is masked out of attention and loss, so any token serves when none is declared
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def check_length(self, virtual: int = 0, method: str = "") -> None:
        """Raise a ValueError when max_length real tokens after `virtual` ones (a prompt adapter's) need more
        positions than the model has; checked up front, as they would fail deep in the position embeddings mid-run."""
        limit = getattr(AutoConfig.from_pretrained(self.model_path), "max_position_embeddings", None)
        needed = self.max_length + virtual
        if limit is None or needed <= limit:
            return
        where = f"the model's {limit} positions (max_position_embeddings in {self.model_path / 'config.json'})"
        if not virtual:
            raise ValueError(f"{self.length_key}={self.max_length} exceeds {where}: set {self.length_key}={limit} "
                             "or less")
        raise ValueError(f"{self.length_key}={self.max_length} real tokens after {method}'s {virtual} virtual tokens "
                         f"need {needed} positions, more than {where}: set {self.length_key}={limit - virtual} or "
                         "less, or lower method.num_virtual_tokens")

    def fit_prompt(self, model: DeltaModel) -> None:
        """Account for the active prompt adapter of `model` (if any): its virtual tokens take positions before the
        real ones (checked against the model's), and its input prompt shifts the labels the loss counts."""
        name = next((n for n in model.active if n in model.prompts), None)
        if name is None:
            self.prompt_tokens = self.prefix_tokens = 0
            return
        with torch.no_grad():  # one row's parts, as the engine assembles them for a batch
            rows = assemble([model.prompts[name]])
        self.prompt_tokens, self.prefix_tokens = rows.prompt_len[0], rows.prefix_len[0]
        self.check_length(self.prompt_tokens + self.prefix_tokens, model.prompts[name].method)

    def model_kwargs(self) -> dict:
        """Config options the task sets on the pretrained model (a head's labels), beyond its config.json."""
        return {}

    def build_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The pretrained model with the outputs this task needs, in `dtype`."""
        return self.auto_class.from_pretrained(self.model_path, **self.model_kwargs(), dtype=dtype)

    @abstractmethod
    def encode(self, records: list[dict]) -> list[dict]:
        """Token ids (and labels) for each record."""

    @abstractmethod
    def collate(self, examples: list[dict]) -> dict[str, Tensor]:
        """One padded batch of encoded examples."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Metrics over all `batches` (model already in eval mode, gradients off)."""

    def default_train_modules(self, model: nn.Module) -> list[str]:
        """Modules trained in full beside the deltas when the recipe names none."""
        return []

    @abstractmethod
    def loss_terms(self, examples: list[dict]) -> int:
        """How many terms the mean loss of a batch of these encoded examples averages over."""

    def _mask(self, ids: list[list[int]]) -> Tensor:
        return pad([[1] * len(row) for row in ids], 0)


class ClassificationTask(Task):
    """Sequence classification: text -> one of `label_names`, cross-entropy and accuracy."""

    fields = ("text", "label")

    def __init__(self, model_path: Path, max_length: int, label_names: list[str] | None = None,
                 length_key: str = "train.max_length"):
        if not label_names:
            raise ValueError("classification needs label names (model.labels, or labels in the data)")
        super().__init__(model_path, max_length, label_names, length_key)

    auto_class = AutoModelForSequenceClassification

    def model_kwargs(self) -> dict:
        """A new head with one output per label."""
        return {"num_labels": len(self.label_names), "id2label": dict(enumerate(self.label_names)),
                "label2id": {name: i for i, name in enumerate(self.label_names)}}

    def encode(self, records: list[dict]) -> list[dict]:
        """Truncated token ids and the int label of each text."""
        texts = [str(r["text"]) for r in records]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [{"input_ids": i, "label": r["label"]} for i, r in zip(ids, records)]

    def collate(self, examples: list[dict]) -> dict[str, Tensor]:
        """Padded ids, attention mask and labels."""
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": self._mask(ids),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Mean cross-entropy and accuracy per example."""
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            out = model(**batch)
            n = len(batch["labels"])
            loss_sum += out.loss.item() * n
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            count += n
        return {"loss": loss_sum / count, "accuracy": correct / count}

    def loss_terms(self, examples: list[dict]) -> int:
        """One cross-entropy term per example."""
        return len(examples)

    def default_train_modules(self, model: nn.Module) -> list[str]:
        """The head: every top-level child with parameters other than the pretrained body."""
        # Hugging Face task models are `<base_model_prefix>` plus head modules (BERT: classifier,
        # Llama: score, DistilBERT: pre_classifier + classifier), so no head name is hard-coded
        body = model.base_model_prefix
        return [
            name
            for name, child in model.named_children()
            if name != body and next(child.parameters(), None) is not None
        ]


class CausalLMTask(Task):
    """Instruction tuning: chat-formatted prompt and response, loss on the response tokens only."""

    fields = ("prompt", "response")

    auto_class = AutoModelForCausalLM

    def encode(self, records: list[dict]) -> list[dict]:
        """Chat-template token ids, labelled only on the assistant turn; drops fully truncated ones."""
        encoded = [self.encode_one(str(r["prompt"]), str(r["response"])) for r in records]
        kept = [e for e in encoded if any(y != IGNORE_INDEX for y in e["labels"])]
        if len(kept) < len(encoded):
            logger.warning(
                "dropped %d of %d examples whose response lies beyond max_length=%d",
                len(encoded) - len(kept),
                len(encoded),
                self.max_length,
            )
        return kept

    def encode_one(self, prompt: str, response: str) -> dict:
        """Ids of the whole chat and labels that are IGNORE_INDEX outside the response."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {self.model_path} has no chat template")
        user = [{"role": "user", "content": prompt}]
        head = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders the prompt differently once a response follows it")
        # tokenised in two pieces so that the label boundary is exact, whatever the tokenizer merges
        head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = self.tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        ids = (head_ids + tail_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(head_ids) + tail_ids)[: self.max_length]
        return {"input_ids": ids, "labels": labels}

    def collate(self, examples: list[dict]) -> dict[str, Tensor]:
        """Padded ids, attention mask, and labels padded with IGNORE_INDEX."""
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": self._mask(ids),
            "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
        }

    @property
    def first_counted(self) -> int:
        """The first label a loss counts: the model shifts labels by one, so an example's first label counts
        only when virtual tokens in the inputs (labelled IGNORE_INDEX) come before it."""
        return 0 if self.prompt_tokens else 1

    def loss_terms(self, examples: list[dict]) -> int:
        """One term per labelled token the model's shifted loss sees."""
        return sum(sum(y != IGNORE_INDEX for y in e["labels"][self.first_counted:]) for e in examples)

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Mean loss per response token, and its perplexity."""
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            n = (batch["labels"][:, self.first_counted:] != IGNORE_INDEX).sum().item()
            loss_sum += model(**batch).loss.item() * n
            tokens += n
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(loss)}


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "causal_lm": CausalLMTask}
