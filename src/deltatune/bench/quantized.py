"""LoRA r=16 on every linear layer of a causal LM over fp32, bf16, int8 and NF4 bases, beside PEFT's QLoRA.

One cell per model. Contenders: deltatune on each base (`deltatune.quantize` of the loaded model, LoRA adapters
in fp32) and PEFT 0.21 on the int8 / NF4 bases as its users build them (transformers' `BitsAndBytesConfig`
loading, then `get_peft_model`). Steps are timed round-robin (measure.interleaved_times), so machine load hits
every contender alike; ratios are per round. Memory has two parts, both measured:

- held: the bytes of the distinct tensor storages the contender keeps between steps (weights with bitsandbytes'
  packed bytes and block scales, adapter, AdamW state), so packed 4-bit weights count as what they take. The
  process's RSS growth over the build and first step is kept beside it, but in one process it cannot be pinned on
  one contender: it also holds what the process sets up once (kernels, thread pools) and heap pages that freed
  temporaries leave behind (PEFT's from_pretrained shows +400 MiB over its tensors on SmolLM2). The RSS given back
  when a contender is deleted was tried too and was worse: freed pages return only at the next malloc_trim, to
  whichever deletion comes first.
- step peak: the step's peak RSS above the level before it (measure.PeakRSS, as the rest of `deltatune bench`).

Training peak = held + step peak. Quality: perplexity on held-out Chatterbot answers after the same short
training (same batches, seed, schedule) from each contender's freshly initialised adapter.

Bases whose `steps` are off (`BenchConfig.resident_only`) are built and weighed but not stepped: on a CPU without
native bf16 (AVX2 only) a bf16 matmul runs tens of times slower than fp32 (`bf16_matmul_slowdown` measures it),
so a bf16 step there measures the emulation, not the method.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.training.chunked_loss import chunked_causal_lm_loss

from . import cases, measure

BASES = ("fp32", "bf16", "int8", "nf4")
SCHEMES = {"int8": "int8", "nf4": "nf4"}  # base -> deltatune.quantize scheme (fp32 / bf16 are float bases)
LORA = {"r": 16, "alpha": 32}


@dataclass(frozen=True)
class Contender:
    label: str  # "deltatune nf4", "peft nf4", ...
    side: str  # "deltatune" or "peft"
    base: str  # one of BASES
    dtype: torch.dtype  # the float dtype of everything not quantized, and the 4-bit compute dtype
    steps: bool = True  # False: built and weighed only (see the module docstring)
    checkpointing: bool = False  # gradient checkpointing of the blocks (both sides alike)
    chunked_loss: int | None = None  # tokens per chunk of the loss (training/chunked_loss.py; both sides alike)


def contenders(bases: list[str], quantized_dtype: torch.dtype, peft: bool, resident_only: list[str],
               checkpointing: bool = False, chunked_loss: int | None = None) -> list[Contender]:
    """deltatune on every base, PEFT beside it on the quantized ones.

    With `checkpointing`, every contender but the plain fp32 LoRA (the reference) checkpoints its blocks, and a
    "deltatune fp32 ckpt" row shows what checkpointing alone buys; `chunked_loss` goes to the same contenders (to
    all but the reference when checkpointing is off)."""
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        raise ValueError(f"unknown base {unknown[0]!r}: choose from {list(BASES)}")
    out = []
    for base in bases:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(base, quantized_dtype)
        sides = ("deltatune", "peft") if peft and base in SCHEMES else ("deltatune",)
        steps = base not in resident_only
        if base == "fp32":
            out.append(Contender("deltatune fp32", "deltatune", base, dtype, steps))
            if checkpointing:
                out.append(Contender("deltatune fp32 ckpt", "deltatune", base, dtype, steps, True, chunked_loss))
            continue
        out += [Contender(f"{side} {base}", side, base, dtype, steps, checkpointing, chunked_loss) for side in sides]
    return out


def _bnb_config(base: str, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def build(case: cases.Case, who: Contender) -> nn.Module:
    """The contender's model with a fresh LoRA r=16 on every linear layer of the blocks (lm_head stays frozen)."""
    targets = case.targets["all_linear"]
    torch.manual_seed(0)
    if who.side == "peft":
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(case.path, dtype=who.dtype, device_map="cpu",
                                                     quantization_config=_bnb_config(who.base, who.dtype))
        if who.checkpointing:  # non-reentrant, as deltatune's (positional: the keyword's name changed in v5)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=targets)
        return peft.get_peft_model(model, config)
    model = copy.deepcopy(case.model).to(who.dtype)
    if who.base in SCHEMES:
        # one layer at a time: each float weight is freed as its packed copy is made
        dt.quantize(model, SCHEMES[who.base], compute_dtype=who.dtype)
    dm = dt.inject(model, dt.LoRAConfig(targets=targets, **LORA))
    if who.checkpointing:
        dt.enable_gradient_checkpointing(dm)
    return dm


def _trim() -> None:
    gc.collect()
    if measure.LIBC is not None:
        measure.LIBC.malloc_trim(ctypes.c_size_t(0))


def tensor_mib(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Bytes of the distinct tensor storages the model and its optimizer state hold (a cross-check of RSS)."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():  # bitsandbytes keeps 4-bit block scales beside the weight
        state = getattr(p, "quant_state", None)
        tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)] if state is not None else []
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**20


@dataclass
class Built:
    model: nn.Module
    step: Callable[[], None]
    optimizer: torch.optim.Optimizer
    initial: dict[str, torch.Tensor]  # the adapter as initialised, put back before the quality run
    build_rss_mib: float  # RSS growth over the build and first step
    tensor_mib: float
    build_s: float
    trainable: int


def build_and_weigh(case: cases.Case, who: Contender) -> Built:
    """Build one contender and take one step, measuring the RSS this adds."""
    _trim()
    before = measure.rss()
    t0 = time.perf_counter()
    model = build(case, who).train()
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        if who.chunked_loss:
            chunked_causal_lm_loss(model, case.batch, who.chunked_loss).backward()
        else:
            model(**case.batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if who.steps:
        step()  # AdamW's state exists from here on: it is part of what training holds
    _trim()
    return Built(model, step, optimizer, initial, (measure.rss() - before) / 2**20, tensor_mib(model, optimizer),
                 build_s, sum(p.numel() for p in params))


def bf16_matmul_slowdown(rows: int = 512, d: int = 896, out: int = 4864, repeats: int = 3) -> float:
    """bf16 / fp32 time of one (rows x d) @ (d x out) matmul here (median of `repeats`): near 1 (or below) with
    native bf16."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, d, dtype=dtype), torch.randn(d, out, dtype=dtype)
        a @ b
        times[dtype] = statistics.median(_seconds(lambda a=a, b=b: a @ b) for _ in range(repeats))
    return times[torch.bfloat16] / times[torch.float32]


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _restore(built: Built) -> None:
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if n in built.initial:
                p.copy_(built.initial[n])


def quantized_cell(case: cases.Case, bases: list[str], quantized_dtype: torch.dtype, rounds: int, warmup: int,
                   memory_rounds: int, peft: bool, resident_only: list[str], log: Callable[[str], None],
                   checkpointing: bool = False, chunked_loss: int | None = None) -> dict[str, Any]:
    """Build every contender, time and weigh their steps interleaved, then train each alike and score it."""
    who = contenders(bases, quantized_dtype, peft, resident_only, checkpointing, chunked_loss)
    built: dict[str, Built] = {}
    for c in who:
        built[c.label] = build_and_weigh(case, c)
        b = built[c.label]
        log(f"{case.name:10s} built {c.label:16s} in {b.build_s:.0f} s: RSS +{b.build_rss_mib:.0f} MiB "
            f"(tensors {b.tensor_mib:.0f})")
    stepping = {c.label: built[c.label].step for c in who if c.steps}
    cpu = torch.device("cpu")
    times = measure.interleaved_times(stepping, rounds, warmup, cpu)
    peak_rounds = measure.peak_samples(stepping, memory_rounds, cpu)
    peaks = {k: statistics.median(v) / 2**20 for k, v in peak_rounds.items()}
    cell: dict[str, Any] = {
        "model": case.name, "lora": {**LORA, "targets": case.targets["all_linear"]},
        "quantized_dtype": str(quantized_dtype).removeprefix("torch."),
        "contenders": {c.label: {"side": c.side, "base": c.base, "dtype": str(c.dtype).removeprefix("torch."),
                                 "stepped": c.steps, "checkpointing": c.checkpointing,
                                 "chunked_loss": c.chunked_loss, "trainable": built[c.label].trainable,
                                 "build_s": built[c.label].build_s, "build_rss_mib": built[c.label].build_rss_mib,
                                 "tensor_mib": built[c.label].tensor_mib} for c in who},
        "time_s": {k: measure.spread(v) for k, v in times.items()}, "step_peak_mib": peaks,
        "step_peak_rounds_mib": {k: [round(b / 2**20, 1) for b in v] for k, v in peak_rounds.items()}, "ratios": {}}
    if resident_only:
        cell["bf16_matmul_slowdown"] = bf16_matmul_slowdown()
    ref = "deltatune fp32"
    for k in times:
        if k != ref and ref in times:
            cell["ratios"][f"{k}/{ref} time"] = measure.ratio(times[k], times[ref])
        peer = k.replace("deltatune", "peft")
        if k.startswith("deltatune") and peer in times:
            cell["ratios"][f"{k}/{peer} time"] = measure.ratio(times[k], times[peer])
    if case.train:
        cell["quality"] = {"metric": case.metric, "steps": len(case.train), "lr": 3e-4}
        for c in who:
            if c.steps:
                _restore(built[c.label])
                cell["quality"][c.label] = cases.train_and_evaluate(built[c.label].model, case, 3e-4)
                log(f"{case.name:10s} {c.label:16s} perplexity {cell['quality'][c.label]:.3f}")
    cell["train_peak_mib"] = training_peaks(cell)
    log(cell_line(cell))
    del built, stepping
    _trim()
    return cell


def training_peaks(cell: dict[str, Any]) -> dict[str, float]:
    """Per stepped contender: what it holds between steps (its tensors) plus its step's peak."""
    return {k: cell["contenders"][k]["tensor_mib"] + v for k, v in cell["step_peak_mib"].items()}


def cell_line(cell: dict[str, Any]) -> str:
    peaks = training_peaks(cell)
    return f"{cell['model']:10s} " + ", ".join(
        f"{k} {cell['time_s'][k]['median']:.2f} s {peaks[k]:.0f} MiB" for k in cell["time_s"])


# --- what the issue asks of the NF4 base ----------------------------------------------------------------


def targets(cell: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(model, target, measured, met): NF4's training peak <= 0.4x fp32's (Qwen), and <= PEFT QLoRA's memory
    and time."""
    rows: list[tuple[str, str, str, bool]] = []
    peak, model = training_peaks(cell), cell["model"]
    nf4, fp32, qlora = "deltatune nf4", "deltatune fp32", "peft nf4"
    if nf4 in peak and fp32 in peak:
        r = peak[nf4] / peak[fp32]
        rows.append((model, "NF4 training peak <= 0.4x fp32 LoRA's", f"{r:.3f} ({peak[nf4]:.0f} / {peak[fp32]:.0f} MiB)",
                     r <= 0.4))
    if nf4 in peak and qlora in peak:
        rows.append((model, "NF4 training peak <= PEFT QLoRA's", f"{peak[nf4]:.0f} vs {peak[qlora]:.0f} MiB",
                     peak[nf4] <= peak[qlora]))
        r = cell["ratios"][f"{nf4}/{qlora} time"]["median"]
        rows.append((model, "NF4 step time <= PEFT QLoRA's (median ratio)", f"{r:.3f}", r <= 1.0))
    return rows


def _row(cell: dict[str, Any], k: str) -> str:
    from .report import _fmt_ratio

    c, q, peer = cell["contenders"][k], cell.get("quality", {}), k.replace("deltatune", "peft")
    cols = [k, f"{c['trainable']:,}"]
    held = f"{c['tensor_mib']:.0f} ({c['build_rss_mib']:+.0f})"
    if k in cell["time_s"]:
        peaks = training_peaks(cell)
        total, fp32 = peaks[k], peaks.get("deltatune fp32")
        cols += [f"{cell['time_s'][k]['median']:.2f}", _fmt_ratio(cell["ratios"].get(f"{k}/deltatune fp32 time")),
                 _fmt_ratio(cell["ratios"].get(f"{k}/{peer} time")), held,
                 f"{cell['step_peak_mib'][k]:.0f}", f"{total:.0f}", f"{total / fp32:.3f}" if fp32 else ""]
    else:
        cols += ["not run", "", "", held, "", "", ""]
    cols.append(f"{q[k]:.3f}" if k in q else "")
    return "| " + " | ".join(cols) + " |"


def markdown(cells: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the targets, then one table per model."""
    rows = [t for c in cells for t in targets(c)]
    lines = ["## Quantized bases: targets", "", "| model | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {m} | {t} | {v} | {'yes' if ok else '**no**'} |" for m, t, v, ok in rows] + [""]
    for cell in cells:
        q = cell.get("quality", {})
        lines += [f"## Quantized bases: {cell['model']} (LoRA r={cell['lora']['r']}, alpha {cell['lora']['alpha']}, "
                  f"every linear layer of the blocks; quantized bases: {cell['quantized_dtype']} compute and "
                  "non-quantized parts)", "",
                  "| contender | trainable | step s | vs deltatune fp32 | vs PEFT same base | held MiB "
                  "(RSS growth at build) | step peak MiB | training peak MiB | vs fp32 | perplexity |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(cell, k) for k in cell["contenders"]]
        ckpt = [k for k, c in cell["contenders"].items() if c.get("checkpointing")]
        if ckpt:
            lines += ["", f"Gradient checkpointing of the blocks (deltatune's `enable_gradient_checkpointing`, PEFT's "
                      f"model through `activation_checkpointing_enable`, both non-reentrant): {', '.join(ckpt)}. "
                      "`deltatune fp32` is the plain fp32 LoRA (no checkpointing), the reference of the ratios."]
        chunked = {k: c["chunked_loss"] for k, c in cell["contenders"].items() if c.get("chunked_loss")}
        if chunked:
            lines += ["", f"Chunked loss (`train.chunked_loss`: the lm_head and cross-entropy over chunks of "
                      f"{max(chunked.values())} tokens, recomputed in backward; PEFT's model through the same "
                      f"function): {', '.join(chunked)}."]
        if q:
            lines += ["", f"Perplexity on held-out Chatterbot answers after {q['steps']} steps (batch 4, lr {q['lr']})."]
        if "bf16_matmul_slowdown" in cell:
            lines += ["", f"Built and weighed only (not stepped): "
                      f"{', '.join(k for k, c in cell['contenders'].items() if not c['stepped'])}; a bf16 matmul "
                      f"runs {cell['bf16_matmul_slowdown']:.0f}x slower than fp32 on this CPU."]
        lines.append("")
    return lines
