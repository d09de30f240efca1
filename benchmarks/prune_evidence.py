"""Pruning evidence on real models: quality before/after magnitude, Wanda, GBLM, 2:4, ShortGPT and PERP recovery.

SmolLM2-135M: perplexity on held-out Rotten Tomatoes reviews (in-domain for calibration and recovery) and on
chatterbot Q/A pairs (another domain, never seen). MiniLM: Rotten Tomatoes accuracy of the embedded recipe's
fine-tuned classifier on its own held-out split. Calibration and recovery texts never overlap the evaluation texts.

    .venv/bin/python benchmarks/prune_evidence.py            # ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/prune_evidence.py --quick    # a smoke run: fewer texts and steps
    .venv/bin/python benchmarks/prune_evidence.py --only smollm2 --variants "wanda 50% + PERP"   # one part
    .venv/bin/python benchmarks/prune_evidence.py --combine results/prune_evidence_*.json     # parts -> table
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deltatune import assets
from deltatune.compression.calibration import text_batches
from deltatune.compression.config import parse_step
from deltatune.compression.recovery import perp_recover
from deltatune.compression.report import accuracy, count_nonzero, count_parameters, perplexity
from deltatune.training.loop import Trainer
from deltatune.training.recipe import DEFAULT_RECIPE, load_recipe
from deltatune.training.tasks import CausalLMTask, resolve_model_path

RESULTS = Path(__file__).parent / "results"
# Calibration statistics from one pass over the dense model (the official code re-measures each block after
# pruning the ones before it; `sequential: true` does that, at ~15x the calibration time on SmolLM2).
ONE_PASS = {"sequential": False}
# (name, steps as in a prune config, PERP recovery after them)
VARIANTS = [
    ("dense", [], False),
    ("magnitude 20%", [{"method": "magnitude", "sparsity": 0.2}], False),
    ("wanda 20%", [{"method": "wanda", "sparsity": 0.2, **ONE_PASS}], False),
    ("magnitude 50%", [{"method": "magnitude", "sparsity": 0.5}], False),
    ("wanda 50%", [{"method": "wanda", "sparsity": 0.5, **ONE_PASS}], False),
    ("gblm 50%", [{"method": "gblm", "sparsity": 0.5, **ONE_PASS}], False),
    ("magnitude 2:4", [{"method": "magnitude", "n_m": [2, 4]}], False),
    ("wanda 2:4", [{"method": "wanda", "n_m": [2, 4], **ONE_PASS}], False),
    ("shortgpt 10% layers", [{"method": "shortgpt", "fraction": 0.1}], False),
    ("shortgpt 25% layers", [{"method": "shortgpt", "fraction": 0.25}], False),
    ("magnitude 50% + PERP", [{"method": "magnitude", "sparsity": 0.5}], True),
    ("wanda 50% + PERP", [{"method": "wanda", "sparsity": 0.5, **ONE_PASS}], True),
    ("shortgpt 25% layers + PERP", [{"method": "shortgpt", "fraction": 0.25}], True),
]


def shuffled(rows: list, seed: int) -> list:
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def run_variants(base, batches, recover_batches, evaluate, args) -> list[dict]:
    """Apply each variant to a fresh copy of `base` and evaluate it."""
    rows = []
    for name, steps, recover in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        start = time.perf_counter()
        model = copy.deepcopy(base)
        for i, step in enumerate(steps):
            parse_step(step, i).apply(model, batches)
        if recover:
            model = perp_recover(model, recover_batches, steps=args.recover_steps, lr=args.recover_lr, rank=8)
        row = {"variant": name, "parameters": count_parameters(model), "nonzero": count_nonzero(model),
               **evaluate(model), "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    return rows


def smollm2(args) -> dict:
    path = resolve_model_path("smollm2")
    task = CausalLMTask(path, args.seq_len)
    model = task.build_model().eval()
    reviews = shuffled(sorted({r["text"] for r in assets.rotten_tomatoes()}), 0)
    held_out, pool = reviews[: args.eval_texts], reviews[args.eval_texts:]
    chat = shuffled([f"{r['prompt']}\n{r['response']}" for r in assets.chatterbot()], 0)[: args.eval_texts]
    calibration = text_batches(task.tokenizer, pool, n_samples=args.calib, seq_len=args.seq_len, batch_size=8)
    recover = text_batches(task.tokenizer, pool[::-1], n_samples=args.recover_samples, seq_len=args.seq_len,
                           batch_size=8, seed=1)

    def evaluate(m) -> dict:
        return {"ppl_reviews": round(perplexity(m, task.tokenizer, held_out, seq_len=64, batch_size=16), 3),
                "ppl_chatterbot": round(perplexity(m, task.tokenizer, chat, seq_len=64, batch_size=16), 3)}

    return {"model": "SmolLM2-135M-Instruct", "held_out_texts": len(held_out),
            "rows": run_variants(model, calibration, recover, evaluate, args)}


def minilm(args) -> dict:
    """Fine-tune the embedded recipe (LoRA on MiniLM, Rotten Tomatoes), merge it, then prune the classifier."""
    out = Path(args.workdir) / "minilm_rt"
    recipe = load_recipe(None, [f"train.output_dir={out}"] + (["data.max_train=500"] if args.quick else []))
    trainer = Trainer(recipe, overwrite=True)  # its own scratch folder: a rerun replaces the last one
    trainer.setup()
    result = trainer.train()
    classifier = trainer.model.merge_and_unload().eval()
    task, held_out, train = trainer.task, trainer.eval_set, trainer.train_set  # encoded; the split of the recipe
    eval_batches = [task.collate(held_out[i : i + 64]) for i in range(0, len(held_out), 64)]
    calibration = [task.collate(train[i : i + 16]) for i in range(0, min(len(train), args.calib), 16)]
    recover = [task.collate(train[i : i + 16]) for i in range(0, len(train), 16)]

    def evaluate(m) -> dict:
        return {"accuracy": round(accuracy(m, eval_batches), 4)}

    return {"model": "all-MiniLM-L6-v2 + LoRA (embedded recipe), merged", "recipe": DEFAULT_RECIPE,
            "fine_tuned_accuracy": result.after, "held_out_examples": len(held_out),
            "rows": run_variants(classifier, calibration, recover, evaluate, args)}


def markdown(results: dict) -> str:
    lines = ["# Pruning evidence", "", f"Command: `{results['command']}`  ", f"Machine: {results['machine']}", ""]
    s = results["smollm2"]
    st = results["settings"]
    lines += [f"## {s['model']}: perplexity on {s['held_out_texts']} held-out texts", "",
              f"Calibration: {st['calib']} windows of {st['seq_len']} tokens from Rotten Tomatoes reviews disjoint from "
              "the held-out reviews; Wanda/GBLM statistics from one pass over the dense model (`sequential: false`). "
              f"PERP: {st['recover_steps']} steps of 8 windows from other training reviews (masked LoRA r=8 + biases + "
              f"norms, lr {st['recover_lr']:g}). Chatterbot Q/A is a domain neither calibration nor recovery sees. "
              "`s`: seconds for the variant (pruning, recovery, evaluation) on a shared machine.", "",
              "| variant | nonzero params | ppl reviews | ppl chatterbot | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['nonzero'] / 1e6:.1f}M | {r['ppl_reviews']:.2f} | {r['ppl_chatterbot']:.2f} "
              f"| {r['seconds']} |" for r in s["rows"]]
    m = results["minilm"]
    lines += ["", f"## {m['model']}: Rotten Tomatoes accuracy on {m['held_out_examples']} held-out reviews", "",
              "| variant | nonzero params | accuracy | s |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['nonzero'] / 1e6:.1f}M | {r['accuracy']:.4f} | {r['seconds']} |"
              for r in m["rows"]]
    lines += ["", "## Checks", ""] + [f"- {c}" for c in results["checks"]]
    return "\n".join(lines) + "\n"


def checks(results: dict) -> list[str]:
    """The orderings the papers lead one to expect, and whether they held here."""
    s = {r["variant"]: r for r in results["smollm2"]["rows"]}
    m = {r["variant"]: r for r in results["minilm"]["rows"]}
    out = []

    def say(claim: str, held: bool, detail: str) -> None:
        out.append(f"{'held' if held else 'did NOT hold'}: {claim} ({detail})")

    for key in ("ppl_reviews", "ppl_chatterbot"):
        a, b = s["wanda 50%"][key], s["magnitude 50%"][key]
        say(f"Wanda ahead of magnitude at 50% on SmolLM2 ({key})", a < b, f"{a:.2f} vs {b:.2f}")
    # recovery trains on reviews (disjoint from the held-out ones); chatterbot is a domain it never sees
    for key, domain in (("ppl_reviews", "recovery domain"), ("ppl_chatterbot", "unseen domain")):
        for prune in ("magnitude 50%", "wanda 50%", "shortgpt 25% layers"):
            d, p, r = s["dense"][key], s[prune][key], s[f"{prune} + PERP"][key]
            closed = (p - r) / (p - d) if p > d else float("nan")
            say(f"PERP closes most of the gap after {prune} ({domain} ppl)", closed > 0.5,
                f"dense {d:.2f}, pruned {p:.2f}, recovered {r:.2f}: {100 * closed:.0f}% closed")
    a, b = m["wanda 50%"]["accuracy"], m["magnitude 50%"]["accuracy"]
    say("Wanda ahead of magnitude at 50% on MiniLM", a >= b, f"{a:.4f} vs {b:.4f}")
    d, p, r = m["dense"]["accuracy"], m["magnitude 50%"]["accuracy"], m["magnitude 50% + PERP"]["accuracy"]
    say("PERP recovers MiniLM accuracy after magnitude 50%", r > p, f"dense {d:.4f}, pruned {p:.4f}, recovered {r:.4f}")
    return out


def combine(files: list[str]) -> dict:
    """One result from section files (`--only` runs): each variant's row from the last file that has it."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    results = {"command": "; ".join(p["command"] for p in parts), "machine": parts[-1]["machine"],
               "settings": parts[-1]["settings"], "combined_from": [Path(f).name for f in files]}
    order = [name for name, _, _ in VARIANTS]
    for section in ("smollm2", "minilm"):
        have = [p[section] for p in parts if section in p]
        if not have:
            raise ValueError(f"no file holds the {section} section; run it with --only {section}")
        rows = {r["variant"]: r for sec in have for r in sec["rows"]}
        results[section] = {**have[-1], "rows": [rows[v] for v in order if v in rows]}
    return results


def write(results: dict, quick: bool = False) -> None:
    results["checks"] = checks(results)
    name = "prune_evidence_quick" if quick else "prune_evidence"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--workdir", default="/tmp/deltatune-prune-evidence")
    parser.add_argument("--only", choices=["smollm2", "minilm"], help="run one model's section")
    parser.add_argument("--variants", nargs="+", help="run only these variants (names as in VARIANTS)")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="build the table from --only runs' files")
    args = parser.parse_args()
    if args.combine:
        write(combine(args.combine))
        return
    args.seq_len, args.calib, args.eval_texts = 128, (16 if args.quick else 64), (64 if args.quick else 200)
    args.recover_samples, args.recover_steps, args.recover_lr = (16, 4, 5e-4) if args.quick else (96, 60, 5e-4)
    torch.manual_seed(0)
    results = {"command": " ".join(["python", *sys.argv]), "machine": f"{platform.machine()}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
               "settings": {k: v for k, v in vars(args).items()}}
    for part, run in (("smollm2", smollm2), ("minilm", minilm)):
        if args.only in (None, part):
            results[part] = run(args)
    if args.only:  # one section: its rows only, without the cross-model checks (see --combine)
        name = f"prune_evidence_{args.only}" + ("_quick" if args.quick else "")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    write(results, args.quick)


if __name__ == "__main__":
    main()
