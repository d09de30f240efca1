"""Merge configs: YAML + dotted overrides, and one clear line (with a suggestion) for each kind of mistake."""

from __future__ import annotations

import pytest
import yaml

from deltatune.merging import MERGE_METHODS
from deltatune.merging.config import MergeConfig, load_merge_config, validate_merge_config


def config(**changes) -> dict:
    data = {"method": "ties", "base_model": "base", "models": [{"path": "a"}, {"path": "b", "weight": 0.3}],
            "output": {"path": "out"}}
    return {**data, **changes}


def test_yaml_with_dotted_overrides(tmp_path) -> None:
    path = tmp_path / "merge.yaml"
    overrides = [{"pattern": "re:.*mlp.*", "parameters": {"density": 0.3}}]
    path.write_text(yaml.safe_dump(config(parameters={"density": 0.5}, overrides=overrides)))
    cfg = load_merge_config(path, ["parameters.lambda_=0.8", "output.dtype=bfloat16", "seed=3"])
    assert cfg.parameters == {"density": 0.5, "lambda_": 0.8}
    assert (cfg.output.dtype, cfg.seed, cfg.models[1].weight, cfg.models[0].weight) == \
        ("bfloat16", 3, 0.3, 1.0)
    expected = MERGE_METHODS["ties"].model_copy(update={"density": 0.5, "lambda_": 0.8})
    assert cfg.merge_method(cfg.parameters) == expected
    assert validate_merge_config(yaml.safe_load(cfg.to_yaml())) == cfg  # the provenance file reads back


def test_defaults_and_sizes() -> None:
    cfg = validate_merge_config(config())
    assert (cfg.output.dtype, cfg.output.format, cfg.output.overwrite, cfg.output.shard_bytes) == \
        ("same", "auto", False, 2 * 10**9)
    sized = validate_merge_config(config(output={"path": "o", "max_shard_size": "100MiB"}))
    assert sized.output.shard_bytes == 100 * 2**20
    linear = validate_merge_config({"method": "linear", "models": [{"path": "a"}], "output": {"path": "o"}})
    assert linear.base_model is None and linear.merge_method({}) is None


@pytest.mark.parametrize("changes, message", [
    ({"method": "tise"}, "unknown method 'tise'; did you mean 'ties'?"),
    ({"modles": []}, "unknown key 'modles'; did you mean 'models'?"),
    ({"models": [{"path": "a", "wieght": 1}]},
     "unknown key 'models.0.wieght'; did you mean 'models.0.weight'?"),
    ({"models": []}, "'models'"),
    ({"parameters": {"densty": 0.3}}, "unknown key 'parameters.densty'; did you mean 'parameters.density'?"),
    ({"parameters": {"density": 3}}, "'parameters.density': Input should be less than or equal to 1"),
    ({"output": {"path": "o", "dtyp": "float32"}}, "unknown key 'output.dtyp'; did you mean 'output.dtype'?"),
    ({"output": {"path": "o", "dtype": "fp32"}}, "'output.dtype'"),
    ({"output": {"path": "o", "max_shard_size": "2XB"}}, "output.max_shard_size: size '2XB'"),
    ({"output": {}}, "missing key 'output.path'"),
    ({"overrides": [{"pattern": "re:(", "parameters": {}}]}, "'re:(' is not a valid regex"),
    ({"overrides": [{"pattern": "mlp", "parameters": {"lamda_": 1}}]},
     "unknown key 'overrides.0.parameters.lamda_'; did you mean 'overrides.0.parameters.lambda_'?"),
    ({"overrides": [{"pattern": "mlp", "weights": [1.0]}]},
     "overrides.0.weights has 1 entries; give one per model"),
    ({"method": "linear", "parameters": {"density": 0.5}}, "method 'linear' takes no parameters"),
    ({"models": [{"path": "a", "fisher": "f"}, {"path": "b"}]}, "give every model one, or none"),
    ({"models": [{"path": "a", "parameters": {"densty": 0.3}}]},
     "unknown key 'models.0.parameters.densty'; did you mean 'models.0.parameters.density'?"),
    ({"models": [{"path": "a"}, {"path": "b", "parameters": {"lambda_": 2}}]},
     "unknown key 'models.1.parameters.lambda_'"),
    ({"models": [{"path": "a", "parameters": {"density": 1.5}}]},
     "models.0.parameters: per-model parameters are invalid: density: Input should be less than or equal to 1"),
    ({"models": [{"path": "a", "weight": 1, "parameters": {"weight": 2}}]}, "give a model's weight once"),
    ({"models": [{"path": "a", "model": "b"}]}, "give a model's path once"),
    ({"method": "linear", "models": [{"path": "a", "parameters": {"density": 0.5}}]},
     "method 'linear' takes only a weight per model"),
    ({"method": "pcb", "models": [{"path": "a", "parameters": {"density": 0.5}}]},
     "PCB's density is its pcb_ratio over all models"),
])
def test_mistakes_are_named_with_their_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_merge_config(config(**changes))
    assert message in str(err.value)


def test_per_model_parameters_in_mergekit_spelling(tmp_path) -> None:
    """`model:` and `parameters: {weight, density}` per model, as mergekit writes them; they round-trip."""
    models = [{"model": "a", "parameters": {"weight": 0.7, "density": 0.4}}, {"path": "b", "weight": 0.3}]
    cfg = validate_merge_config(config(models=models, parameters={"density": 0.5}))
    assert [(m.path, m.weight, m.parameters) for m in cfg.models] == [("a", 0.7, {"density": 0.4}), ("b", 0.3, {})]
    assert cfg.model_parameters() == ({"density": 0.4}, {})
    assert validate_merge_config(config()).model_parameters() is None
    assert validate_merge_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_files_that_are_not_configs(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_merge_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="a merge config is a mapping"):
        load_merge_config(tmp_path / "list.yaml")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(config()))
    with pytest.raises(ValueError, match="must look like key=value"):
        load_merge_config(tmp_path / "ok.yaml", ["=3"])


def test_every_field_is_described() -> None:
    """Descriptions feed --help and docs: no field may go without one."""
    from deltatune.merging.config import ModelEntry, OutputSection, Override

    for model in (MergeConfig, ModelEntry, Override, OutputSection):
        assert all(f.description for f in model.model_fields.values()), model.__name__
