"""Where one LoRA training step's memory and time go, per contender of benchmarks/quantized_bases.py.

For each setup (side:base:dtype[:ckpt], e.g. deltatune:fp32:float32, peft:nf4:bfloat16:ckpt): the tensors autograd
saves for backward (saved-tensor hooks, distinct storages, grouped by shape and dtype), the peak RSS above the
step's start at the end of forward, backward and the optimizer step, the phases' times, and torch.profiler's
top operators by self CPU time. Writes results/profile_qlora_step.md (appending a section per run).

    python benchmarks/profile_qlora_step.py --model qwen_coder --length 64 \\
        --setups deltatune:fp32:float32 deltatune:nf4:float32 peft:nf4:float32
"""

from __future__ import annotations

import argparse
import collections
import os
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class Sampler:
    """Peak RSS since `mark()`, sampled every millisecond by a thread."""

    def __init__(self) -> None:
        from deltatune.bench import measure

        self.rss, self.peak, self.start = measure.rss, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> Sampler:
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def mark(self) -> float:
        """MiB: peak above the start so far."""
        self.peak = max(self.peak, self.rss())
        return (self.peak - self.start) / 2**20

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def profile(case, who, log, operators: bool = True) -> list[str]:
    from deltatune.bench import measure, quantized

    model = quantized.build(case, who).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(**case.batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # first step: AdamW state, lazy set-up
    log(f"{who.label}: first step {time.perf_counter() - t0:.1f} s")
    held = quantized.tensor_mib(model, opt)

    saved: dict[int, tuple[tuple, torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = (tuple(t.shape), t.dtype, s.nbytes())
        return t

    quantized._trim()
    with Sampler() as rss:
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**case.batch).loss
        t_fwd, after_fwd = time.perf_counter() - t0, rss.mark()
        t0 = time.perf_counter()
        loss.backward()
        t_bwd, after_bwd = time.perf_counter() - t0, rss.mark()
        del loss
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_opt, after_opt = time.perf_counter() - t0, rss.mark()
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for shape, dtype, nbytes in saved.values():
        groups[(shape, str(dtype).removeprefix("torch."))].append(nbytes)
    total = sum(sum(v) for v in groups.values()) / 2**20
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    activations = sum(n for ptr, (_, _, n) in saved.items() if ptr not in weights) / 2**20  # what the step adds
    top = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:8]

    busy, step_s = [], 0.0
    if operators:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        ops = prof.key_averages()
        busy = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:10]
        step_s = sum(e.self_cpu_time_total for e in ops) / 1e6
    lines = [f"### {who.label} ({who.dtype}, checkpointing {'on' if who.checkpointing else 'off'})", "",
             f"held {held:.0f} MiB; step peak RSS above its start: after forward {after_fwd:.0f}, after backward "
             f"{after_bwd:.0f}, after AdamW {after_opt:.0f} MiB; forward {t_fwd:.1f} s, backward {t_bwd:.1f} s, "
             f"AdamW {t_opt:.2f} s", "",
             f"Saved for backward (forward under saved-tensor hooks): {total:.0f} MiB in {len(saved)} storages, "
             f"{activations:.0f} MiB of them not the model's own parameters or buffers; largest groups:", "", "| shape | dtype | count | MiB |", "|---|---|---|---|"]
    lines += [f"| {list(shape)} | {dtype} | {len(v)} | {sum(v) / 2**20:.0f} |" for (shape, dtype), v in top]
    if busy:
        lines += ["", f"Profiled step: operators' self CPU time {step_s:.1f} s; top operators:", "",
                  "| operator | calls | self CPU s | share |", "|---|---|---|---|"]
    lines += [f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | "
              f"{e.self_cpu_time_total / 1e6 / step_s:.0%} |" for e in busy]
    log(f"{who.label}: held {held:.0f}, peak fwd/bwd/opt {after_fwd:.0f}/{after_bwd:.0f}/{after_opt:.0f} MiB, "
        f"saved {total:.0f} MiB ({activations:.0f} not parameters), fwd {t_fwd:.1f} s bwd {t_bwd:.1f} s")
    quantized._trim()
    measure.rss()
    return lines + [""]


def main() -> None:
    from deltatune.bench import cases, quantized

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen_coder")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--setups", nargs="+", required=True, help="side:base:dtype[:ckpt]")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_qlora_step.md")
    ap.add_argument("--no-operators", action="store_true", help="skip the torch.profiler step (memory only)")
    args = ap.parse_args()
    started = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - started:5.0f} s, load {os.getloadavg()[0]:.1f}] {line}", flush=True)

    case = cases.load(args.model, 0, 0, args.length)
    lines = [f"## {args.model}, batch 4 x {args.length} tokens, {time.strftime('%Y-%m-%d %H:%M')} UTC, "
             f"{torch.get_num_threads()} threads, MALLOC_MMAP_THRESHOLD_ {os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
             f"1-minute load {os.getloadavg()[0]:.1f} at start", ""]
    for spec in args.setups:
        side, base, dtype, *rest = spec.split(":")
        who = quantized.Contender(f"{side} {base}", side, base, getattr(torch, dtype), True, rest == ["ckpt"])
        lines += profile(case, who, log, not args.no_operators)
    lines[0] += f", {os.getloadavg()[0]:.1f} at end"
    text = "\n".join(lines) + "\n"
    old = args.out.read_text() if args.out.exists() else "# One training step, profiled\n\n"
    args.out.write_text(old + text)
    print(text)


if __name__ == "__main__":
    main()
