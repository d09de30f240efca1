"""SAID on MiniLM / Rotten Tomatoes: accuracy against the subspace dimension d, with full fine-tuning as 100%.

Aghajanyan et al. (arXiv:2012.13255) report that about 200 parameters projected into RoBERTa reach 90% of full
fine-tuning on MRPC. Here each point is the embedded recipe as benchmarks/methods_table.py runs it (63 steps of 32
on 2,000 snippets, 1,000 held out, warmup + cosine), the method section replaced by SAID (Fastfood M, one θ_d of
length d over every query/value weight, one λ per layer) at d on a log grid. The new classifier head (384 x 2 +
2 = 770 parameters) is trained whole by the recipe, as in every methods-table row, so it is counted: a point's
trainable parameters are d + 12 (λ) + 770. A head-only point (the body frozen, only the 770 head parameters
trained) shows how much of the accuracy the head alone reaches. The 100% line is full fine-tuning's mean over
its methods-table seeds (results/methods_table_runs.jsonl); the 90% line is 0.9 x that accuracy.

Learning rate: Adam moves each coordinate of θ_d about lr per step and M's columns have unit length, so one step
moves a layer's ΔW by about lr·sqrt(d) (Frobenius); the rate is lr(d) = 1e-2 · sqrt(1000 / d), clipped to
[3e-3, 0.1] (d = 1000 at the methods-table rate), so every d gets about the same step in weight space.

Each finished (d, seed) is appended to results/said_curve_runs.jsonl and skipped when run again (resumable);
the summary JSON and PNG are rebuilt from that file at the end of every run. The d = 1000 point is also taken
from methods_table.py's `said` runs (the identical configuration), so it is not trained twice.

    python benchmarks/said_curve.py                          # the grid, seed 0, then the plot
    python benchmarks/said_curve.py --dims 200 1000 --seeds 1 2
    python benchmarks/said_curve.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from deltatune.training.loop import Trainer
from deltatune.training.recipe import load_recipe

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "said_curve_runs.jsonl"
TABLE_RUNS = RESULTS / "methods_table_runs.jsonl"
GRID = [10, 50, 200, 1000, 5000, 20000]
TABLE_D = 1000  # methods_table.py's `said` row: the same recipe, method section and rate as this d here
FULL_LR = 2e-4  # full fine-tuning's methods-table rate (SPECS["full"])
HEAD_LR = 1e-2  # head-only point: a linear probe at a rate the small methods use
TARGETS = ["query", "value"]
HEAD = 770  # classifier 384 x 2 + 2
MAJORITY = 0.575  # share of the larger class in the held-out snippets


def lr_for(d: int) -> float:
    return float(min(0.1, max(3e-3, 1e-2 * math.sqrt(1000 / d))))


def key(d: int | None, seed: int) -> str:
    return f"{'head' if d is None else f'd={d}'}|seed={seed}"


def done() -> dict[str, dict]:
    if not RUNS.is_file():
        return {}
    rows = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows if "error" not in r}


def train_point(d: int | None, seed: int) -> dict:
    if d is None:  # the head alone: a trainable copy of the classifier, nothing else
        method, lr, extra = {"name": "full", "targets": ["classifier"]}, HEAD_LR, ["train_modules=[]"]
    else:
        method, lr, extra = {"name": "said", "d": d, "projection": "fastfood", "targets": TARGETS}, lr_for(d), []
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(None, [f"method={json.dumps(method)}", f"optimizer.lr={lr}", f"train.seed={seed}",
                                    f"train.output_dir={out}", *extra])
        trainer = Trainer(recipe)
        trainer.setup()
        result = trainer.train()
    return {"key": key(d, seed), "d": d, "seed": seed, "lr": lr, "accuracy": result.after["accuracy"],
            "before": result.before["accuracy"], "trainable": result.trainable, "steps": result.steps,
            "seconds": round(result.seconds, 1)}


def full_accuracy() -> tuple[float, int]:
    rows = [json.loads(line) for line in TABLE_RUNS.read_text().splitlines() if line.strip()]
    acc = [r["accuracy"] for r in rows if r.get("label") == "full" and r.get("lr") == FULL_LR and "accuracy" in r]
    return statistics.mean(acc), len(acc)


def table_points() -> dict[str, dict]:
    """The methods-table `said` runs (d = 1000, lr 1e-2: this script's config at that d) as curve points."""
    rows = [json.loads(line) for line in TABLE_RUNS.read_text().splitlines() if line.strip()]
    return {key(TABLE_D, r["seed"]): {**r, "key": key(TABLE_D, r["seed"]), "d": TABLE_D, "source": "methods_table"}
            for r in rows if r.get("label") == "said" and r.get("lr") == lr_for(TABLE_D) and "accuracy" in r}


def summarize() -> dict:
    runs = {**table_points(), **done()}  # a run of this script's own wins
    full, n_full = full_accuracy()
    points = []
    for d in sorted({r["d"] for r in runs.values() if r["d"] is not None}):
        rows = [r for r in runs.values() if r["d"] == d]
        acc = [r["accuracy"] for r in rows]
        points.append({"d": d, "lr": rows[0]["lr"], "trainable": rows[0]["trainable"], "seeds": len(acc),
                       "accuracy": statistics.mean(acc), "std": statistics.pstdev(acc), "runs": acc,
                       "sources": sorted({r.get("source", "said_curve") for r in rows}),
                       "fraction_of_full": statistics.mean(acc) / full})
    head = [r["accuracy"] for r in runs.values() if r["d"] is None]
    d90 = next((p["d"] for p in points if p["accuracy"] >= 0.9 * full), None)
    return {"task": "MiniLM (all-MiniLM-L6-v2) / Rotten Tomatoes, embedded recipe, 63 steps",
            "method": f"said, Fastfood, targets {TARGETS}, head trained whole ({HEAD} parameters, counted)",
            "full_finetuning": {"accuracy": full, "seeds": n_full, "lr": FULL_LR},
            "line_90": 0.9 * full, "majority_class": MAJORITY,
            "head_only": {"accuracy": statistics.mean(head), "seeds": len(head), "lr": HEAD_LR} if head else None,
            "d90": d90, "points": points}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = summary["points"]
    ds = [p["d"] for p in pts]
    ax.plot(ds, [p["accuracy"] for p in pts], "o-", color="C0", label="SAID (mean over seeds)")
    for p in pts:
        ax.scatter([p["d"]] * len(p["runs"]), p["runs"], color="C0", alpha=0.35, s=14)
    full = summary["full_finetuning"]["accuracy"]
    ax.axhline(full, color="k", lw=1, label=f"full fine-tuning {full:.3f} (100%)")
    ax.axhline(summary["line_90"], color="k", ls="--", lw=1, label=f"90% of full {summary['line_90']:.3f}")
    if summary["head_only"]:
        ax.axhline(summary["head_only"]["accuracy"], color="C2", ls=":", lw=1.2,
                   label=f"head only ({HEAD} params) {summary['head_only']['accuracy']:.3f}")
    ax.axhline(MAJORITY, color="C3", ls=":", lw=1, label=f"majority class {MAJORITY}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d (θ_d; plus 12 λ and the 770-parameter head)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("SAID on MiniLM / Rotten Tomatoes (63 steps)")
    ax.set_ylim(0.55, max(0.8, full + 0.02))
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="+", type=int, default=GRID)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-head", action="store_true", help="skip the head-only point")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if not args.plot_only:
        finished = {**table_points(), **done()}
        jobs = [(None, s) for s in args.seeds if not args.no_head] + [(d, s) for s in args.seeds for d in args.dims]
        for d, seed in jobs:
            if key(d, seed) in finished:
                continue
            try:
                row = train_point(d, seed)
            except Exception as err:  # a failed point is recorded and tried again next time
                row = {"key": key(d, seed), "d": d, "seed": seed, "error": f"{type(err).__name__}: {err}"}
            print(json.dumps(row), flush=True)
            with RUNS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    summary = summarize()
    (RESULTS / "said_curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, RESULTS / "said_curve.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
