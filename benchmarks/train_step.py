"""Train-step time and memory: deltatune LoRA vs PEFT LoRA vs the frozen floor, interleaved in one process.

The floor is the frozen model's forward + backward to its input embeddings (no weight gradients): the
cost that any method training adapters in every layer must pay. Each round runs floor, deltatune and
PEFT once (A B C A B C ...), so drift in machine load hits all three alike. Memory, measured in separate
interleaved rounds, is the step's peak resident memory above the resident memory just before the step
(activations, gradients, optimizer state), sampled every millisecond from /proc/self/statm, after `malloc_trim(0)` has handed memory freed by
earlier steps back to the system (otherwise the allocator's cache hides a step's footprint).

    python benchmarks/train_step.py                 # MiniLM 32x64 and SmolLM2 4x128, 10 rounds
    python benchmarks/train_step.py --models minilm --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import deltatune as dt
from deltatune import assets

PAGE = os.sysconf("SC_PAGE_SIZE")
LIBC = ctypes.CDLL("libc.so.6")
RESULTS = Path(__file__).parent / "results"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread."""

    def __enter__(self) -> PeakRSS:
        LIBC.malloc_trim(0)
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.excess = self.peak - self.start


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    """A real model and one real batch for it."""
    from transformers import AutoTokenizer

    if name == "minilm":
        path, batch, length, targets = assets.minilm_path(), 32, 64, ["query", "value"]
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        texts = [r["text"] for r in assets.rotten_tomatoes()[:batch]]
    else:
        path, batch, length, targets = assets.smollm2_path(), 4, 128, ["q_proj", "v_proj"]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        texts = [f"{r['prompt']} {r['response']}" * 8 for r in assets.chatterbot()[:batch]]
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    enc = dict(enc)
    enc["labels"] = torch.tensor([r["label"] for r in assets.rotten_tomatoes()[:batch]]) if name == "minilm" \
        else enc["input_ids"].clone()
    return model, enc, targets


def floor_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
        rest = {k: v for k, v in batch.items() if k != "input_ids"}
        model(inputs_embeds=inputs, **rest).loss.backward()

    return step


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def contenders(name: str) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    from peft import LoraConfig, get_peft_model

    base, batch, targets = build(name)
    base.train()
    ours = dt.inject(copy.deepcopy(base), dt.LoRAConfig(r=8, alpha=16, targets=targets))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    ours.train()
    theirs.train()
    steps = {"floor": floor_step(base, batch), "deltatune": train_step(ours, batch), "peft": train_step(theirs, batch)}
    trainable = {"deltatune": ours.trainable_parameters(),
                 "peft": sum(p.numel() for p in theirs.parameters() if p.requires_grad)}
    return steps, trainable


def measure(name: str, rounds: int, warmup: int, memory_rounds: int = 2) -> dict:
    steps, trainable = contenders(name)
    times: dict[str, list[float]] = {k: [] for k in steps}
    mem: dict[str, list[int]] = {k: [] for k in steps}
    for i in range(warmup + rounds):  # timing rounds, interleaved: floor, deltatune, peft, floor, ...
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    for _ in range(memory_rounds):  # separate rounds: the sampling thread would slow the timed steps
        for key, step in steps.items():
            with PeakRSS() as peak:
                step()
            mem[key].append(peak.excess)
    summary = {k: {"time_s": {"min": min(v), "median": statistics.median(v), "max": max(v)},
                   "step_peak_mib": statistics.median(mem[k]) / 2**20} for k, v in times.items()}
    ratio = {
        "deltatune/peft time (median of per-round ratios)": statistics.median(
            a / b for a, b in zip(times["deltatune"], times["peft"])),
        "deltatune/floor time": statistics.median(a / b for a, b in zip(times["deltatune"], times["floor"])),
        "peft/floor time": statistics.median(a / b for a, b in zip(times["peft"], times["floor"])),
        "deltatune/peft step memory": summary["deltatune"]["step_peak_mib"] / summary["peft"]["step_peak_mib"],
    }
    return {"model": name, "rounds": rounds, "trainable": trainable, "summary": summary, "ratios": ratio}


def to_markdown(results: list[dict], env: dict) -> str:
    lines = [f"# Train step: deltatune vs PEFT (LoRA r=8, fp32, {env['device']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"{env['threads']} threads, {env['rounds']} interleaved rounds after {env['warmup']} warm-up.", "",
             "| model (batch) | contender | step time median (min-max) s | step peak RSS above start MiB |"
             " trainable |", "|---|---|---|---|---|"]
    for r in results:
        for k, s in r["summary"].items():
            t = s["time_s"]
            lines.append(f"| {r['model']} | {k} | {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) | "
                         f"{s['step_peak_mib']:.0f} | {r['trainable'].get(k, 0):,} |")
    lines += ["", "| model | " + " | ".join(results[0]["ratios"]) + " |",
              "|---|" + "---|" * len(results[0]["ratios"])]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.3f}" for v in r["ratios"].values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step")
    args = parser.parse_args()
    torch.manual_seed(0)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "threads": torch.get_num_threads(), "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
           "rounds": args.rounds, "warmup": args.warmup}
    results = []
    for name in args.models:
        print(f"== {name}", flush=True)
        results.append(measure(name, args.rounds, args.warmup))
        print(json.dumps(results[-1]["ratios"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(results, env))
    print(to_markdown(results, env))


if __name__ == "__main__":
    main()
