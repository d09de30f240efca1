"""bench.json -> bench.md (tables and the targets checked) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.atomic import atomic_write_text


def _cells(results: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    return {c["method"]: c for c in results["train"] if c["model"] == model}


def _excess(cell: dict[str, Any], who: str) -> float:
    return cell["step_peak_mib"][who] - cell["step_peak_mib"]["floor"]


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(model, target, measured, met) for each CPU target of the performance issue that the run measured."""
    rows: list[tuple[str, str, str, bool]] = []
    for model in dict.fromkeys(c["model"] for c in results["train"]):
        cells = _cells(results, model)
        lora, drop, dora = cells.get("lora"), cells.get("lora_dropout"), cells.get("dora")
        if lora and "peft" in lora["time_s"]:
            r = lora["ratios"]["deltatune/peft time"]["median"]
            rows.append((model, "LoRA time <= PEFT (median ratio <= 1.00)", f"{r:.3f}", r <= 1.0))
            f = lora["ratios"]["deltatune/floor time"]["median"]
            rows.append((model, "LoRA time <= 1.03x floor", f"{f:.3f}", f <= 1.03))
            ours, theirs = _excess(lora, "deltatune"), _excess(lora, "peft")
            rows.append((model, "LoRA memory above floor <= half of PEFT's", f"{ours:.0f} vs {theirs:.0f} MiB",
                         ours <= 0.5 * theirs))
        if drop and lora and "peft" in drop["time_s"]:
            r = drop["ratios"]["deltatune/peft time"]["median"]
            rows.append((model, "LoRA dropout 0.1 time <= 0.97x PEFT", f"{r:.3f}", r <= 0.97))
            # two cells: each is compared through its own floor, as for DoRA's time
            ours = _excess(drop, "deltatune") - _excess(lora, "deltatune")
            theirs = _excess(drop, "peft") - _excess(lora, "peft")
            rows.append((model, "dropout memory above LoRA <= half of PEFT's", f"{ours:.0f} vs {theirs:.0f} MiB",
                         ours <= 0.5 * max(theirs, 0.0)))
        if dora and lora:
            # different cells are not interleaved with each other: both are compared through their own floor
            r = dora["ratios"]["deltatune/floor time"]["median"] / lora["ratios"]["deltatune/floor time"]["median"]
            rows.append((model, "DoRA time <= 1.05x deltatune LoRA (each against its floor)", f"{r:.3f}", r <= 1.05))
            if "peft" in dora["step_peak_mib"]:
                ours, theirs = dora["step_peak_mib"]["deltatune"], dora["step_peak_mib"]["peft"]
                rows.append((model, "DoRA step memory <= PEFT DoRA", f"{ours:.0f} vs {theirs:.0f} MiB", ours <= theirs))
    for cell in results["inference"]:
        model, r = cell["model"], cell["ratios"]
        if "deltatune/peft unmerged" in r:
            v = r["deltatune/peft unmerged"]["median"]
            rows.append((model, "inference unmerged <= PEFT", f"{v:.3f}", v <= 1.0))
        v = r["merged/base"]["median"]
        rows.append((model, "inference merged within 2% of base", f"{v:.3f}", v <= 1.02))
        for k in results["config"]["mixed"]:
            v = r[f"deltatune mixed {k}/single"]["median"]
            rows.append((model, f"mixed batch of {k} adapters <= 1.05x single", f"{v:.3f}", v <= 1.05))
    return rows


def _fmt_ratio(r: dict[str, float] | None) -> str:
    return "" if r is None else f"{r['median']:.3f} ({r['min']:.2f}-{r['max']:.2f})"


def _quality(cell: dict[str, Any]) -> str:
    q = cell.get("quality")
    if not q:
        return ""
    peer = cell["peer"]
    return f"{q['deltatune']:.3f}" + (f" / {q[peer]:.3f}" if peer in q else "")


def markdown(results: dict[str, Any], command: str) -> str:
    env, cfg = results["env"], results["config"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "peft") if k in env)
    lines = [f"# deltatune bench{' (quick)' if cfg['quick'] else ''}", "",
             f"Command: `{command}`  ",
             f"Machine: {env.get('gpu', 'CPU')} ({env['machine']}, {env['cores']} cores, {env['threads']} threads), "
             f"{env['dtype']}; {versions}; {env['date']}.", "",
             f"Train step: {cfg['rounds']} interleaved rounds (floor, deltatune, peer) after {cfg['warmup']} warm-up; "
             "ratios are the median (min-max) of per-round ratios. The floor is the frozen model's forward and "
             "backward to its input embeddings. Memory: the step's peak above the level before it, median of "
             f"{cfg['memory_rounds']} rounds (RSS on CPU). Quality: held-out accuracy (MiniLM / Rotten Tomatoes) or "
             "perplexity (SmolLM2 / Chatterbot answers) after the steps shown, deltatune / peer, the classifier head "
             "trained in full.", ""]
    for u in results.get("updates", []):
        lines += [f"Cells rerun by `{u['command']}` on {u['date']}: {', '.join(u['cells'])}.", ""]
    rows = targets(results)
    if rows:
        lines += ["## Targets", "", "| model | target | measured | met |", "|---|---|---|---|"]
        lines += [f"| {m} | {t} | {v} | {'yes' if ok else '**no**'} |" for m, t, v, ok in rows]
        lines.append("")
    for model in dict.fromkeys(c["model"] for c in results["train"]):
        lines += [f"## Train step: {model}", "",
                  "| method | peer | trainable | adapter KiB (ours / peer) | step s | vs peer | vs floor | peer vs floor "
                  "| memory above floor MiB (ours / peer) | quality (ours / peer) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, c in _cells(results, model).items():
            peer = c["peer"]
            size = c["adapter_bytes"]
            sizes = f"{size['deltatune'] / 1024:,.0f}" + (f" / {size[peer] / 1024:,.0f}" if peer in size else "")
            mem = f"{_excess(c, 'deltatune'):.0f}" + (f" / {_excess(c, peer):.0f}" if peer in c["step_peak_mib"] else "")
            lines.append(
                f"| {method} | {peer or '-'} | {c['trainable']['deltatune']:,} | {sizes} | "
                f"{c['time_s']['deltatune']['median']:.3f} | {_fmt_ratio(c['ratios'].get(f'deltatune/{peer} time'))} | "
                f"{_fmt_ratio(c['ratios']['deltatune/floor time'])} | {_fmt_ratio(c['ratios'].get(f'{peer}/floor time'))} | "
                f"{mem} | {_quality(c)} |")
        q = next((c["quality"] for c in _cells(results, model).values() if "quality" in c), None)
        if q:
            lines += ["", f"Quality: {q['metric']} after {q['steps']} steps."]
        lines.append("")
    for cell in results["inference"]:
        lines += [f"## Inference: {cell['model']} ({cell['rows']} rows, LoRA r={cell['rank']} on q/v, "
                  f"{cell['adapters']} adapters loaded)", "",
                  "| contender | forward s (median) | rows/s |", "|---|---|---|"]
        lines += [f"| {k} | {v['median']:.4f} | {cell['rows_per_s'][k]:,.1f} |" for k, v in cell["time_s"].items()]
        lines += ["", "| ratio | median (min-max) |", "|---|---|"]
        lines += [f"| {k} | {_fmt_ratio(v)} |" for k, v in cell["ratios"].items()]
        lines.append("")
    if results.get("quantized"):
        from .quantized import markdown as quantized_markdown

        lines += quantized_markdown(results["quantized"])
    for cell in results["compile"]:
        lines += [f"## torch.compile: {cell['model']} LoRA train step", "",
                  f"Graph breaks (dynamo explain): {cell['graph_breaks']}; first steps (compilation) "
                  f"{cell['first_steps_s']:.0f} s.", "", "| contender | step s (median) |", "|---|---|"]
        lines += [f"| {k} | {v['median']:.3f} |" for k, v in cell["time_s"].items()]
        lines += ["", "| ratio | median (min-max) |", "|---|---|"]
        lines += [f"| {k} | {_fmt_ratio(v)} |" for k, v in cell["ratios"].items()]
        lines.append("")
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """step time vs trainable parameters, memory per method, quality vs trainable parameters (one per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(c["model"] for c in results["train"]):
        cells = _cells(results, model)
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        ax = axes[0]
        for who, marker in (("deltatune", "o"), ("peft", "s")):
            pts = [(c["trainable"][who], c["ratios"][f"{who}/floor time"]["median"], m)
                   for m, c in cells.items() if who in c["trainable"]]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=who)
                for x, y, m in pts:
                    ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="trainable parameters", ylabel="step time / frozen floor", title=f"{model}: step time")
        ax.legend()
        ax = axes[1]
        names = list(cells)
        ours = [_excess(cells[m], "deltatune") for m in names]
        theirs = [_excess(cells[m], cells[m]["peer"]) if cells[m]["peer"] in cells[m]["step_peak_mib"] else 0
                  for m in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="deltatune")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="peer (PEFT / torch)")
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
        ax.set(ylabel="step peak memory above floor (MiB)", title=f"{model}: memory")
        ax.legend()
        ax = axes[2]
        for who, marker in (("deltatune", "o"), ("peft", "s")):
            pts = [(c["trainable"][who], c["quality"][who], m) for m, c in cells.items()
                   if "quality" in c and who in c["quality"]]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=who)
                for x, y, m in pts:
                    ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        metric = next((c["quality"]["metric"] for c in cells.values() if "quality" in c), "quality")
        ax.set(xscale="log", xlabel="trainable parameters (without the head)", ylabel=metric,
               title=f"{model}: {metric}")
        ax.legend()
        fig.tight_layout()
        path = out / f"bench_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(results: dict[str, Any], out: Path, command: str | None = None) -> None:
    import json

    out = Path(out)
    atomic_write_text(out / "bench.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "bench.md", markdown(results, command or results.get("command", "deltatune bench")))
    plots(results, out)


def headline(results: dict[str, Any]) -> str:
    """The README's table: the targets and the side-by-side LoRA / dropout / DoRA / inference numbers."""
    lines = ["| model | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {m} | {t} | {v} | {'yes' if ok else '**no**'} |" for m, t, v, ok in targets(results)]
    lines += ["", "| model | method | step time vs PEFT | vs floor (PEFT's) | memory above floor MiB (PEFT's) "
              "| quality (PEFT's) |", "|---|---|---|---|---|---|"]
    for c in results["train"]:
        if c["peer"] != "peft":
            continue
        q = c.get("quality", {})
        lines.append(f"| {c['model']} | {c['method']} | {_fmt_ratio(c['ratios']['deltatune/peft time'])} | "
                     f"{c['ratios']['deltatune/floor time']['median']:.3f} ({c['ratios']['peft/floor time']['median']:.3f}) | "
                     f"{_excess(c, 'deltatune'):.0f} ({_excess(c, 'peft'):.0f}) | "
                     + (f"{q['deltatune']:.3f} ({q['peft']:.3f})" if "peft" in q else "") + " |")
    return "\n".join(lines)


def update_readme(results: dict[str, Any], readme: Path) -> None:
    """Replace the block between <!-- bench:targets --> and <!-- /bench:targets --> with `headline`."""
    text = Path(readme).read_text()
    start, end = "<!-- bench:targets -->", "<!-- /bench:targets -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no '{start}' ... '{end}' block to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(readme, f"{head}{start}\n{headline(results)}\n{end}{tail}")
