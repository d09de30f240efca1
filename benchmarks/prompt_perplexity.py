"""SmolLM2-135M-Instruct / chatterbot: held-out perplexity after the same short training, per prompt method (LoRA
as the reference).

Each method runs the shipped instruction-tuning recipe (lora_smollm2_chatterbot) with its `method` section and
learning rate swapped in and the same data, steps, batch and schedule for all. Results are merged into
results/prompt_perplexity.json as each method finishes (finished ones are skipped, unless --rerun), and
results/prompt_perplexity.md is rebuilt from it.

    python benchmarks/prompt_perplexity.py                            # every method, the recipe's 60 steps
    python benchmarks/prompt_perplexity.py --steps 12 --max-train 96 --methods lora prompt_tuning
    python benchmarks/prompt_perplexity.py --table-only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.training.loop import Trainer
from deltatune.training.recipe import builtin_recipe, load_recipe

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "prompt_perplexity.json"
RECIPE = builtin_recipe("lora_smollm2_chatterbot")
# label -> (method section, peak learning rate from the method's paper regime). Prompts of 20 virtual tokens
# (10 per layer for the adaption prompt, on the top 8 of 30 layers as LLaMA-Adapter's top-L placement).
SPECS: dict[str, tuple[dict, float]] = {
    "lora": ({"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
              "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}, 1e-3),  # the recipe's own
    "prompt_tuning": ({"name": "prompt_tuning", "num_virtual_tokens": 20}, 3e-1),  # Lester et al.: 0.3
    "p_tuning": ({"name": "p_tuning", "num_virtual_tokens": 20}, 3e-3),
    "dept": ({"name": "dept", "num_virtual_tokens": 20, "rank": 8, "pair_lr": 5e-3}, 3e-1),  # paper: 3e-1 / 5e-3
    "prefix_tuning": ({"name": "prefix_tuning", "num_virtual_tokens": 20}, 1e-2),  # Li & Liang: 5e-5 to 8e-5
    # on GPT-2 full batches; with this short run a larger rate, as PEFT's causal-LM example (1e-2 to 3e-2)
    "p_tuning_v2": ({"name": "p_tuning_v2", "num_virtual_tokens": 20}, 1e-2),  # Liu et al.: 5e-3 to 1e-2
    "adaption_prompt": ({"name": "adaption_prompt", "adapter_len": 10, "adapter_layers": 8}, 9e-3),  # paper: 9e-3
}


def train_once(label: str, overrides: list[str]) -> dict:
    options, lr = SPECS[label]
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(RECIPE, [f"method={json.dumps(options)}", f"optimizer.lr={lr}",
                                      f"train.output_dir={out}", *overrides])
        trainer = Trainer(recipe)
        trainer.setup()
        result = trainer.train()
    return {"label": label, "method": options["name"], "lr": lr, "before": result.before["perplexity"],
            "after": result.after["perplexity"], "eval_loss": result.after["loss"], "trainable": result.trainable,
            "steps": result.steps, "seconds": round(result.seconds, 1)}


def markdown(data: dict) -> str:
    lines = ["# Prompt methods on SmolLM2-135M-Instruct / chatterbot", "",
             f"Command: `{data.get('command', '')}`  ", f"Machine: {data.get('machine', '')}  ",
             f"Settings: {data.get('settings', '')}", *([f"Note: {data['note']}"] if data.get("note") else []), "",
             "The shipped instruction-tuning recipe with each method and its learning rate swapped in; held-out "
             "perplexity of the assistant replies before and after the same training. One seed per method.", "",
             "| method | lr | perplexity before | after | trainable | seconds |", "|---|---|---|---|---|---|"]
    for label in SPECS:
        r = data.get("runs", {}).get(label)
        if r is None:
            lines.append(f"| {label} | {SPECS[label][1]:g} | not run | | | |")
        elif "error" in r:
            lines.append(f"| {label} | {r['lr']:g} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {label} | {r['lr']:g} | {r['before']:.2f} | {r['after']:.2f} | {r['trainable']:,} | "
                         f"{r['seconds']:.0f} |")
    settings = {r.get("settings") for r in data.get("runs", {}).values()}
    if len(settings) > 1:
        lines += ["", "Runs at other settings than the above: " + "; ".join(
            f"{k}: {r.get('settings')}" for k, r in data["runs"].items() if r.get("settings") != data.get("settings"))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's 60)")
    parser.add_argument("--max-train", type=int, help="training pairs (default: the recipe's 480)")
    parser.add_argument("--max-eval", type=int, help="held-out pairs evaluated (default: the recipe's 100)")
    parser.add_argument("--rerun", action="store_true", help="train methods that already have a result again")
    parser.add_argument("--table-only", action="store_true", help="rebuild the Markdown from the recorded runs")
    parser.add_argument("--note", help="a line recorded with the results (machine load, what was left out)")
    args = parser.parse_args()
    overrides = ["train.eval_every=null", "train.save_every=null"]
    for key, value in (("train.steps", args.steps), ("data.max_train", args.max_train),
                       ("data.max_eval", args.max_eval)):
        if value is not None:
            overrides.append(f"{key}={value}")
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": {}}
    if args.note:
        data["note"] = args.note
    if not args.table_only:
        data.update({"command": " ".join(["python", *sys.argv]), "settings": " ".join(overrides),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"})
        registered = {spec.name for spec in dt.list_methods()}
        for label in args.methods:
            if label in data["runs"] and not args.rerun:
                continue
            if SPECS[label][0]["name"] not in registered:
                print(f"{label}: not registered in this tree, skipped", flush=True)
                continue
            tick = time.perf_counter()
            try:
                row = train_once(label, overrides)
            except Exception as err:  # a method that fails is reported, the others still run
                row = {"label": label, "lr": SPECS[label][1], "error": f"{type(err).__name__}: {err}"}
            row.update(wall_s=round(time.perf_counter() - tick, 1), settings=" ".join(overrides))
            print(json.dumps(row), flush=True)
            data["runs"][label] = row
            RESULTS.mkdir(exist_ok=True)
            OUT.write_text(json.dumps(data, indent=2) + "\n")
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "prompt_perplexity.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
