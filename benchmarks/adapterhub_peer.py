"""AdapterHub (`adapters` 1.3) side of the bottleneck-adapter / composition parity checks.

Runs INSIDE .venv-adapters (see benchmarks/setup_adapters.sh); it imports only the stdlib, torch,
transformers, adapters and safetensors, never deltatune, so the two sides share nothing but files.

    .venv-adapters/bin/python benchmarks/adapterhub_peer.py REQUEST.json OUT_DIR/
    .venv-adapters/bin/python benchmarks/adapterhub_peer.py --serve   # a train-step worker (step_worker.py)

REQUEST.json is one request, or a list of them run in one process (imports paid once), request i writing
to OUT_DIR/<its "id", or i>/. A request (every key but "model", "adapters" and "texts" is optional):
    {
      "model": "/path/to/all-MiniLM-L6-v2",          # an HF BERT folder
      "adapters": [{"name": "a", "config": "seq_bn"},  # an AdapterHub config name ...
                   {"name": "b", "config": {"base": "par_bn", "scaling": 1.0}},  # ... with overrides
                   {"name": "c", "config": {"mh_adapter": true, ...}},           # ... or a full BnConfig dict
                   {"name": "d", "load": "dir/d"}],   # ... or AdapterHub's load_adapter of a saved folder
      "fusions": [{"adapters": ["a", "c"], "config": "dynamic"},   # config: name or {"base": ..., overrides}
                  {"adapters": ["a", "d"], "load": "dir/fusion"}], # ... or load_adapter_fusion of a folder
      "heads": [{"name": "a", "num_labels": 3, "layers": 2}],      # AdapterHub classification heads
      "setup": {"Stack": ["a", {"Fuse": ["a", "c"]}]},   # a name, or one-key dicts Stack / Parallel / Fuse /
                                                        # Average (+weights, normalize_weights) /
                                                        # Split (+splits) / BatchSplit (+batch_sizes)
      "skip_layers": [0, 1],          # AdapterDrop at inference: set_active_adapters(..., skip_layers)
      "seed": 0,
      "randomize_std": 0.05,          # every adapter/fusion/shared/head parameter += N(0, std); 0 keeps init
      "weights": "in.safetensors",    # instead of randomising: load these tensors (AdapterHub names)
      "texts": ["hello world", "..."],
      "max_length": 16,               # pad/truncate to this length (Split needs a known length)
      "train": false,                 # eval mode unless true (dropout on, fusion dropout on scores)
      "save_adapters": true           # save_adapter / save_adapter_fusion folders (safetensors form)
    }

OUT_DIR receives: outputs.safetensors (last_hidden_state, logits or logits.<head>), inputs.safetensors
(input_ids, attention_mask, token_type_ids), adapter_weights.safetensors (every adapter, fusion,
shared-PHM and head tensor under model.state_dict() names), saved/<adapter>/ and saved/fusion.<name>/
written by AdapterHub itself, and meta.json (versions, resolved configs, timings, saved file names).
"""

import json
import sys
import time
from pathlib import Path

import adapters
import adapters.composition as ac
import safetensors
import torch
import transformers
from adapters import AdapterConfig, AdapterFusionConfig, BertAdapterModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

# Substrings that mark a state-dict entry as AdapterHub's (not the frozen base model's).
ADAPTER_KEY_MARKERS = (
    ".adapters.",
    "adapter_fusion_layer.",
    "shared_parameters.",
    "heads.",
    "prefix_tunings.",
)
BLOCKS = {
    "Stack": ac.Stack,
    "Parallel": ac.Parallel,
    "Fuse": ac.Fuse,
    "Average": ac.Average,
    "Split": ac.Split,
    "BatchSplit": ac.BatchSplit,
}


def fail(message):
    sys.exit(f"adapterhub_peer: {message}")


def load_adapter_config(spec):
    """A config name, {"base": name, **overrides}, or a full BnConfig dict -> AdapterConfig."""
    if isinstance(spec, str):
        return AdapterConfig.load(spec)
    if isinstance(spec, dict) and "base" in spec:
        overrides = {k: v for k, v in spec.items() if k != "base"}
        return AdapterConfig.load(spec["base"], **overrides)
    if isinstance(spec, dict):
        return AdapterConfig.load(spec)
    fail(f"adapter config must be a name or a dict, got {spec!r}")


def load_fusion_config(spec):
    if spec is None or isinstance(spec, str):
        return spec or "dynamic"
    base = spec.get("base", "dynamic")
    # AdapterHub keys a dict config by its hash, so hand it the full dict rather than the overrides.
    return AdapterFusionConfig.load(base, **{k: v for k, v in spec.items() if k != "base"}).to_dict()


def build_setup(spec):
    """JSON composition (a name or a one-key block dict, kwargs beside it) -> AdapterHub block."""
    if isinstance(spec, str):
        return spec
    if not isinstance(spec, dict):
        fail(f"setup entries must be adapter names or block dicts, got {spec!r}")
    kinds = [k for k in spec if k in BLOCKS]
    if len(kinds) != 1:
        fail(f"a block dict names exactly one of {sorted(BLOCKS)}, got keys {sorted(spec)}")
    kind = kinds[0]
    children = [build_setup(child) for child in spec[kind]]
    kwargs = {k: v for k, v in spec.items() if k != kind}
    return BLOCKS[kind](*children, **kwargs)


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if any(m in k for m in ADAPTER_KEY_MARKERS)}


def randomize(model, std, seed):
    """Perturb every adapter-side parameter by N(0, std), in sorted-name order so the draw is reproducible.

    Perturbing (rather than replacing) keeps LayerNorm gains and learned scalings near 1 while making the
    zero/near-zero AdapterHub inits (up-projections, PHM rules, fusion value matrix) non-trivial.
    """
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(adapter_state(model)):
            if name in params:
                p = params[name]
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def load_weights(model, path):
    given = load_file(path)
    own = adapter_state(model)
    unknown = sorted(set(given) - set(own))
    if unknown:
        fail(
            f"{path} has tensors this model does not: {unknown[:5]} (names must be AdapterHub's state-dict names)"
        )
    missing = sorted(set(own) - set(given))
    model.load_state_dict(given, strict=False)
    return missing


def tokenize(model_path, request):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if "max_length" in request:
        kwargs = {"padding": "max_length", "truncation": True, "max_length": request["max_length"]}
    else:
        kwargs = {"padding": True}
    return dict(tokenizer(request["texts"], return_tensors="pt", **kwargs))


def run(request, out_dir):
    timings = {}
    started = time.perf_counter()
    torch.manual_seed(request.get("seed", 0))
    model = BertAdapterModel.from_pretrained(request["model"])
    timings["load_model_s"] = time.perf_counter() - started

    for entry in request["adapters"]:
        if "load" in entry:  # AdapterHub's own loader: the folder's config and weights as AdapterHub reads them
            model.load_adapter(entry["load"], load_as=entry["name"], use_safetensors=True, set_active=False)
        else:
            model.add_adapter(entry["name"], config=load_adapter_config(entry["config"]))
    for fusion in request.get("fusions", []):
        if "load" in fusion:
            model.load_adapter_fusion(fusion["load"], use_safetensors=True, set_active=False)
            continue
        model.add_adapter_fusion(
            ac.Fuse(*fusion["adapters"], name=fusion.get("name")),
            config=load_fusion_config(fusion.get("config")),
        )
    for head in request.get("heads", []):
        model.add_classification_head(
            head["name"], num_labels=head.get("num_labels", 2), layers=head.get("layers", 2)
        )
    setup = build_setup(request["setup"]) if "setup" in request else request["adapters"][0]["name"]
    model.set_active_adapters(setup, skip_layers=request.get("skip_layers"))

    missing = []
    if "weights" in request:
        missing = load_weights(model, request["weights"])
    elif request.get("randomize_std", 0.05):
        randomize(model, request.get("randomize_std", 0.05), request.get("seed", 0))
    model.train(bool(request.get("train", False)))

    inputs = tokenize(request["model"], request)
    captured = {}
    hook = model.bert.register_forward_hook(lambda _m, _a, out: captured.update(last_hidden_state=out[0]))
    started = time.perf_counter()
    with torch.no_grad():
        output = model(**inputs)
    timings["forward_s"] = time.perf_counter() - started
    hook.remove()

    tensors = {"last_hidden_state": captured["last_hidden_state"]}
    if request.get("heads"):
        if hasattr(output, "head_outputs"):  # Parallel: one head per channel, each on its own rows
            for head_name, head_output in zip(model.active_head, output.head_outputs):
                tensors[f"logits.{head_name}"] = head_output.logits
        else:
            tensors["logits"] = output.logits
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "outputs.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")
    save_file(
        {k: v.detach().clone().contiguous() for k, v in adapter_state(model).items()},
        out_dir / "adapter_weights.safetensors",
    )

    saved, save_errors = {}, {}
    if request.get("save_adapters", True):
        for entry in request["adapters"]:
            folder = out_dir / "saved" / entry["name"]
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                model.save_adapter(str(folder), entry["name"], use_safetensors=True)
            except RuntimeError as exc:  # 1.3 cannot write prefix tuning (mam) as safetensors: shared tensors
                save_errors[entry["name"]] = str(exc).strip().splitlines()[0][:300]
            saved[entry["name"]] = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        for fusion in request.get("fusions", []):
            fuse = ac.Fuse(*fusion["adapters"], name=fusion.get("name"))
            folder = out_dir / "saved" / f"fusion.{fuse.name}"
            model.save_adapter_fusion(str(folder), fuse, use_safetensors=True)
            saved[f"fusion.{fuse.name}"] = sorted(p.name for p in folder.iterdir())
    timings["total_s"] = time.perf_counter() - started + timings["load_model_s"]

    meta = {
        "versions": versions(),
        "setup": repr(model.active_adapters),
        "active_head": model.active_head,
        "configs": {
            e["name"]: model.adapters_config.get(e["name"]).to_dict()
            if hasattr(model.adapters_config.get(e["name"]), "to_dict")
            else model.adapters_config.get(e["name"])
            for e in request["adapters"]
        },
        "output_shapes": {k: list(v.shape) for k, v in tensors.items()},
        "weights_missing_from_input": missing,
        "saved_files": saved,
        "save_errors": save_errors,
        "timings": timings,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return meta


def versions():
    return {
        "adapters": adapters.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }


def serve_steps():
    """--serve: the AdapterHub side of benchmarks/adapters_vs_adapterhub.py (protocol in step_worker.py).

    Each build is a fresh BertAdapterModel with one adapter (an AdapterHub config, as in "adapters" above) and
    a one-layer classification head on the pooler output (BertForSequenceClassification's head), trained with
    train_adapter (base frozen; adapter and head train) by AdamW on the batch the driver saved.
    """
    from step_worker import serve

    state = {}

    def setup(request):
        state["model"], state["batch"] = request["model"], load_file(request["batch"])
        return {"versions": versions(), "threads": torch.get_num_threads()}

    def build(request):
        key = request["key"]
        torch.manual_seed(request.get("seed", 0))
        model = BertAdapterModel.from_pretrained(state["model"])
        model.add_adapter(key, config=load_adapter_config(request["config"]))
        model.add_classification_head(key, num_labels=2, layers=1, use_pooler=True)
        model.train_adapter(key)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=request.get("lr", 1e-5))
        batch = state["batch"]

        def step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        extra = {"config": model.adapters_config.get(key).to_dict(),
                 "attention": model.config._attn_implementation}
        return step, sum(p.numel() for p in params), extra

    serve(setup, build)


def main(argv):
    if argv[1:] == ["--serve"]:
        return serve_steps()
    if len(argv) != 3:
        sys.exit(__doc__)
    given = json.loads(Path(argv[1]).read_text())
    requests = given if isinstance(given, list) else [given]
    for i, request in enumerate(requests):
        for key in ("model", "adapters", "texts"):
            if key not in request:
                fail(f"request {i} of {argv[1]} lacks {key!r} (see the usage at the top of this script)")
    for i, request in enumerate(requests):
        out_dir = Path(argv[2]) / str(request.get("id", i)) if isinstance(given, list) else Path(argv[2])
        meta = run(request, out_dir)
        print(json.dumps({"id": request.get("id", i), "setup": meta["setup"], "shapes": meta["output_shapes"],
                          "timings": meta["timings"]}))


if __name__ == "__main__":
    main(sys.argv)
