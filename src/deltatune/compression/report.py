"""What compression bought and cost: parameters, FLOPs, size on disk, per-layer sparsity, quality.

Quality is measured on held-out data by `perplexity` (causal LMs: exp of the token-weighted mean
negative log-likelihood) or `accuracy` (classifiers). FLOPs are counted per token for the matmuls of
the linear layers, 2 * d_in * d_out each (a multiply and an add per weight); attention scores, norms
and embedding lookups are left out, and zeros in a dense weight still cost their FLOPs (dense kernels
do not skip them), so unstructured sparsity shows up in the non-zero count, not in FLOPs or bytes.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from safetensors.torch import save_model
from torch import Tensor, nn

from deltatune.compression.layers import no_cache
from deltatune.compression.lowrank import LowRankLinear
from deltatune.engine.kinds import CONV1D, kind_of
from deltatune.training.tasks import IGNORE_INDEX, pad


def count_parameters(model: nn.Module) -> int:
    """All parameters; a tied (shared) weight counts once."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Parameters that are not exactly zero (what unstructured pruning lowers)."""
    return sum(int(torch.count_nonzero(p.detach()).item()) for p in model.parameters())


def matmul_flops(module: nn.Module) -> int:
    """Multiply-adds x 2 per token of one linear layer (0 for anything else)."""
    if isinstance(module, LowRankLinear):
        return 2 * module.rank * (module.in_features + module.out_features)
    if isinstance(module, nn.Linear) or kind_of(module) is CONV1D:
        return 2 * module.weight.numel()
    return 0


def flops_per_token(model: nn.Module) -> int:
    """FLOPs per token of all linear layers' matmuls."""
    return sum(matmul_flops(m) for m in model.modules())


def size_on_disk(model: nn.Module) -> int:
    """Bytes the model takes saved as safetensors (`save_pretrained` for Hugging Face models)."""
    with tempfile.TemporaryDirectory(prefix="deltatune-size-") as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            save_model(model, str(Path(tmp) / "model.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts: Iterable[str], *, seq_len: int = 128, batch_size: int = 8,
               max_texts: int | None = None) -> float:
    """exp(mean NLL per predicted token) of a causal LM over `texts`, each truncated to `seq_len` tokens.

    Every text is its own sequence; each of its tokens after the first is predicted from those before
    it, and the mean weights every token equally (not every text).
    """
    texts = list(texts)[:max_texts]
    ids = [row for row in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"] if len(row) > 1]
    if not ids:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    try:
        for i in range(0, len(ids), batch_size):
            rows = ids[i : i + batch_size]
            input_ids = pad(rows, 0).to(device)
            mask = pad([[1] * len(r) for r in rows], 0).to(device)
            targets = pad(rows, IGNORE_INDEX).to(device)[:, 1:]  # token t+1 is predicted at position t
            logits = model(input_ids=input_ids, attention_mask=mask, **no_cache(model)).logits[:, :-1]
            nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum().item())
    finally:
        model.train(was_training)
    return math.exp(nll / tokens)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> float:
    """Fraction of examples whose argmax logit is the label (batches carry `labels`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, count = 0, 0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            predicted = model(**inputs).logits.argmax(-1).cpu()
            correct += int((predicted == batch["labels"]).sum().item())
            count += len(batch["labels"])
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("accuracy needs at least one labelled example")
    return correct / count


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    nonzero: int
    flops_per_token: int
    bytes_on_disk: int


def measure(model: nn.Module) -> ModelStats:
    return ModelStats(count_parameters(model), count_nonzero(model), flops_per_token(model), size_on_disk(model))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else ""


def summarize_sparsity(sparsity: dict[str, float]) -> str:
    """'n layers: mean x, min y, max z' of a {layer: fraction of zeros} dict."""
    if not sparsity:
        return "no layer measured"
    values = list(sparsity.values())
    return (f"{len(values)} layers: mean {sum(values) / len(values):.3f}, "
            f"min {min(values):.3f}, max {max(values):.3f}")


@dataclass
class CompressionReport:
    """Before/after numbers of a compression run, as a rich table, markdown or a JSON-able dict."""

    model: str
    before: ModelStats
    after: ModelStats
    steps: list[str] = field(default_factory=list)
    metric: str = ""  # "perplexity" (lower is better) or "accuracy"
    quality: dict[str, float] = field(default_factory=dict)  # stage ("before", "after", ...) -> metric
    sparsity: dict[str, float] = field(default_factory=dict)  # layer -> fraction of zero weights
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(quantity, before, after, change) rows shared by the table and the markdown."""
        b, a = self.before, self.after
        rows = [
            ("parameters", f"{b.parameters:,}", f"{a.parameters:,}", _change(b.parameters, a.parameters)),
            ("non-zero parameters", f"{b.nonzero:,}", f"{a.nonzero:,}", _change(b.nonzero, a.nonzero)),
            ("linear FLOPs / token", f"{b.flops_per_token:,}", f"{a.flops_per_token:,}",
             _change(b.flops_per_token, a.flops_per_token)),
            ("size on disk", _mb(b.bytes_on_disk), _mb(a.bytes_on_disk), _change(b.bytes_on_disk, a.bytes_on_disk)),
        ]
        first = self.quality.get("before")
        later = {stage: value for stage, value in self.quality.items() if stage != "before"}
        if first is not None:  # one row per later stage, each against the model before compression
            rows += [(f"{self.metric} ({stage})", f"{first:.4f}", f"{value:.4f}", _change(first, value))
                     for stage, value in later.items()] or [(self.metric, f"{first:.4f}", "", "")]
        return rows

    def to_table(self) -> Table:
        table = Table(title=f"compression of {self.model}")
        for column in ("", "before", "after", "change"):
            table.add_column(column, justify="left" if not column else "right")
        for row in self.rows():
            table.add_row(*row)
        if self.sparsity:
            table.caption = f"sparsity per layer: {summarize_sparsity(self.sparsity)}"
        return table

    def to_markdown(self) -> str:
        lines = [f"# Compression of {self.model}", ""]
        lines += [f"{i}. {step}" for i, step in enumerate(self.steps, 1)] + [""]
        lines += ["| | before | after | change |", "|---|---:|---:|---:|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows()]
        if self.sparsity:
            lines += ["", f"Sparsity per layer ({summarize_sparsity(self.sparsity)}):", ""]
            lines += ["| layer | sparsity |", "|---|---:|"]
            lines += [f"| {name} | {value:.3f} |" for name, value in self.sparsity.items()]
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_sparsity(model: nn.Module, targets: Sequence[str] | None = None) -> dict[str, float]:
    """{layer: fraction of zero weights}, from `deltatune.compression.pruning.sparsity`; {} when no layer is left
    to measure (e.g. every linear layer of the blocks was factorised)."""
    from deltatune.compression.pruning import sparsity

    try:
        return {name: float(value) for name, value in sparsity(model, targets).items()}
    except ValueError:  # the default targets matched nothing prunable
        return {}
