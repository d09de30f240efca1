"""`deltatune merge CONFIG.yaml` end to end on tiny Llamas saved as sharded checkpoints: results equal the
in-memory merge, identities hold, overrides hit only their tensors, and bad input exits 2 with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_close, perturb

import deltatune as dt
from deltatune.cli.main import main
from deltatune.merging import MERGE_METHODS, get_merge_method, linear, run
from deltatune.merging.checkpoint import INDEX_NAME, CheckpointReader, TensorSpec, save_checkpoint
from deltatune.merging.run import MERGE_CONFIG_NAME


def tiny_llama(hidden: int = 32, tied: bool = True, seed: int = 0):
    """A 2-layer Llama; tied embeddings like SmolLM2, so the checkpoint has no lm_head.weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def state(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {name: reader.read(name) for name in reader.keys()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """base (sharded), two fine-tunes (one file / other shards), a wider model, fisher files."""
    root = tmp_path_factory.mktemp("zoo")
    model = tiny_llama()
    model.save_pretrained(root / "base", max_shard_size="20KB")
    for name, seed, shard in (("ft1", 1, "1GB"), ("ft2", 2, "50KB")):
        perturb(model, 0.02, seed=seed)  # cumulative: ft2 = ft1 + noise, still a fine-tune of base
        model.save_pretrained(root / name, max_shard_size=shard)
    tiny_llama(hidden=48).save_pretrained(root / "wide")
    g = torch.Generator().manual_seed(7)
    for name in ("ft1", "ft2"):  # importance of the MLP weights only: the rest merges without it
        mlp = {k: v for k, v in state(root / "base").items() if ".mlp." in k}
        fisher = {k: torch.rand(v.shape, generator=g) for k, v in mlp.items()}
        save_checkpoint(root / f"{name}_fisher", fisher)
    return root


def merge(tmp_path: Path, cfg: dict, *args: str) -> int:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["merge", str(path), "--no-progress", *args])


def config(zoo: Path, out: Path, method: str = "ties", models=("ft1", "ft2"), weights=(0.6, 0.4),
           **extra) -> dict:
    cfg = {"method": method, "models": [{"path": str(zoo / m), "weight": w} for m, w in zip(models, weights)],
           "output": {"path": str(out)}, **extra}
    return cfg if method == "linear" else {"base_model": str(zoo / "base"), **cfg}


def in_memory(zoo: Path, method: str, models=("ft1", "ft2"), weights=(0.6, 0.4), seed: int = 0, **parameters):
    fts = [state(zoo / m) for m in models]
    if method == "linear":
        return linear(fts, list(weights))
    merger = get_merge_method(method, **parameters)
    return merger.merge_state_dicts(state(zoo / "base"), fts, list(weights), seed)


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


def test_ties_end_to_end_writes_a_loadable_sharded_checkpoint(zoo, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = config(zoo, out, parameters={"density": 0.5}, seed=3,
                 output={"path": str(out), "max_shard_size": "30KB"})
    assert merge(tmp_path, cfg) == 0
    assert "merged" in capsys.readouterr().out
    assert (out / INDEX_NAME).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert {"config.json", "generation_config.json", MERGE_CONFIG_NAME} <= {p.name for p in out.iterdir()}
    expected = in_memory(zoo, "ties", density=0.5, seed=3)
    assert_same(state(out), expected)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "lm_head.weight" not in expected  # tied, as in the base: the reloaded head is the merged embedding
    assert torch.equal(model.lm_head.weight, expected["model.embed_tokens.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "out"]  # no temporary folder left


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "della", "breadcrumbs", "linear"])
@pytest.mark.parametrize("chunk_bytes", [None, 512])
def test_output_equals_the_in_memory_merge(zoo, tmp_path, monkeypatch, method: str, chunk_bytes) -> None:
    """Also with tiny row blocks: entry-wise methods then merge every matrix in pieces, the others whole."""
    if chunk_bytes:
        monkeypatch.setattr(run, "CHUNK_BYTES", chunk_bytes)
    assert merge(tmp_path, config(zoo, tmp_path / "out", method, seed=5)) == 0
    assert_same(state(tmp_path / "out"), in_memory(zoo, method, seed=5))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_per_model_parameters_in_mergekit_spelling(zoo, tmp_path, method: str) -> None:
    """`- model: x  parameters: {weight, density}` per model: each task vector gets its own density; an
    override's density is beaten by the model's own one, as in mergekit."""
    models = [{"model": str(zoo / "ft1"), "parameters": {"weight": 0.6, "density": 0.3}},
              {"path": str(zoo / "ft2"), "weight": 0.4}]
    overrides = [{"pattern": "re:.*mlp.*", "parameters": {"density": 0.9}}]
    cfg = {**config(zoo, tmp_path / "out", method, seed=2), "models": models, "parameters": {"density": 0.6},
           "overrides": overrides}
    assert merge(tmp_path, cfg) == 0
    base, fts = state(zoo / "base"), [state(zoo / "ft1"), state(zoo / "ft2")]
    own = [{"density": 0.3}, {}]
    expected = {}
    for key in base:
        density = 0.9 if ".mlp." in key else 0.6
        expected.update(get_merge_method(method, density=density).merge_state_dicts(
            {key: base[key]}, [{key: ft[key]} for ft in fts], [0.6, 0.4], seed=2, model_parameters=own))
    assert_same(state(tmp_path / "out"), expected)
    q = "model.layers.0.self_attn.q_proj.weight"  # ft1's vector kept 30% of its entries, not 60%
    assert not torch.equal(expected[q], in_memory(zoo, method, seed=2, density=0.6)[q])


def test_only_entrywise_methods_merge_in_blocks(monkeypatch) -> None:
    monkeypatch.setattr(run, "CHUNK_BYTES", 512)
    spec = TensorSpec("w", torch.float32, (10, 32))  # 128 B rows: blocks of 4 rows
    blocks = {name: run.Rule(None, MERGE_METHODS.get(name), (1.0,)).blocks(spec)
              for name in ("task_arithmetic", "fisher", "linear", "ties", "dare_linear", "pcb")}
    assert blocks["task_arithmetic"] == blocks["linear"] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert blocks["fisher"] == blocks["task_arithmetic"] or "fisher" not in MERGE_METHODS
    assert blocks["ties"] == blocks["dare_linear"] == [None]  # top-k, one random stream: the whole tensor
    assert blocks["pcb"] == [None] or "pcb" not in MERGE_METHODS
    assert run.Rule(None, None, (1.0,)).blocks(TensorSpec("b", torch.float32, (1000,))) == \
        [slice(i, min(i + 128, 1000)) for i in range(0, 1000, 128)]


@pytest.mark.parametrize("method, weights", [("ties", (0.7, 0.3)), ("task_arithmetic", (0.5, 0.5)),
                                             ("dare_linear", (1.0, 1.0)), ("linear", (0.5, 0.5))])
def test_merging_the_base_with_itself_is_the_identity(zoo, tmp_path, method: str, weights) -> None:
    assert merge(tmp_path, config(zoo, tmp_path / "out", method, ("base", "base"), weights)) == 0
    assert_same(state(tmp_path / "out"), state(zoo / "base"))


def test_regex_override_changes_only_its_tensors(zoo, tmp_path) -> None:
    overrides = [{"pattern": r"re:.*\.mlp\..*", "parameters": {"lambda_": 0.0}},
                 {"pattern": "self_attn.q_proj.weight", "weights": [1.0, 0.0]}]
    cfg = config(zoo, tmp_path / "out", overrides=overrides, parameters={"density": 0.5})
    assert merge(tmp_path, cfg) == 0
    got, base, default = state(tmp_path / "out"), state(zoo / "base"), in_memory(zoo, "ties", density=0.5)
    only_ft1 = in_memory(zoo, "ties", weights=(1.0, 0.0), density=0.5)
    mlp = [k for k in got if ".mlp." in k]
    q = [k for k in got if k.endswith("self_attn.q_proj.weight")]
    assert len(mlp) == 6 and len(q) == 2
    for k in got:
        expected = base[k] if k in mlp else only_ft1[k] if k in q else default[k]
        assert torch.equal(got[k], expected), k
    assert not any(torch.equal(default[k], base[k]) for k in mlp)  # the override did change them


def test_output_dtype_and_dotted_overrides(zoo, tmp_path) -> None:
    assert merge(tmp_path, config(zoo, tmp_path / "out", "task_arithmetic"), "output.dtype=bfloat16",
                 "models.0.weight=1") != 0  # lists are not sections: only dict keys can be overridden
    assert merge(tmp_path, config(zoo, tmp_path / "out", "task_arithmetic"), "output.dtype=bfloat16",
                 "parameters.lambda_=0.5") == 0
    expected = {k: v.bfloat16() for k, v in in_memory(zoo, "task_arithmetic", lambda_=0.5).items()}
    assert_same(state(tmp_path / "out"), expected)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"


def test_fisher_files_weight_the_tensors_they_cover(zoo, tmp_path, monkeypatch) -> None:
    if "fisher" not in MERGE_METHODS:
        pytest.skip("this deltatune has no fisher merge method")
    monkeypatch.setattr(run, "CHUNK_BYTES", 512)  # importance is read in the same row blocks
    cfg = config(zoo, tmp_path / "out", "fisher")
    for entry, name in zip(cfg["models"], ("ft1", "ft2")):
        entry["fisher"] = str(zoo / f"{name}_fisher" / "model.safetensors")
    assert merge(tmp_path, cfg) == 0
    importance = [state(zoo / f"{name}_fisher") for name in ("ft1", "ft2")]
    fts = [state(zoo / "ft1"), state(zoo / "ft2")]
    expected = MERGE_METHODS["fisher"].merge_state_dicts(state(zoo / "base"), fts, [0.6, 0.4], 0,
                                                        importance=importance)
    assert_same(state(tmp_path / "out"), expected)


def test_overwrite(zoo, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert merge(tmp_path, config(zoo, out)) == 2
    assert "not empty; choose a new folder or set output.overwrite=true" in capsys.readouterr().err
    assert merge(tmp_path, config(zoo, out), "output.overwrite=true") == 0
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("change, message", [
    (lambda c, z: c.update(methd="ties"), "unknown key 'methd'; did you mean 'method'?"),
    (lambda c, z: c.update(method="tise"), "unknown method 'tise'; did you mean 'ties'?"),
    (lambda c, z: c["models"].append({"path": str(z / "nope")}), "models.2.path: model"),
    (lambda c, z: c["models"].append({"path": str(z / "wide")}), "has other shapes than the base"),
    (lambda c, z: c.pop("base_model"), "set base_model"),
    (lambda c, z: c["output"].update(path=str(z / "ft1")), "is one of the inputs"),
    (lambda c, z: c.update(overrides=[{"pattern": "mlp", "parameters": {}}]),
     "overrides.0.pattern 'mlp' matches no tensor"),
])
def test_bad_configs_exit_2_naming_the_fix(zoo, tmp_path, capsys, change, message: str) -> None:
    cfg = config(zoo, tmp_path / "out")
    change(cfg, zoo)
    assert merge(tmp_path, cfg) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune merge: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_missing_tensors_are_listed(zoo, tmp_path, capsys) -> None:
    partial = state(zoo / "ft1")
    partial.pop("model.norm.weight")
    save_checkpoint(tmp_path / "partial", partial)
    (tmp_path / "partial" / "config.json").write_text("{}")
    cfg = config(zoo, tmp_path / "out", models=("ft1", tmp_path / "partial"))
    assert merge(tmp_path, cfg) == 2
    assert "is missing 1 tensors ['model.norm.weight']" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapters(zoo) -> dict[str, Path]:
    """Two real LoRA adapters on the tiny base, moved off their init so their deltas are not zero."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, name in enumerate(("lora1", "lora2")):
        dm = dt.inject(AutoModelForCausalLM.from_pretrained(zoo / "base"),
                       dt.make_config("lora", r=2, targets=["q_proj", "v_proj"]))
        perturb(dm, 0.05, seed=10 + i)
        dm.save(zoo / name)
        paths[name] = zoo / name
    return paths


def test_mixing_adapters_and_checkpoints_is_refused(zoo, adapters, tmp_path, capsys) -> None:
    assert merge(tmp_path, config(zoo, tmp_path / "out", models=("ft1", "lora1"))) == 2
    assert "cannot mix adapters and full checkpoints" in capsys.readouterr().err


def test_adapters_merge_through_merge_adapters(zoo, adapters, tmp_path) -> None:
    """A linear merge of LoRA adapters is exact: the merged adapter's delta is w1 dW1 + w2 dW2."""
    pytest.importorskip("deltatune.merging.adapters")
    from transformers import AutoModelForCausalLM

    def merged_weights(adapter: Path) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(zoo / "base")
        return dt.load(model, adapter).merge_and_unload().state_dict()

    assert merge(tmp_path, config(zoo, tmp_path / "out", "linear", ("lora1", "lora2"), (0.6, 0.4))) == 0
    base = AutoModelForCausalLM.from_pretrained(zoo / "base").state_dict()
    got = merged_weights(tmp_path / "out")
    one, two = merged_weights(adapters["lora1"]), merged_weights(adapters["lora2"])
    q = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q], base[q] + 0.6 * (one[q] - base[q]) + 0.4 * (two[q] - base[q]))


def test_merge_help_lists_every_registered_method(capsys, monkeypatch) -> None:
    """The list comes from MERGE_METHODS, so a method registered later appears without touching the CLI."""
    assert main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    for name in [*MERGE_METHODS, "linear"]:
        assert f"\n  {name} " in text, name
    monkeypatch.setitem(MERGE_METHODS, "new_method", get_merge_method("ties", pretty_name="New"))
    assert main(["merge", "--help"]) == 0
    assert "\n  new_method " in capsys.readouterr().out


def test_adapter_merges_take_per_model_parameters(zoo, adapters, tmp_path) -> None:
    from deltatune.merging.adapters import merge_adapters, read_adapter_deltas

    models = [{"path": str(adapters["lora1"]), "parameters": {"weight": 0.6, "density": 0.2}},
              {"path": str(adapters["lora2"]), "weight": 0.4}]
    cfg = {**config(zoo, tmp_path / "out", "ties"), "models": models, "parameters": {"density": 0.7},
           "output": {"path": str(tmp_path / "out"), "rank": 32}}
    assert merge(tmp_path, cfg) == 0
    merge_adapters([adapters["lora1"], adapters["lora2"]], [0.6, 0.4], get_merge_method("ties", density=0.7),
                   rank=32, out=tmp_path / "api", model_parameters=[{"density": 0.2}, {}])
    got, want = read_adapter_deltas(tmp_path / "out").layers, read_adapter_deltas(tmp_path / "api").layers
    assert got.keys() == want.keys()
    for p in want:  # the same computation twice (an SVD each): equal up to LAPACK's threading
        assert_close(got[p].delta(), want[p].delta(), rtol=1e-5, atol=0, msg=p)
    merge_adapters([adapters["lora1"], adapters["lora2"]], [0.6, 0.4], get_merge_method("ties", density=0.7),
                   rank=32, out=tmp_path / "same_density")
    same = read_adapter_deltas(tmp_path / "same_density").layers
    assert any((same[p].delta() - want[p].delta()).abs().max() > 1e-2 * want[p].delta().abs().max()
               for p in want)  # the 0.2 density mattered
