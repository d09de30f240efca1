"""The benchmark's real models and data: MiniLM + Rotten Tomatoes, SmolLM2-135M-Instruct and
Qwen2.5-Coder-0.5B-Instruct + Chatterbot Q/A.

Each case gives a base model, one timing batch of the issue's shape (MiniLM 32 x 64, the LMs 4 x 128), a
training stream and a held-out split for quality (accuracy, or perplexity of the chat-formatted answers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import assets

CASES = ("minilm", "smollm2", "qwen_coder")
# every linear layer of a Llama/Qwen2 block (PEFT's "all-linear" on them: lm_head is left out)
LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    name: str
    model: nn.Module  # the pretrained base, never trained: contenders deep-copy it
    batch: dict[str, torch.Tensor]  # the timing batch
    train: list[dict[str, torch.Tensor]]  # quality: training batches
    held_out: list[dict[str, torch.Tensor]]  # quality: evaluation batches
    targets: dict[str, list[str]]  # role -> module names: "attention" (q, v), "ia3" (k, v, FFN down), "ffn",
    # and for the LMs "all_linear"
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    head: list[str]  # new modules every classifier run trains in full (none for the LM)
    path: Path | None = None  # the HF folder the base came from (PEFT's quantized peers load it themselves)

    def to(self, device: torch.device, dtype: torch.dtype) -> Case:
        move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
        self.model.to(device=device, dtype=dtype)
        self.batch, self.train, self.held_out = move(self.batch), [move(b) for b in self.train], \
            [move(b) for b in self.held_out]
        return self


def _batches(enc: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(enc.values())).shape[0]
    return [{k: v[i:i + size] for k, v in enc.items()} for i in range(0, n - size + 1, size)]


def minilm(train_steps: int, eval_rows: int) -> Case:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = assets.minilm_path()
    torch.manual_seed(0)  # the new classifier head starts the same in every run
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = AutoTokenizer.from_pretrained(path)
    rows = assets.rotten_tomatoes()
    random.Random(0).shuffle(rows)  # the file is sorted by label

    def encode(part: list[dict]) -> dict[str, torch.Tensor]:
        enc = dict(tok([r["text"] for r in part], padding="max_length", truncation=True, max_length=64,
                       return_tensors="pt"))
        enc["labels"] = torch.tensor([r["label"] for r in part])
        return enc

    batch = encode(rows[:32])
    train = _batches(encode(rows[:32 * train_steps]), 32) if train_steps else []
    held = _batches(encode(rows[-eval_rows:]), 50) if eval_rows else []
    ffn_down = r"re:.*layer\.\d+\.output\.dense"
    return Case("minilm", model, batch, train, held, {"attention": ["query", "value"],
                "ia3": ["key", "value", ffn_down], "ffn": [ffn_down]}, "accuracy", ["classifier"])


def _chat_lm(name: str, path: Path, train_steps: int, eval_rows: int, length: int) -> Case:
    """A causal LM case: the timing batch is 4 x `length` tokens of Chatterbot text, quality the perplexity of
    chat-formatted Q/A pairs padded or cut to `length` (padding masked out of the labels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    rows = assets.chatterbot()
    random.Random(0).shuffle(rows)

    def encode(part: list[dict]) -> dict[str, torch.Tensor]:
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["response"]}], tokenize=False)
                 for r in part]
        enc = dict(tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return enc

    # the timing batch is full (no padding): by default the 4 x 128 tokens of real text
    text = " ".join(f"{r['prompt']} {r['response']}" for r in rows[:400])
    ids = tok(text, return_tensors="pt")["input_ids"][0, :4 * length].view(4, length)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train = _batches(encode(rows[:4 * train_steps]), 4) if train_steps else []
    held = _batches(encode(rows[-eval_rows:]), 8) if eval_rows else []
    return Case(name, model, batch, train, held, {"attention": ["q_proj", "v_proj"],
                "ia3": ["k_proj", "v_proj", "down_proj"], "ffn": ["down_proj"], "all_linear": list(LM_LINEAR)},
                "perplexity", [], path)


def smollm2(train_steps: int, eval_rows: int, length: int = 128) -> Case:
    return _chat_lm("smollm2", assets.smollm2_path(), train_steps, eval_rows, length)


def qwen_coder(train_steps: int, eval_rows: int, length: int = 128) -> Case:
    """Qwen2.5-Coder-0.5B-Instruct (630M parameters as loaded): the case where a quantized base's memory shows."""
    return _chat_lm("qwen_coder", assets.qwen_coder_path(), train_steps, eval_rows, length)


def load(name: str, train_steps: int = 0, eval_rows: int = 0, length: int | None = None) -> Case:
    """A case; `length`: the LMs' sequence length (default 128; MiniLM's batches are 32 x 64 always)."""
    if name not in CASES:
        raise ValueError(f"unknown benchmark model '{name}'; choose from {list(CASES)}")
    if name == "minilm":
        return minilm(train_steps, eval_rows)
    return {"smollm2": smollm2, "qwen_coder": qwen_coder}[name](train_steps, eval_rows, length or 128)


# --- steps ---------------------------------------------------------------------------------------------


def floor_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The frozen model's forward and backward to its input embeddings: no weight gradient at all."""
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    rest = {k: v for k, v in batch.items() if k != "input_ids"}

    def step() -> None:
        inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=inputs, **rest).loss.backward()

    return step


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-4) -> Callable[[], None]:
    """Forward, backward and AdamW on the parameters that require grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cycle(batches: list[dict]) -> Iterator[dict]:
    while True:
        yield from batches


def train_and_evaluate(model: nn.Module, case: Case, lr: float) -> float:
    """Train on `case.train` (AdamW, linear warmup over 10% then cosine decay) and score `case.held_out`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(case.train)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    model.train()
    for batch in case.train:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        if case.metric == "accuracy":
            right = sum((model(**b).logits.argmax(-1) == b["labels"]).sum().item() for b in case.held_out)
            return right / sum(b["labels"].numel() for b in case.held_out)
        nll = tokens = 0.0
        for b in case.held_out:
            n = (b["labels"][:, 1:] != -100).sum().item()
            nll += model(**b).loss.item() * n
            tokens += n
        return math.exp(nll / tokens)
