"""Memory-lean training on MiniLM-L6 (Rotten Tomatoes, 8 x 64 tokens; `--model smollm2`: SmolLM2-135M on
Chatterbot text, 4 x 64, too slow for this loaded 2-core machine), in one interleaved run:
full fine-tuning with AdamW vs GaLore, an inference forward vs a MeZO step (full-parameter), LoRA vs PaCA
(when `paca` is registered; otherwise that pair is skipped with a note).

Each contender is one closure; all run round-robin (deltatune/bench/measure.py), so machine load hits them
alike. Per contender: step time, the step-local peak RSS above the level before the step (gradients,
activations, temporaries; after malloc_trim), and the optimizer state it keeps between steps (counted from its
tensors). "Training memory" is state + step peak: what a step needs beyond the model's weights. Ratios are the
median (min-max) over rounds of per-round ratios. AdamW, GaLore, MeZO and the inference forward share one model
(their updates drift the same weights; the numbers measured do not depend on their values). GaLore's projection
is refreshed (an SVD per matrix) in the untimed first step only; `refresh_s` times one refresh step apart.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/memory_lean.py     # about 10-20 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = [("galore", "full_adamw"), ("mezo", "inference"), ("paca", "lora")]  # (candidate, reference)


def state_mib(opt: torch.optim.Optimizer) -> float:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor)) / 2**20


def main() -> None:
    import deltatune as dt
    from deltatune.bench import cases
    from deltatune.bench.measure import interleaved_times, peak_meter, ratio, spread
    from deltatune.engine.atomic import atomic_write_text
    from deltatune.training.galore import GaLoreAdamW
    from deltatune.training.mezo import MeZO

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-rounds", type=int, default=3)
    ap.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    ap.add_argument("--rows", type=int, default=8, help="rows of the timing batch (at most the case's)")
    ap.add_argument("--length", type=int, default=64, help="SmolLM2's sequence length (MiniLM's is 64)")
    ap.add_argument("--rank", type=int, default=64, help="GaLore's r (LoRA's and PaCA's r is 16)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON in --out")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads((args.out / "memory_lean.json").read_text())
        atomic_write_text(args.out / "memory_lean.md", "\n".join(report(results)) + "\n")
        return
    started, load = time.time(), [os.getloadavg()[0]]
    device = torch.device("cpu")

    def log(line: str) -> None:
        load.append(os.getloadavg()[0])
        print(f"[{time.time() - started:5.0f} s, load {load[-1]:.1f}] {line}", flush=True)

    case = cases.load(args.model, length=args.length if args.model != "minilm" else None)
    batch = {k: v[:args.rows] for k, v in case.batch.items()}
    rows, length = batch["input_ids"].shape
    targets = case.targets.get("all_linear") or case.targets["attention"] + case.targets["ffn"]
    full = copy.deepcopy(case.model).train()
    full.requires_grad_(True)
    params = [p for p in full.parameters()]
    adamw = torch.optim.AdamW(params, lr=1e-5)
    galore = GaLoreAdamW(params, lr=1e-5, rank=args.rank, update_proj_gap=10**9, scale=0.25)
    mezo = MeZO(params, lr=1e-7, eps=1e-3)

    def backprop_step(opt: torch.optim.Optimizer) -> None:
        full.train()
        full(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def inference() -> None:
        full.eval()
        with torch.no_grad():
            full(**batch)

    def mezo_step() -> None:
        full.eval()  # as the trainer and the paper's code: no dropout between the two probes
        with torch.no_grad():
            mezo.step(lambda: full(**batch).loss)

    fns = {"full_adamw": lambda: backprop_step(adamw), "galore": lambda: backprop_step(galore),
           "inference": inference, "mezo": mezo_step}
    optimizers = {"full_adamw": adamw, "galore": galore, "mezo": mezo}
    notes = []
    names = {s.name for s in dt.list_methods()}
    adapters = {"lora": "lora", "paca": "paca"}
    for label, method in adapters.items():
        if method not in names:
            notes.append(f"{label}: method '{method}' is not registered here, so the {label} vs lora pair is "
                         "skipped (rerun after it is merged)")
            continue
        fields = dt.get_method(method).config.model_fields
        options = {k: v for k, v in {"r": 16, "targets": targets}.items() if k in fields}
        torch.manual_seed(0)
        model = dt.inject(copy.deepcopy(case.model), dt.make_config(method, **options), train_modules=case.head or None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def adapter_step(model=model, opt=opt) -> None:
            model.train()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[label], optimizers[label] = adapter_step, opt
    del case  # the pretrained copy is no longer needed: its memory is not any contender's

    log(f"built {', '.join(fns)}")
    t0 = time.perf_counter()
    for fn in fns.values():  # the first steps build the optimizer states and GaLore's projections
        fn()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in galore.state.values():  # one more step with every projection refreshed, timed apart
        s["step"] = 0
    fns["galore"]()
    refresh_s = time.perf_counter() - t0
    log(f"first steps {first_s:.1f} s, a GaLore refresh step {refresh_s:.1f} s")
    times = interleaved_times(fns, rounds=args.rounds, warmup=1, device=device)
    log("timed")
    meter = peak_meter(device)
    peaks: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.memory_rounds):
        for key, fn in fns.items():
            with meter() as m:
                fn()
            peaks[key].append(m.excess / 2**20)
    log("memory measured")

    state = {k: state_mib(optimizers[k]) if k in optimizers else 0.0 for k in fns}
    # AdamW and GaLore step the same tensors: each one's own state only (GaLore's keys are apart from AdamW's)
    contenders = {k: {"step_s": spread(times[k]), "step_peak_mib": spread(peaks[k]), "state_mib": state[k],
                      "training_mib": state[k] + statistics.median(peaks[k])} for k in fns}
    pairs = []
    for cand, ref in PAIRS:
        if cand not in fns or ref not in fns:
            continue
        train_a = [state[cand] + p for p in peaks[cand]]
        train_b = [state[ref] + p for p in peaks[ref]]
        pairs.append({"candidate": cand, "reference": ref, "time": ratio(times[cand], times[ref]),
                      "step_peak": ratio(peaks[cand], peaks[ref]), "training_memory": ratio(train_a, train_b)})
    what = {"minilm": ("MiniLM-L6 (all-MiniLM-L6-v2, 22.7M parameters, fp32, new 2-class head)", "Rotten Tomatoes"),
            "smollm2": ("SmolLM2-135M (fp32)", "Chatterbot text")}[args.model]
    results = {"model": what[0], "batch": f"{rows} x {length} tokens of {what[1]}", "lora_targets": targets,
               "galore": {"rank": args.rank, "scale": 0.25, "refresh_s": refresh_s}, "lora_r": 16,
               "rounds": args.rounds, "memory_rounds": args.memory_rounds, "first_steps_s": first_s,
               "threads": torch.get_num_threads(), "load_average_1min": spread(load),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.time() - started,
               "contenders": contenders, "pairs": pairs, "notes": notes}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "memory_lean.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(args.out / "memory_lean.md", "\n".join(report(results)) + "\n")
    print((args.out / "memory_lean.md").read_text())


def _r(x: dict) -> str:
    return f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"


def report(results: dict) -> list[str]:
    lines = [f"Memory-lean training, {results['model']}, {results['batch']}, CPU ({results['threads']} threads, "
             f"1-min load {results['load_average_1min']['min']:.1f}-{results['load_average_1min']['max']:.1f}), "
             f"{results['rounds']} timing / {results['memory_rounds']} memory rounds, {results['date']}.", "",
             "| contender | step s (median) | step-local peak RSS MiB | optimizer state MiB | training memory MiB |",
             "|---|---|---|---|---|"]
    for k, c in results["contenders"].items():
        lines.append(f"| {k} | {c['step_s']['median']:.2f} | {c['step_peak_mib']['median']:.0f} | "
                     f"{c['state_mib']:.0f} | {c['training_mib']:.0f} |")
    lines += ["", "| candidate / reference | step time ratio | step-peak ratio | training-memory ratio |",
              "|---|---|---|---|"]
    for p in results["pairs"]:
        lines.append(f"| {p['candidate']} / {p['reference']} | {_r(p['time'])} | {_r(p['step_peak'])} | "
                     f"{_r(p['training_memory'])} |")
    g = results["galore"]
    lines += ["", f"GaLore r={g['rank']}, scale {g['scale']}, on every 2-D matrix wider than r (embeddings included); a "
              f"step that refreshes every projection (one SVD per matrix, every update_proj_gap steps) took "
              f"{g['refresh_s']:.1f} s. Training memory = optimizer state + step-local peak (gradients, "
              "activations, temporaries), beyond the weights. GaLore still materialises each full gradient "
              "(no per-layer updates here), so its saving is in the state."]
    lines += [f"Note: {n}" for n in results["notes"]]
    return lines


if __name__ == "__main__":
    main()
