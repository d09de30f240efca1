"""`deltatune prune CONFIG.yaml` and `deltatune compress`: compress a model and report what it cost.

`prune` runs a config (deltatune.compression.config): load the model and data, measure, apply the steps
in order, optionally recover with PERP, measure again, and write the model, its tokenizer, the resolved
config and report.json / report.md into one folder that appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from rich.console import Console
from torch import nn

from deltatune.compression.config import PruneConfig, load_prune_config, steps_help
from deltatune.compression.report import CompressionReport, accuracy, layer_sparsity, measure, perplexity
from deltatune.training.data import encode_labels, read_table, select_columns
from deltatune.training.tasks import TASKS, Task, resolve_model_path

console = Console(soft_wrap=True, markup=False)
RELOAD_PLAIN = "reload with transformers' from_pretrained"
RELOAD_PRUNED = "reload with deltatune.compression.structured.load_pruned(path) (shapes differ from config.json)"


# --- data ----------------------------------------------------------------------------------------
def text_records(source: str, text_column: str, label_column: str | None) -> list[dict]:
    """{"text"} (or {"text", "label"}) rows of a dataset; prompt/response rows become prompt + newline + response."""
    rows = read_table(source)
    if label_column is None and rows and text_column not in rows[0] and {"prompt", "response"} <= rows[0].keys():
        return [{"text": f"{r['prompt']}\n{r['response']}"} for r in rows]
    columns = {"text": text_column} | ({"label": label_column} if label_column else {})
    return select_columns(rows, columns, source)


def _shuffled_unique(records: list[dict], seed: int) -> list[dict]:
    """Records with distinct texts (first kept), in a seeded random order."""
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["text"], r)
    unique = list(first.values())
    return [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]


def split_held_out(calibration: list[dict], evaluation: list[dict] | None, n_eval: int, seed: int
                   ) -> tuple[list[dict], list[dict]]:
    """(calibration pool, held-out evaluation records) that share no text.

    With `evaluation` None both come from `calibration`: the first `n_eval` of a seeded shuffle are held
    out. Otherwise `n_eval` evaluation records are drawn, and calibration drops any text among them.
    """
    pool = _shuffled_unique(calibration, seed)
    if evaluation is None:
        if n_eval >= len(pool):
            raise ValueError(f"evaluation.n_texts={n_eval} leaves no calibration data out of {len(pool)} texts")
        return pool[n_eval:], pool[:n_eval]
    held_out = _shuffled_unique(evaluation, seed)[:n_eval]
    texts = {r["text"] for r in held_out}
    return [r for r in pool if r["text"] not in texts], held_out


def label_batches(task: Task, records: list[dict], seq_len: int, batch_size: int) -> list[dict]:
    """Padded, labelled batches of classification records."""
    ids = task.tokenizer([r["text"] for r in records], truncation=True, max_length=seq_len)["input_ids"]
    examples = [{"input_ids": i, "label": r["label"]} for i, r in zip(ids, records)]
    return [task.collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def load_prune_data(cfg: PruneConfig) -> tuple[list[dict] | None, list[dict] | None, list[str] | None]:
    """(calibration records, evaluation records, label names) with no text in both."""
    classify = cfg.model.task == "classification"
    cal, ev = cfg.calibration, cfg.evaluation
    read = {}
    for name, section in (("calibration", cal), ("evaluation", ev)):
        if section.dataset is not None:
            read[name] = text_records(section.dataset, section.text_column, section.label_column if classify else None)
    labels = cfg.model.labels
    if classify and read:
        everything = [r for records in read.values() for r in records]
        _, labels = encode_labels(everything, labels)  # one label order for both sets
        read = {name: encode_labels(records, labels)[0] for name, records in read.items()}
    if "calibration" not in read:
        held = _shuffled_unique(read["evaluation"], cfg.seed)[: ev.n_texts] if "evaluation" in read else None
        return None, held, labels
    shared = ev.dataset is None or ev.dataset == cal.dataset
    pool, held = split_held_out(read["calibration"], None if shared else read["evaluation"], ev.n_texts, cfg.seed)
    return pool, held, labels


def calibration_batches(cfg: PruneConfig, task: Task, records: list[dict]) -> list[dict]:
    c = cfg.calibration
    if cfg.model.task == "classification":
        return label_batches(task, records[: c.n_samples], c.seq_len, c.batch_size)
    from deltatune.compression.calibration import text_batches

    return text_batches(task.tokenizer, [r["text"] for r in records], n_samples=c.n_samples, seq_len=c.seq_len,
                        batch_size=c.batch_size, seed=cfg.seed)


# --- output --------------------------------------------------------------------------------------
def write_folder(out: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh folder beside `out`, then rename it into place (refusing a non-empty `out`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty; choose a new folder or set overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        if out.exists():  # moved aside, not deleted, until the new folder is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_compressed(out: Path, overwrite: bool, model: nn.Module, tokenizer: Any, report: CompressionReport,
                    extra: dict[str, str]) -> Path:
    """The model (safetensors), tokenizer, report.json, report.md and `extra` {file name: text} in `out`."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        (folder / "report.md").write_text(report.to_markdown(), encoding="utf-8")
        for name, text in extra.items():
            (folder / name).write_text(text, encoding="utf-8")

    return write_folder(out, overwrite, write)


# --- prune ---------------------------------------------------------------------------------------
class PruneRun:
    """One `deltatune prune` run: `setup()`, then `run()`, then `save()`."""

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def setup(self) -> None:
        """Data (calibration pool and held-out set), task, tokenizer and model."""
        cfg = self.cfg
        calibration, self.held_out, labels = load_prune_data(cfg)
        path = resolve_model_path(cfg.model.path)
        self.task = TASKS[cfg.model.task](path, cfg.calibration.seq_len, labels, length_key="calibration.seq_len")
        torch.manual_seed(cfg.seed)  # a classifier's new head starts the same in every run
        self.model = self.task.build_model().eval()
        self.batches = calibration_batches(cfg, self.task, calibration) if calibration is not None else None

    def quality(self) -> float | None:
        """The held-out metric: perplexity (causal LM) or accuracy (classifier); None without held-out data."""
        if self.held_out is None:
            return None
        ev = self.cfg.evaluation
        if self.cfg.model.task == "classification":
            return accuracy(self.model, label_batches(self.task, self.held_out, ev.seq_len, ev.batch_size))
        return perplexity(self.model, self.task.tokenizer, [r["text"] for r in self.held_out], seq_len=ev.seq_len,
                          batch_size=ev.batch_size)

    def run(self) -> CompressionReport:
        """Measure, compress step by step, recover if asked, measure again."""
        cfg, start = self.cfg, time.perf_counter()
        before, quality = measure(self.model), {}
        if (q := self.quality()) is not None:
            quality["before"] = q
        summaries = [step.apply(self.model, self.batches) for step in cfg.steps]
        if (q := self.quality()) is not None:
            quality["after"] = q
        if cfg.recover.steps:
            from deltatune.compression.recovery import perp_recover

            r = cfg.recover
            self.model = perp_recover(self.model, self.batches, steps=r.steps, lr=r.lr, rank=r.rank, seed=cfg.seed)
            summaries.append(f"PERP recovery: {r.steps} steps, lr {r.lr}, rank {r.rank}")
            if (q := self.quality()) is not None:
                quality["after recovery"] = q
        notes = [f"Held-out {self._metric()} on {len(self.held_out)} texts never used for calibration."
                 if self.held_out else "No evaluation data: quality not measured.",
                 f"Model: {self.reload_hint()}.", f"Wall time {time.perf_counter() - start:.1f} s."]
        if any(step.method in ("magnitude", "wanda", "gblm") for step in cfg.steps):
            notes.append("Zeroed weights are still stored and multiplied densely: unstructured sparsity lowers the "
                         "non-zero count, not size on disk or FLOPs (2:4 patterns can use sparse kernels).")
        return CompressionReport(cfg.model.path, before, measure(self.model), summaries, self._metric(), quality,
                                 layer_sparsity(self.model), notes)

    def reload_hint(self) -> str:
        reshaped = any(step.method in ("heads", "channels", "lowrank") for step in self.cfg.steps)
        return RELOAD_PRUNED if reshaped else RELOAD_PLAIN

    def _metric(self) -> str:
        return "accuracy" if self.cfg.model.task == "classification" else "perplexity"

    def save(self, report: CompressionReport) -> Path:
        extra = {"prune_config.yaml": self.cfg.to_yaml()}
        return save_compressed(self.cfg.output_path, self.cfg.output.overwrite, self.model, self.task.tokenizer,
                               report, extra)


def cmd_prune(args: argparse.Namespace) -> int:
    """Compress a model as a prune config says and report parameters, sparsity, size and quality."""
    from deltatune.cli.main import _recipe_args  # main imports this module, so not at the top

    path, overrides = _recipe_args(args.items)
    if path is None:
        raise ValueError("give a prune config file, e.g. src/deltatune/recipes/prune_smollm2_wanda.yaml")
    cfg = load_prune_config(path, overrides)
    out = cfg.output_path
    if out.is_dir() and any(out.iterdir()) and not cfg.output.overwrite:  # before the slow part
        raise ValueError(f"output folder {out} is not empty; choose a new output.path or set output.overwrite=true")
    run = PruneRun(cfg)
    run.setup()
    console.print(f"{cfg.name}: {len(cfg.steps)} steps on {cfg.model.path} ({cfg.model.task})")
    report = run.run()
    console.print(report.to_table())
    for i, summary in enumerate(report.steps, 1):
        console.print(f"{i}. {summary}")
    run.save(report)
    console.print(f"compressed model and report written to {out}; {run.reload_hint()}")
    return 0


# --- compress ------------------------------------------------------------------------------------
def load_hf_model(path: Path) -> nn.Module:
    """A Hugging Face model in float32, of the class its config.json names."""
    config = transformers.AutoConfig.from_pretrained(path)
    name = (config.architectures or [""])[0]
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise ValueError(f"{path}/config.json names no transformers architecture ({name!r})")
    return model_class.from_pretrained(path, dtype=torch.float32).eval()


def _tokenizer(path: Path) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a bare checkpoint: the output is still a loadable model
        return None


def compress_lowrank(args: argparse.Namespace) -> int:
    from deltatune.compression.lowrank import factorize

    path = resolve_model_path(args.model)
    model = load_hf_model(path)
    before = measure(model)
    low = factorize(model, args.targets, rank=args.lowrank_rank, energy=args.lowrank_energy, exclude=args.exclude)
    low.require_change(args.lowrank_rank, args.lowrank_energy)  # an unchanged model is never what was asked
    report = CompressionReport(args.model, before, measure(model), [low.to_markdown().splitlines()[0]],
                               notes=[low.to_markdown(), f"Model: {RELOAD_PRUNED}."])
    save_compressed(Path(args.out), args.overwrite, model, _tokenizer(path), report, {})
    console.print(report.to_table())
    console.print(report.steps[0])
    console.print(f"factorised model written to {args.out}; {RELOAD_PRUNED}")
    return 0


def compress_compeft(args: argparse.Namespace) -> int:
    from deltatune.merging.compeft import compress_delta

    report = compress_delta(args.base, args.model, args.out, density=args.compeft, alpha=args.alpha,
                            overwrite=args.overwrite)
    console.print(report.to_markdown().splitlines()[0])
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Low-rank factorise a model's linear layers, or ComPEFT-compress a fine-tuning delta."""
    if args.compeft is None:
        if args.base is not None:
            raise ValueError("--base is only read by --compeft")
        return compress_lowrank(args)
    if args.targets or args.exclude:
        raise ValueError("--targets/--exclude choose layers to factorise; --compeft compresses every changed tensor")
    return compress_compeft(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `prune` and `compress` on the `deltatune` subcommand parser."""
    steps = "\n".join(["step methods (each step's `method:`):", *(f"  {line}" for line in steps_help())])
    about = f"{cmd_prune.__doc__} Example config: src/deltatune/recipes/prune_smollm2_wanda.yaml"
    p = sub.add_parser("prune", help=cmd_prune.__doc__, description=textwrap.fill(about, 100), epilog=steps,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog is a table
    p.add_argument("items", nargs="+", metavar="CONFIG|key=value",
                   help="a prune config .yaml, then key=value overrides (steps.0.sparsity=0.6)")
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser("compress", help=cmd_compress.__doc__, description=cmd_compress.__doc__)
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model folder or built-in model (smollm2, minilm); "
                   "with --compeft, the fine-tuned checkpoint or adapter folder")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--lowrank-rank", type=int, metavar="R", help="truncated SVD keeping R singular values")
    how.add_argument("--lowrank-energy", type=float, metavar="E",
                     help="truncated SVD keeping the fewest singular values with this fraction of ||W||_F^2")
    how.add_argument("--compeft", type=float, metavar="DENSITY",
                     help="ComPEFT: keep this fraction of each delta tensor as signs and one scale")
    p.add_argument("--base", help="with --compeft: the checkpoint MODEL was fine-tuned from")
    p.add_argument("--alpha", type=float, default=1.0, help="with --compeft: survivors get alpha * std(delta)")
    p.add_argument("--targets", nargs="+", help="layers to factorise (names, re:<regex>); default: all in the blocks")
    p.add_argument("--exclude", nargs="+", help="layers to leave dense")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(handler=cmd_compress)
