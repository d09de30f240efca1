"""The benchmark matrix: methods x models, deltatune beside PEFT and the frozen floor, in one process.

Per (model, method) cell: trainable parameters, adapter size on disk, train-step time and step peak memory
(floor, deltatune, PEFT interleaved A B C A B C, ratios per round), and task quality after a short training
run on held-out data. Per model: inference (base, merged, unmerged, mixed batches of 8 and 16 adapters,
deltatune and PEFT interleaved) and, with `compile`, compiled and eager train steps. Results: JSON,
Markdown and PNG plots (report.py).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt

from . import cases, measure
from .peers import PEERS, PROMPT_METHODS, our_config, peer
from .quantized import quantized_cell

DEFAULT_METHODS = [m for m in PEERS if m not in PROMPT_METHODS]  # prompt methods: by --methods
LM_METHODS = ["lora", "lora_dropout", "dora", "ia3", "vera", "full"]  # SmolLM2: the targets' methods and more


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["minilm", "smollm2"])  # qwen_coder: an extra 478 MB asset
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lm_methods: list[str] | None = field(default_factory=lambda: list(LM_METHODS))  # None: same as methods
    rounds: int = 10
    warmup: int = 2
    memory_rounds: int = 3
    quality_steps: dict[str, int] = field(default_factory=lambda: {"minilm": 63, "smollm2": 20, "qwen_coder": 10})
    eval_rows: dict[str, int] = field(default_factory=lambda: {"minilm": 1000, "smollm2": 64, "qwen_coder": 32})
    infer_rounds: int = 10
    mixed: list[int] = field(default_factory=lambda: [8, 16])
    mixed_rank: int = 8
    compile: bool = False
    compile_models: list[str] = field(default_factory=lambda: ["minilm"])  # inductor takes minutes per model
    peft: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "bench_results"
    quick: bool = False
    update: bool = False  # rerun these train cells into the results in `out`, keep the rest, fill missing models
    inference: bool = True  # the per-model inference cell
    # quantized bases (bench/quantized.py), on the causal LMs only: LoRA r=16 on all linear layers over these
    bases: list[str] = field(default_factory=list)
    quantized_dtype: str = "float32"  # int8/NF4 bases: compute dtype and dtype of what is not quantized
    resident_only: list[str] = field(default_factory=list)  # bases built and weighed, not stepped
    checkpointing: bool = False  # quantized bases: checkpoint every contender's blocks but the fp32 reference
    chunked_loss: int | None = None  # quantized bases: the same contenders' loss over chunks of this many tokens
    lm_length: dict[str, int] = field(default_factory=dict)  # LM -> sequence length of its batches (default 128)


def quick_config(**overrides: Any) -> BenchConfig:
    """Minutes on 2 CPU cores: MiniLM, the three target methods, few rounds, a short quality run."""
    base = BenchConfig(models=["minilm"], methods=["lora", "lora_dropout", "dora"], lm_methods=None, rounds=4,
                       warmup=1, memory_rounds=2, quality_steps={"minilm": 40, "smollm2": 8, "qwen_coder": 4},
                       eval_rows={"minilm": 300, "smollm2": 32, "qwen_coder": 16}, infer_rounds=4, quick=True)
    for k, v in overrides.items():
        setattr(base, k, v)
    return base


def environment(cfg: BenchConfig) -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "deltatune": dt.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine(), "cores": os.cpu_count(),
           "device": cfg.device, "dtype": cfg.dtype, "date": time.strftime("%Y-%m-%d %H:%M")}
    if cfg.peft:
        import peft

        env["peft"] = peft.__version__
    if cfg.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def _peft_model(base: nn.Module, config: Any, head: list[str], name: str = "default") -> nn.Module:
    from peft import get_peft_model

    if head:
        config.modules_to_save = list(head)
    return get_peft_model(copy.deepcopy(base), config, adapter_name=name)


def _contenders(case: cases.Case, method: str, head: bool, with_peft: bool = True
                ) -> tuple[nn.Module, nn.Module | None, str]:
    """(deltatune model, peer model or None, peer label) for one cell, on fresh copies of the base.

    with_peft=False: no PEFT model is built (nor PEFT imported); full fine-tuning keeps its plain-torch peer.
    """
    p = peer(method)
    torch.manual_seed(0)
    # PEFT's prompt learning on sequence classification always trains the head: so does ours, to time the same work
    train_modules = case.head if head or (p.role == "model" and p.peft is not None and with_peft) else None
    ours = dt.inject(copy.deepcopy(case.model), our_config(p, case), train_modules=train_modules)
    torch.manual_seed(0)
    if method == "full":
        theirs = copy.deepcopy(case.model).requires_grad_(True)
        return ours, theirs, "torch"
    if p.peft is None or not with_peft:
        return ours, None, ""
    peer_config = p.peft(case.targets.get(p.role, []), case)  # role "model": prompt methods take no targets
    return ours, _peft_model(case.model, peer_config, case.head if head else []), "peft"


def adapter_bytes(ours: dt.DeltaModel, theirs: nn.Module | None, label: str) -> tuple[int, int | None]:
    with tempfile.TemporaryDirectory() as tmp:
        ours.save(Path(tmp) / "ours")
        mine = _dir_bytes(Path(tmp) / "ours")
        if label != "peft":
            return mine, None
        theirs.save_pretrained(Path(tmp) / "peft")
        return mine, _dir_bytes(Path(tmp) / "peft")


def train_cell(case: cases.Case, method: str, cfg: BenchConfig, floor: Any, log: Any) -> dict[str, Any]:
    device = torch.device(cfg.device)
    ours, theirs, label = _contenders(case, method, head=False, with_peft=cfg.peft)
    steps = {"floor": floor, "deltatune": cases.train_step(ours.train(), case.batch)}
    if theirs is not None:
        steps[label] = cases.train_step(theirs.train(), case.batch)
    times = measure.interleaved_times(steps, cfg.rounds, cfg.warmup, device)
    peaks = measure.interleaved_peaks(steps, cfg.memory_rounds, device)
    cell: dict[str, Any] = {"model": case.name, "method": method, "peer": label,
                            "trainable": {"deltatune": ours.trainable_parameters()},
                            "time_s": {k: measure.spread(v) for k, v in times.items()},
                            "step_peak_mib": peaks,
                            "ratios": {"deltatune/floor time": measure.ratio(times["deltatune"], times["floor"])}}
    size, peer_size = adapter_bytes(ours, theirs, label)
    cell["adapter_bytes"] = {"deltatune": size}
    if theirs is not None:
        cell["trainable"][label] = _count(theirs)
        cell["ratios"][f"deltatune/{label} time"] = measure.ratio(times["deltatune"], times[label])
        cell["ratios"][f"{label}/floor time"] = measure.ratio(times[label], times["floor"])
        if peer_size is not None:
            cell["adapter_bytes"][label] = peer_size
    del ours, theirs, steps
    gc.collect()
    if case.train:
        cell["quality"] = {"metric": case.metric, "steps": len(case.train), "lr": peer(method).lr}
        ours, theirs, label = _contenders(case, method, head=True, with_peft=cfg.peft)
        cell["quality"]["deltatune"] = cases.train_and_evaluate(ours, case, peer(method).lr)
        if theirs is not None:
            cell["quality"][label] = cases.train_and_evaluate(theirs, case, peer(method).lr)
        del ours, theirs
        gc.collect()
    log(_cell_line(cell))
    return cell


def _cell_line(cell: dict[str, Any]) -> str:
    t = cell["time_s"]
    parts = [f"{cell['model']:8s} {cell['method']:13s} step {t['deltatune']['median']:.3f}s"]
    if cell["peer"] in t:
        r = cell["ratios"][f"deltatune/{cell['peer']} time"]["median"]
        parts.append(f"vs {cell['peer']} {r:.3f}x")
    parts.append(f"vs floor {cell['ratios']['deltatune/floor time']['median']:.3f}x")
    m = cell["step_peak_mib"]
    parts.append("memory above floor " + ", ".join(f"{k} {m[k] - m['floor']:.0f}" for k in m if k != "floor") + " MiB")
    if "quality" in cell:
        q = cell["quality"]
        parts.append(f"{q['metric']} " + ", ".join(f"{k} {q[k]:.3f}" for k in q if k not in ("metric", "steps", "lr")))
    return "  ".join(parts)


# --- inference -----------------------------------------------------------------------------------------


def _inference_inputs(case: cases.Case, rows: int) -> dict[str, torch.Tensor]:
    batch = {k: v for k, v in case.batch.items() if k != "labels"}
    n = next(iter(batch.values())).shape[0]
    reps = -(-rows // n)
    return {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:rows] for k, v in batch.items()}


def inference_cell(case: cases.Case, cfg: BenchConfig, log: Any) -> dict[str, Any]:
    """Forward time of one batch: base, merged, unmerged single adapter, mixed batches (LoRA r=8 on q/v)."""
    device = torch.device(cfg.device)
    n_adapters = max(cfg.mixed) if cfg.mixed else 1
    rows = max(32, n_adapters * 2) if case.name == "minilm" else max(16, n_adapters)
    inputs = _inference_inputs(case, rows)
    targets = case.targets["attention"]
    r = cfg.mixed_rank
    gen = torch.Generator().manual_seed(0)

    def lora() -> dt.LoRAConfig:
        return dt.LoRAConfig(r=r, alpha=2 * r, targets=targets)

    names = [f"a{i}" for i in range(n_adapters)]
    ours = dt.inject(copy.deepcopy(case.model), lora(), name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, lora())
    with torch.no_grad():  # trained-looking adapters: B != 0 everywhere
        for p_ in ours.parameters():
            if p_.requires_grad:
                p_.copy_(torch.randn(p_.shape, generator=gen).to(p_) * 0.02)
    ours.set_active(names[0])
    merged = dt.inject(copy.deepcopy(case.model), lora(), name=names[0])
    merged.load_state_dict(ours.state_dict(), strict=False)
    merged.merge()
    fns: dict[str, Any] = {"base": lambda: case.model(**inputs), "deltatune merged": lambda: merged(**inputs),
                           "deltatune unmerged": lambda: ours(**inputs)}
    theirs = None
    if cfg.peft:
        from peft import LoraConfig

        def peft_lora() -> LoraConfig:
            return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)

        theirs = _peft_model(case.model, peft_lora(), [], names[0])
        for name in names[1:]:
            theirs.add_adapter(name, peft_lora())
        with torch.no_grad():
            for n_, p_ in theirs.named_parameters():
                if "lora_" in n_:
                    p_.copy_(torch.randn(p_.shape, generator=gen).to(p_) * 0.02)
        theirs.set_adapter(names[0])
        fns["peft unmerged"] = lambda: theirs(**inputs)
    for k in cfg.mixed:
        route = [names[i % k] for i in range(rows)]
        fns[f"deltatune mixed {k}"] = lambda route=route: ours(**inputs, adapter_names=route)
        if theirs is not None:
            fns[f"peft mixed {k}"] = lambda route=route: theirs(**inputs, adapter_names=route)
    for m in (case.model, ours, merged) + ((theirs,) if theirs is not None else ()):
        m.eval()
    with torch.no_grad():
        times = measure.interleaved_times(fns, cfg.infer_rounds, cfg.warmup, device)
    cell = {"model": case.name, "rows": rows, "rank": r, "adapters": n_adapters,
            "time_s": {k: measure.spread(v) for k, v in times.items()},
            "rows_per_s": {k: rows / measure.spread(v)["median"] for k, v in times.items()},
            "ratios": {"merged/base": measure.ratio(times["deltatune merged"], times["base"]),
                       "deltatune unmerged/base": measure.ratio(times["deltatune unmerged"], times["base"])}}
    if theirs is not None:
        cell["ratios"]["deltatune/peft unmerged"] = measure.ratio(times["deltatune unmerged"], times["peft unmerged"])
        cell["ratios"]["peft unmerged/base"] = measure.ratio(times["peft unmerged"], times["base"])
    for k in cfg.mixed:
        cell["ratios"][f"deltatune mixed {k}/single"] = measure.ratio(times[f"deltatune mixed {k}"],
                                                                      times["deltatune unmerged"])
        if theirs is not None:
            cell["ratios"][f"peft mixed {k}/single"] = measure.ratio(times[f"peft mixed {k}"], times["peft unmerged"])
            cell["ratios"][f"deltatune/peft mixed {k}"] = measure.ratio(times[f"deltatune mixed {k}"],
                                                                        times[f"peft mixed {k}"])
    log(f"{case.name:8s} inference " + ", ".join(f"{k} {v['median']:.3f}" for k, v in cell["ratios"].items()))
    return cell


# --- torch.compile -------------------------------------------------------------------------------------


def graph_breaks(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**batch).graph_break_count


def compile_cell(case: cases.Case, cfg: BenchConfig, log: Any) -> dict[str, Any]:
    """LoRA train steps, eager and torch.compile'd (inductor), deltatune and PEFT, interleaved."""
    device = torch.device(cfg.device)
    ours, theirs, _ = _contenders(case, "lora", head=False, with_peft=cfg.peft)
    ours.train()
    breaks = {"deltatune": graph_breaks(ours, case.batch)}
    models = {"deltatune eager": ours, "deltatune compiled": torch.compile(ours)}
    if cfg.peft:
        theirs.train()
        breaks["peft"] = graph_breaks(theirs, case.batch)
        models |= {"peft eager": theirs, "peft compiled": torch.compile(theirs)}
    torch._dynamo.reset()
    steps = {k: cases.train_step(m, case.batch) for k, m in models.items()}
    t0 = time.perf_counter()
    for step in steps.values():  # compiles (forward and backward graphs)
        step()
    compile_s = time.perf_counter() - t0
    times = measure.interleaved_times(steps, cfg.rounds, cfg.warmup, device)
    cell = {"model": case.name, "method": "lora", "graph_breaks": breaks, "first_steps_s": compile_s,
            "time_s": {k: measure.spread(v) for k, v in times.items()},
            "ratios": {"deltatune compiled/eager": measure.ratio(times["deltatune compiled"], times["deltatune eager"])}}
    if cfg.peft:
        cell["ratios"]["deltatune/peft compiled"] = measure.ratio(times["deltatune compiled"], times["peft compiled"])
        cell["ratios"]["peft compiled/eager"] = measure.ratio(times["peft compiled"], times["peft eager"])
    log(f"{case.name:8s} compile  breaks {breaks}, " + ", ".join(f"{k} {v['median']:.3f}" for k, v in cell["ratios"].items()))
    return cell


# --- the run -------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, log: Any = print, command: str = "deltatune bench") -> dict[str, Any]:
    """Run the matrix and write bench.json, bench.md and the plots under cfg.out; return the results."""
    from .report import write

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    results: dict[str, Any] = {"command": command, "config": asdict(cfg), "env": environment(cfg), "train": [],
                               "inference": [], "compile": [], "quantized": []}
    if cfg.update:
        results = _previous(out)
        results.setdefault("updates", []).append({"command": command, "date": environment(cfg)["date"],
                                                  "cells": [f"{m} {x}" for m in cfg.models for x in cfg.methods]})
    for name in cfg.models:
        case = cases.load(name, cfg.quality_steps.get(name, 0), cfg.eval_rows.get(name, 0), cfg.lm_length.get(name))
        case.to(torch.device(cfg.device), dtype)
        case.model.train()
        floor = cases.floor_step(case.model, case.batch)
        methods = cfg.methods if name == "minilm" or cfg.lm_methods is None else cfg.lm_methods
        for kind in ("inference", "compile"):  # --update --methods inference: measure that cell again
            if cfg.update and kind in methods:
                results[kind] = [c for c in results[kind] if c["model"] != name]
        methods = [m for m in methods if m not in ("inference", "compile")]
        for method in methods:
            cell = train_cell(case, method, cfg, floor, log)
            old = [i for i, c in enumerate(results["train"]) if (c["model"], c["method"]) == (name, method)]
            if old:
                results["train"][old[0]] = cell
            else:
                results["train"].append(cell)
            _save(out, results)
        if cfg.bases and case.metric == "perplexity":
            results.setdefault("quantized", []).append(quantized_cell(
                case, cfg.bases, getattr(torch, cfg.quantized_dtype), cfg.rounds, cfg.warmup, cfg.memory_rounds,
                cfg.peft, cfg.resident_only, log, cfg.checkpointing, cfg.chunked_loss))
            _save(out, results)
        have = lambda kind, name=name: any(c["model"] == name for c in results[kind])  # noqa: E731  (update: fill gaps)
        if cfg.inference and not have("inference"):
            results["inference"].append(inference_cell(case, cfg, log))
        if cfg.compile and name in cfg.compile_models and not have("compile"):
            results["compile"].append(compile_cell(case, cfg, log))
        write(results, out, results["command"])  # a later model's failure keeps this one's report (updates: the first command)
        del case, floor
        gc.collect()
    return results


def _previous(out: Path) -> dict[str, Any]:
    path = out / "bench.json"
    if not path.exists():
        raise ValueError(f"--update reruns cells into existing results, but {path} does not exist; "
                         "run without --update first")
    return json.loads(path.read_text())


def _save(out: Path, results: dict[str, Any]) -> None:
    from ..engine.atomic import atomic_write_text

    atomic_write_text(out / "bench.json", json.dumps(results, indent=1) + "\n")
